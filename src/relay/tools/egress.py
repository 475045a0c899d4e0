"""Where the tools Relay runs may connect: the operator's allow list, and no private address.

A request names the MCP server it wants Relay to call, so without a guard any client could make
Relay reach what only Relay can: a cloud's metadata service (169.254.169.254), a database on
the private network, an admin port on loopback (server-side request forgery). Two checks stand
in the way, on every HTTP request an `EgressGuard`'s clients send, redirects included:

- the URL must be on `EgressPolicy.allowed` (URL prefixes or host patterns), checked on the URL
  httpx2 parsed, which is the one it connects to;
- every address the host resolves to must be global, or inside one of the networks the operator
  opened (`private_networks`). The request is then sent to the address that was checked: its
  URL's host becomes that address, with the `Host` header and the TLS server name (httpcore2's
  `sni_hostname` extension, so certificates are verified against the name) naming the host.
  A DNS answer that changes between the check and the connection (DNS rebinding) therefore
  changes nothing.

An IPv6 address that embeds an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96,
6to4 2002::/16) is judged by the IPv4 address, which is where it leads. Environment proxies
are not used: a proxy would resolve the name itself, after the check.

httpx2 is imported on first use (an allow list to parse, a URL to check), so a process that
runs no tools never loads it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx2

__all__ = ["EgressGuard", "EgressPolicy", "EgressRefused", "Resolver", "resolve_host"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (host, port) -> the addresses it resolves to, as getaddrinfo gives them.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# What an allow list's host may be made of (a name, IDNA-encoded, or an address): not "*", "%".
_HOST_NAME = re.compile(rb"[A-Za-z0-9._:-]+")


class EgressRefused(Exception):
    """A connection the policy does not allow. The message names the origin (scheme, host,
    port) and the reason, never a path, query, credential or header: it is shown to clients."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """One entry of the allow list, parsed: a host (or, for `*.`, a suffix), a port, and for a
    URL prefix its scheme and path."""

    host: str
    wildcard: bool
    port: int | None  # None: the URL's scheme's default port
    scheme: str | None = None  # a prefix's; None: http or https
    path: str | None = None  # a prefix's; None: any

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        if not (host.endswith("." + self.host) if self.wildcard else host == self.host):
            return False
        if port != (_DEFAULT_PORTS[scheme] if self.port is None else self.port):
            return False
        if self.path is None:
            return True
        if self.path.endswith("/"):
            return path.startswith(self.path)
        # "/v1" allows "/v1" and what is under "/v1/", not "/v1beta".
        return path == self.path or path.startswith(self.path + "/")


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    # Which servers may be reached: URL prefixes ("https://mcp.example.com/v1/") or host
    # patterns ("mcp.example.com", "*.example.com", "mcp.example.com:8443"). A pattern without
    # a port allows the scheme's default one (80, 443). Empty: none at all.
    allowed: tuple[str, ...] = ()
    # Networks (CIDR strings, IPv4 or IPv6) that may be reached although private, loopback,
    # link-local, reserved, multicast or otherwise non-global; by default every such address
    # is refused.
    private_networks: tuple[str, ...] = ()
    _rules: tuple[_Rule, ...] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Parsed once, so that a mistake is a ValueError where the policy is configured.
        object.__setattr__(self, "_rules", tuple(_parse_rule(entry) for entry in self.allowed))
        networks = tuple(ipaddress.ip_network(net, strict=False) for net in self.private_networks)
        object.__setattr__(self, "_networks", networks)

    def permits(self, url: str) -> bool:
        """Whether `url` is on the allow list (http and https only). Where it resolves to is
        checked when a guard's client connects."""
        import httpx2

        try:
            return self._permits(httpx2.URL(url))
        except httpx2.InvalidURL:
            return False

    def _permits(self, url: httpx2.URL) -> bool:
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS or not url.raw_host:
            return False
        host = _host_of(url)
        port = url.port or _DEFAULT_PORTS[scheme]
        path = url.raw_path.partition(b"?")[0].decode("ascii")
        return any(rule.matches(scheme, host, port, path) for rule in self._rules)

    def _reachable(self, address: IPAddress) -> bool:
        judged = _embedded_ipv4(address) or address
        if any(judged in net or address in net for net in self._networks):
            return True
        return judged.is_global and not (
            judged.is_multicast or judged.is_reserved or judged.is_unspecified
        )


def _host_of(url: httpx2.URL) -> str:
    """The host as rules compare it: IDNA-encoded, lower-case, without a trailing dot."""
    return url.raw_host.decode("ascii").lower().rstrip(".")


def _parse_rule(entry: str) -> _Rule:
    import httpx2

    text = entry.strip()
    prefix = "://" in text
    wildcard = not prefix and text.startswith("*.")
    try:
        url = httpx2.URL(text if prefix else "http://" + text.removeprefix("*."))
    except httpx2.InvalidURL as exc:
        raise ValueError(f"allowed: {entry!r} is not a URL prefix or host pattern") from exc
    if (
        not url.raw_host
        or url.userinfo
        or url.query
        or url.fragment
        or (prefix and url.scheme not in _DEFAULT_PORTS)
        or (not prefix and url.raw_path != b"/")
        or not _HOST_NAME.fullmatch(url.raw_host)
    ):
        raise ValueError(f"allowed: {entry!r} is not a URL prefix or host pattern")
    if not prefix:
        return _Rule(_host_of(url), wildcard, url.port)
    port = url.port or _DEFAULT_PORTS[url.scheme]
    path = url.raw_path.decode("ascii")
    return _Rule(_host_of(url), False, port, url.scheme, None if path == "/" else path)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


async def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver (asyncio's getaddrinfo), TCP addresses in the order it gives."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class EgressGuard:
    """The connections of one operation: the clients it makes check every request against
    `policy`, and send it to the address checked.

    The addresses a host resolves to are remembered for the guard's life (one operation: a
    few seconds), so its requests agree on where the host is. A library that sends requests
    from tasks of its own may only log what they raise (the MCP SDK's SSE transport does, then
    waits for an answer that never comes): `refused` keeps the first refusal, and
    `on_refused` is called at that moment, so that its caller can stop waiting."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        resolve: Resolver = resolve_host,
        ssl_context: ssl.SSLContext | None = None,
        on_refused: Callable[[], object] | None = None,
    ) -> None:
        self.policy = policy
        self.refused: EgressRefused | None = None
        self._on_refused = on_refused
        self._resolve = resolve
        self._ssl_context = ssl_context
        self._addresses: dict[tuple[str, int], list[str]] = {}

    async def check(self, url: str) -> None:
        """Refuse `url` now (EgressRefused) unless it is allowed and every address of its host
        may be reached; an OSError when its host does not resolve. Its clients then meet the
        same answer without asking the resolver again."""
        import httpx2

        try:
            parsed = httpx2.URL(url)
        except httpx2.InvalidURL:
            raise self._refuse("the URL is not valid") from None
        await self._addresses_of(parsed)

    def client(
        self, *, headers: Mapping[str, str] | None = None, timeout: httpx2.Timeout
    ) -> httpx2.AsyncClient:
        """An httpx2 client whose every request passes this guard. Redirects are not followed
        unless a request asks, and then each hop is checked like the first."""
        import httpx2

        return httpx2.AsyncClient(
            headers=headers,
            timeout=timeout,
            transport=_transport_class()(self),
            trust_env=False,
        )

    def _refuse(self, reason: str, url: httpx2.URL | None = None) -> EgressRefused:
        if url is not None and url.scheme and url.raw_host:
            origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        else:
            origin = "that URL"
        refused = EgressRefused(f"Relay may not connect to {origin}: {reason}")
        if self.refused is None:
            self.refused = refused
            if self._on_refused is not None:
                self._on_refused()
        return refused

    async def _addresses_of(self, url: httpx2.URL) -> list[str]:
        if not self.policy._permits(url):
            raise self._refuse("it is not on the allow list", url)
        host = url.raw_host.decode("ascii")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        known = self._addresses.get((host, port))
        if known is not None:
            return known
        addresses = await self._resolve(host, port)
        if not addresses:
            raise OSError(f"{host} has no address")
        for text in addresses:
            # A private address is not named: that would map the private network for the client.
            if not self.policy._reachable(ipaddress.ip_address(text)):
                raise self._refuse("it resolves to an address that is not public", url)
        self._addresses[(host, port)] = addresses
        return addresses


@functools.cache
def _transport_class() -> Callable[[EgressGuard], httpx2.AsyncBaseTransport]:
    """The guard's transport, defined on first use (it subclasses httpx2's)."""
    import httpx2

    class GuardedTransport(httpx2.AsyncBaseTransport):
        """Sends each request to a checked address of its host. One connection pool per host
        name, so that a TLS connection verified for one name never carries another's requests
        (two names may share an address)."""

        def __init__(self, guard: EgressGuard) -> None:
            self._guard = guard
            self._pools: dict[str, httpx2.AsyncHTTPTransport] = {}

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            url = request.url
            addresses = await self._guard._addresses_of(url)
            host = url.raw_host.decode("ascii")
            pool = self._pools.get(host)
            if pool is None:
                verify = self._guard._ssl_context or True
                pool = self._pools[host] = httpx2.AsyncHTTPTransport(verify=verify, trust_env=False)
            extensions = dict(request.extensions)
            if url.scheme == "https":
                extensions["sni_hostname"] = host

            # Host names the URL's host, whatever a caller's headers said: another name would
            # reach another virtual host behind the checked address.
            headers = request.headers.copy()
            headers["Host"] = url.netloc.decode("ascii")

            def to(address: str) -> httpx2.Request:
                return httpx2.Request(
                    request.method,
                    url.copy_with(host=address),
                    headers=headers,
                    stream=request.stream,
                    extensions=extensions,
                )

            for address in addresses[:-1]:
                try:
                    return await pool.handle_async_request(to(address))
                except httpx2.ConnectError:
                    continue  # nothing was sent: the next address (IPv4 after IPv6 failed)
            return await pool.handle_async_request(to(addresses[-1]))

        async def aclose(self) -> None:
            for pool in self._pools.values():
                await pool.aclose()

    return GuardedTransport
