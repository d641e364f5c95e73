"""Which URLs and addresses the `fetch` tool may reach: the SSRF rules, with no I/O.

`check_url` refuses before anything is resolved: a scheme other than http/https, userinfo
(credentials) in the URL, a port outside the allowed ones, and hosts that name this machine
(`localhost`, `*.localhost`, with or without the trailing dot). A numeric host in any of the
forms C's `inet_aton` accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`) is normalised to the
address it means, so it is checked like any other IP literal instead of slipping past as a
"name".

`refusal(address)` says why an address is refused, or None when it is public. IPv6 forms
that carry an IPv4 address (IPv4-mapped and -compatible, 6to4, Teredo, NAT64) are judged by
the IPv4 address inside them as well, because a dual-stack host or a translator would reach
that address. The `allow` networks (`YANRAY_FETCH_ALLOW`, a test-only allowance, empty by
default) pass despite the rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2000

#: refused outright, with the reason the model is told
_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("169.254.169.254/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("0.0.0.0/8", "a 'this network' address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT address"),
        ("169.254.0.0/16", "a link-local address"),
        ("192.0.0.0/24", "a reserved address"),
        ("192.0.2.0/24", "a reserved address"),
        ("198.18.0.0/15", "a reserved address"),
        ("198.51.100.0/24", "a reserved address"),
        ("203.0.113.0/24", "a reserved address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fc00::/7", "a private address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a reserved address"),
        ("ff00::/8", "a multicast address"),
        ("100::/64", "a reserved address"),
        ("2001:db8::/32", "a reserved address"),
    )
)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class AddressRefused(Exception):
    """A URL or address the fetch tool does not reach; the message is one line for the model."""


@dataclass(frozen=True)
class AddressRules:
    ports: frozenset[int] = frozenset({80, 443})
    #: networks allowed despite the rules (tests only; `YANRAY_FETCH_ALLOW`)
    allow: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def from_settings(cls, ports: Sequence[int], allow: Sequence[str]) -> AddressRules:
        return cls(ports=frozenset(ports), allow=tuple(ipaddress.ip_network(a, strict=False) for a in allow))

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` is refused, or None when it may be reached."""
        if any(address.version == net.version and address in net for net in self.allow):
            return None
        return refusal(address)

    def check(self, address: IPAddress) -> None:
        why = self.refusal(address)
        if why is not None:
            raise AddressRefused(f"{address} is {why}")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 form carries, and the form's name."""
    value = int(address)
    if address in _MAPPED:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF), "IPv4-mapped"
    if address in _COMPATIBLE:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF), "IPv4-compatible"
    if address in _NAT64 or address in _NAT64_LOCAL:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF), "NAT64"
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF), "6to4"
    if address in _TEREDO:
        return ipaddress.IPv4Address(~value & 0xFFFFFFFF), "Teredo"  # the client address, inverted
    return None


def refusal(address: IPAddress) -> str | None:
    """Why `address` is not public, or None (no allowance applied)."""
    for net, why in _REFUSED:
        if address.version == net.version and address in net:
            return why
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            ipv4, form = inner
            inner_why = refusal(ipv4)
            if inner_why is not None:
                return f"{inner_why} in {form} form"
            if address in _NAT64_LOCAL:  # local-use: where the IPv4 address sits varies
                return "a local-use NAT64 address"
            if form == "IPv4-compatible":
                return "a deprecated IPv4-compatible address"
            return None  # a public IPv4 address reached through a mapping or translator
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global and not (isinstance(address, ipaddress.IPv6Address) and address in _TEREDO):
        return "a reserved address"
    return None


def _numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address an `inet_aton`-style numeric host means (`2130706433`, `0177.1`, `0x7f.0.0.1`)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    numbers: list[int] = []
    for part in parts:
        text = part.lower()
        try:
            if text.startswith("0x"):
                number = int(text[2:] or "0", 16)
            elif len(text) > 1 and text.startswith("0"):
                number = int(text[1:], 8)
            elif text.isdigit():
                number = int(text)
            else:
                return None
        except ValueError:
            return None
        numbers.append(number)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        # not an address (e.g. 999.1.1.1); refused by the caller as a malformed numeric host
        raise AddressRefused(f"the host {host!r} is not a valid address")
    value = last
    for index, number in enumerate(head):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class Target:
    """A checked URL: its parts, and the IP literal its host is (None for a name)."""

    url: str
    scheme: str
    host: str
    port: int
    literal: IPAddress | None


def check_url(url: str, rules: AddressRules) -> Target:
    """The URL's target, or `AddressRefused` saying why it is not fetched."""
    if len(url) > MAX_URL_CHARS:
        raise AddressRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise AddressRefused("the URL contains spaces or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise AddressRefused(f"the URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise AddressRefused(
            f"only http and https URLs are fetched, not {scheme or 'a URL without a scheme'}"
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise AddressRefused("URLs with a user name or password are not fetched")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise AddressRefused("the URL has no host")
    port = port if port is not None else (443 if scheme == "https" else 80)
    if port not in rules.ports:
        raise AddressRefused(
            f"port {port} is not allowed (allowed: {', '.join(map(str, sorted(rules.ports)))})"
        )
    if host == "localhost" or host.endswith(".localhost"):
        raise AddressRefused(f"{host} is this machine")
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = _numeric_ipv4(host)
    if literal is not None:
        if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
            raise AddressRefused("IPv6 addresses with a zone are not fetched")
        rules.check(literal)
    return Target(url=url, scheme=scheme, host=host, port=port, literal=literal)
