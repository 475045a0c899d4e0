"""Whether an address is this machine: the only clients served when no API keys exist."""

from __future__ import annotations

import functools
import ipaddress


# Asked on every request when no keys are configured; parsing an address costs more than the
# rest of the check, and a server sees few distinct client addresses.
@functools.lru_cache(maxsize=4096)
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
