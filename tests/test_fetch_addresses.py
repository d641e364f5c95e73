"""The fetch tool's address rules: which URLs and addresses it refuses, and why."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from yanray.bot.tools.addresses import AddressRefused, AddressRules, check_url, refusal
from yanray.bot.tools.fetch import _CheckingResolver, _socket_guard

DEFAULT = AddressRules()

REFUSED_URLS = [
    # schemes and credentials
    ("ftp://example.org/file", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("gopher://example.org/", "only http and https"),
    ("javascript:alert(1)", "only http and https"),
    ("example.org/page", "only http and https"),
    ("http://user:secret@example.org/", "user name or password"),
    ("http://user@example.org/", "user name or password"),
    ("https://example.org@127.0.0.1/", "user name or password"),
    # ports
    ("http://example.org:8080/", "port 8080 is not allowed"),
    ("https://example.org:22/", "port 22 is not allowed"),
    ("http://example.org:99999/", "malformed"),
    # this machine by name
    ("http://localhost/", "this machine"),
    ("http://localhost./", "this machine"),
    ("http://LOCALHOST/", "this machine"),
    ("http://app.localhost/", "this machine"),
    # IP literals
    ("http://127.0.0.1/", "loopback"),
    ("http://127.1.2.3/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback address in IPv4-mapped form"),
    ("http://[::ffff:7f00:1]/", "loopback address in IPv4-mapped form"),
    ("http://[::127.0.0.1]/", "loopback"),
    ("http://0.0.0.0/", "'this network'"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.1/", "reserved"),
    # decimal, octal and hex hosts mean the address inet_aton reads
    ("http://2130706433/", "127.0.0.1 is a loopback"),
    ("http://0177.0.0.1/", "127.0.0.1 is a loopback"),
    ("http://0x7f.0.0.1/", "127.0.0.1 is a loopback"),
    ("http://0x7f000001/", "127.0.0.1 is a loopback"),
    ("http://127.1/", "127.0.0.1 is a loopback"),
    ("http://017700000001/", "127.0.0.1 is a loopback"),
    ("http://3232235777/", "192.168.1.1 is a private"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254 is a cloud metadata"),
    ("http://999.1.1.1/", "not a valid address"),
    # the IPv6 forms that carry a refused IPv4 address
    ("http://[::ffff:10.0.0.1]/", "private address in IPv4-mapped form"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata address in IPv4-mapped form"),
    ("http://[::10.0.0.1]/", "private address in IPv4-compatible form"),
    ("http://[2002:7f00:1::]/", "loopback address in 6to4 form"),
    ("http://[2002:a9fe:a9fe::1]/", "cloud metadata address in 6to4 form"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "loopback address in Teredo form"),
    ("http://[64:ff9b::7f00:1]/", "loopback address in NAT64 form"),
    ("http://[64:ff9b::a00:1]/", "private address in NAT64 form"),
    ("http://[64:ff9b:1::8.8.8.8]/", "NAT64"),
    ("http://[::8.8.8.8]/", "IPv4-compatible"),
    ("http://[fe80::1%25eth0]/", "with a zone"),
    ("http://exa mple.org/", "spaces"),
    ("http:///path", "no host"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED_URLS, ids=[u for u, _ in REFUSED_URLS])
def test_refused_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(AddressRefused) as caught:
        check_url(url, DEFAULT)
    message = str(caught.value)
    assert why in message and "\n" not in message


ALLOWED_URLS = [
    ("http://example.org/", "example.org", 80, None),
    ("https://example.org/a?b=c#d", "example.org", 443, None),
    ("HTTPS://Example.ORG./", "example.org", 443, None),
    ("http://93.184.216.34/", "93.184.216.34", 80, "93.184.216.34"),
    ("http://[2606:4700::1111]/", "2606:4700::1111", 80, "2606:4700::1111"),
    ("http://[::ffff:8.8.8.8]/", "::ffff:8.8.8.8", 80, "::ffff:808:808"),
    ("http://[64:ff9b::808:808]/", "64:ff9b::808:808", 80, "64:ff9b::808:808"),
    ("http://134744072/", "134744072", 80, "8.8.8.8"),  # decimal, normalised and checked
    ("http://0x08.0x08.0x08.0x08/", "0x08.0x08.0x08.0x08", 80, "8.8.8.8"),
    ("http://0.example.org/", "0.example.org", 80, None),  # a name, not a number
]


@pytest.mark.parametrize(("url", "host", "port", "literal"), ALLOWED_URLS, ids=[u[0] for u in ALLOWED_URLS])
def test_public_urls_pass(url: str, host: str, port: int, literal: str | None) -> None:
    target = check_url(url, DEFAULT)
    assert (target.host, target.port) == (host, port)
    assert target.literal == (ipaddress.ip_address(literal) if literal else None)


def test_the_allowance_and_ports_are_what_lets_a_test_server_through() -> None:
    url = "http://127.0.0.1:8123/page"
    with pytest.raises(AddressRefused, match="port 8123"):
        check_url(url, DEFAULT)
    with pytest.raises(AddressRefused, match="loopback"):
        check_url(url, AddressRules(ports=frozenset({8123})))
    allowed = AddressRules.from_settings([8123], ["127.0.0.1"])
    assert check_url(url, allowed).literal == ipaddress.ip_address("127.0.0.1")
    # only what was granted: the rest of loopback stays refused
    with pytest.raises(AddressRefused, match="loopback"):
        check_url("http://127.0.0.2:8123/", allowed)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:82a::200e", "2002:808:808::1"],
)
def test_public_addresses_are_not_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


async def test_a_name_that_resolves_to_loopback_is_refused_by_the_resolver() -> None:
    resolver = _CheckingResolver(DEFAULT)
    try:
        with pytest.raises(PermissionError, match="localhost resolves to .*, a loopback address"):
            await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
        allowed = _CheckingResolver(AddressRules(allow=(ipaddress.ip_network("127.0.0.0/8"),)))
        hosts = [r["host"] for r in await allowed.resolve("localhost", 80, socket.AF_INET)]
        assert hosts and all(ipaddress.ip_address(h).is_loopback for h in hosts)
        await allowed.close()
    finally:
        await resolver.close()


@pytest.mark.parametrize(
    ("family", "address"),
    [(socket.AF_INET, ("127.0.0.1", 80)), (socket.AF_INET6, ("::ffff:10.0.0.1", 80, 0, 0))],
)
def test_the_socket_guard_refuses_to_open_a_socket_to_a_refused_address(family: int, address: tuple) -> None:
    guard = _socket_guard(DEFAULT)
    with pytest.raises(OSError, match="is a"):
        guard((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address))
    sock = guard((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("8.8.8.8", 80)))
    sock.close()  # opened, never connected: no test reaches the internet
