"""The forward proxy an upstream is reached through, from the standard environment variables:
`HTTPS_PROXY` for https upstreams, `HTTP_PROXY` for http ones (either case, the lower-case one
winning, as the standard library reads them), and `NO_PROXY` for the hosts that bypass it.

The standard library parses the variables and the bypass list (host names, domain suffixes,
`host:port`, `*`), so Relay decides exactly as Python's own clients do. Loopback upstreams get
no exception of their own: as with curl, only NO_PROXY exempts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib import request
from urllib.parse import urlsplit

from relay.providers.credentials import basic_token


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it listens, and the user and password its URL carried (sent as
    `Proxy-Authorization: Basic`)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, variable: str) -> Proxy:
        """A proxy URL as curl takes it: `http://[user:password@]host[:port]`, the scheme
        optional. `variable` names where it came from in errors, which never quote the URL
        (it may hold a password)."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(
                f"the proxy in {variable} is a {parts.scheme}:// URL; Relay speaks to http:// "
                "proxies only (https upstreams are still TLS end to end, through CONNECT)"
            )
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"the proxy in {variable} has an invalid port") from None
        if not parts.hostname:
            raise ValueError(f"the proxy in {variable} names no host")
        return cls(parts.hostname, port, parts.username, parts.password)

    @property
    def url(self) -> str:
        """The proxy as errors name it: without its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The `Proxy-Authorization` value, when the URL carried a user."""
        if self.username is None:
            return None
        return "Basic " + basic_token(self.username, self.password or "")


def proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The proxy the environment puts in front of `scheme://host:port`, if any."""
    proxies = request.getproxies_environment()
    url = proxies.get(scheme)
    if not url:
        return None
    # With its port, so that a NO_PROXY entry `host:port` matches too; an IPv6 address alone,
    # which the standard library would split at its last colon.
    address = host if ":" in host else f"{host}:{port}"
    # What urllib's own handlers decide with; typeshed does not declare it.
    if request.proxy_bypass_environment(address, proxies):  # type: ignore[attr-defined]
        return None
    return Proxy.parse(url, f"{scheme}_proxy")
