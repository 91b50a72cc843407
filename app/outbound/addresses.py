"""Which URLs the server may connect to on a user's behalf (SSRF guard).

A user-supplied URL is fetched by our own processes, inside our network. It must be http(s),
carry no credentials, and every address its host resolves to must be publicly routable: not
loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT), nor an IPv6
form that embeds one of those (IPv4-mapped, 6to4, Teredo, NAT64, IPv4-compatible). An admin
allow-list (`AllowList`) lifts the rule for chosen networks or host names, optionally one port.

Checking once is not enough: a name can resolve to a public address when the job is submitted
and to 127.0.0.1 when we deliver (DNS rebinding). So the check returns the addresses it
approved and callers connect to one of those (`CheckedURL.addresses`), re-checking at each use.

Pure code, no database: `check_url(url, allow=..., resolve=...)`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2048
SCHEMES = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


class AddressRefused(ValueError):
    """The URL may not be fetched; `reason` is a sentence fit for a 422 field error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AllowEntry:
    """A network (`10.0.0.0/8`, `127.0.0.1/32`) or a host name, optionally limited to one port."""

    network: Optional[IPNetwork] = None
    host: Optional[str] = None
    port: Optional[int] = None

    def covers(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host
        assert self.network is not None
        return address.version == self.network.version and address in self.network


@dataclass(frozen=True)
class AllowList:
    entries: tuple[AllowEntry, ...] = ()

    def covers(self, host: str, address: IPAddress, port: int) -> bool:
        return any(entry.covers(host, address, port) for entry in self.entries)


@dataclass(frozen=True)
class CheckedURL:
    url: str
    scheme: str
    host: str  # lower-case, IDNA-encoded, without brackets
    port: int
    target: str  # path + query, what goes on the request line
    addresses: tuple[IPAddress, ...] = field(default=())

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"


def parse_url(url: str) -> CheckedURL:
    """Syntax only (no DNS): scheme, credentials, host, port. Raises AddressRefused."""
    if len(url) > MAX_URL_CHARS:
        raise AddressRefused(f"must be at most {MAX_URL_CHARS} characters")
    if any(ord(c) <= 32 or ord(c) == 127 or c == "\\" for c in url):
        raise AddressRefused("must not contain whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise AddressRefused(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise AddressRefused("must be an http or https URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise AddressRefused("must not contain credentials (user:password@)")
    if not parts.hostname:
        raise AddressRefused("must name a host")
    host = parts.hostname.rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii") if not _is_ip_literal(host) else host
    except UnicodeError:
        raise AddressRefused("has a host name that is not valid") from None
    if port == 0:
        raise AddressRefused("must not use port 0")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return CheckedURL(url, scheme, host, port or SCHEMES[scheme], target)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def refusal(address: IPAddress) -> str | None:
    """What kind of non-public address `address` is ("a loopback address"), or None when public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = refusal(embedded)
            return f"an IPv6 form of {embedded}, {inner}" if inner else None
    checks = (
        ("is_unspecified", "an unspecified"),
        ("is_loopback", "a loopback"),
        ("is_link_local", "a link-local"),
        ("is_multicast", "a multicast"),
        ("is_reserved", "a reserved"),
        ("is_private", "a private"),
    )
    for attribute, kind in checks:
        if getattr(address, attribute):
            return f"{kind} address"
    if address.version == 4 and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        server, client = address.teredo
        return client if refusal(server) is None else server
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


Resolver = Callable[..., Iterable[tuple]]


def resolve(host: str, port: int, resolver: Resolver | None = None) -> tuple[IPAddress, ...]:
    """Every address `host` resolves to (TCP), in resolver order, without duplicates."""
    try:
        infos = (resolver or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise AddressRefused(f"host '{host}' does not resolve ({getattr(exc, 'strerror', None) or exc})") from None
    seen: list[IPAddress] = []
    for info in infos:
        sockaddr = info[4]
        # Scope ids ("fe80::1%eth0") only occur on link-local addresses, which are refused anyway.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    if not seen:
        raise AddressRefused(f"host '{host}' does not resolve")
    return tuple(seen)


def check_url(url: str, *, allow: AllowList | None = None, resolver: Resolver | None = None) -> CheckedURL:
    """Parse, resolve and check every address; returns the URL with the addresses to connect to.

    All addresses must pass (a name with one public and one private address is refused): the
    HTTP client could otherwise be steered to the private one.
    """
    parsed = parse_url(url)
    addresses = resolve(parsed.host, parsed.port, resolver)
    allow = allow or AllowList()
    for address in addresses:
        reason = refusal(address)
        if reason and not allow.covers(parsed.host, address, parsed.port):
            subject = f"{address} is" if _is_ip_literal(parsed.host) else f"host '{parsed.host}' resolves to {address},"
            raise AddressRefused(
                f"{subject} {reason}; only public addresses may be reached (an admin can allow-list a network or host)"
            )
    return CheckedURL(parsed.url, parsed.scheme, parsed.host, parsed.port, parsed.target, addresses)


def url_syntax(value: Optional[str]) -> Optional[str]:
    """A user-supplied URL's syntax (http(s), no credentials); where its host resolves (and the
    allow-list) is checked when it is used."""
    if value is not None:
        try:
            parse_url(value)
        except AddressRefused as exc:
            raise ValueError(exc.reason) from None
    return value
