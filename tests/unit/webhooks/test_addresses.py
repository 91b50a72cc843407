"""The address rule (app/outbound/addresses.py) and the signature, as pure code."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket

import pytest

from app.outbound.addresses import AddressRefused, AllowEntry, AllowList, check_url, parse_url, refusal
from app.webhooks.delivery import sign


def resolver(table: dict[str, list[str]]):
    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]

    return getaddrinfo


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("::ffff:127.0.0.1", "IPv6 form of 127.0.0.1, a loopback"),
        ("::ffff:10.0.0.1", "IPv6 form of 10.0.0.1, a private"),
        ("64:ff9b::a9fe:a9fe", "IPv6 form of 169.254.169.254, a link-local"),  # NAT64
        ("2002:c0a8:0101::1", "IPv6 form of 192.168.1.1, a private"),  # 6to4
        ("::7f00:1", "IPv6 form of 127.0.0.1"),  # IPv4-compatible
    ],
)
def test_inside_addresses_are_refused_with_their_kind(address, kind):
    assert kind in refusal(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:93.184.216.34"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/", "http or https"),
        ("javascript:alert(1)", "http or https"),
        ("http://u:p@example.com/", "credentials"),
        ("http://@example.com/", "credentials"),
        ("http:///path", "must name a host"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com\\@10.0.0.1/", "backslash"),
        ("http://" + "a" * 2100 + ".com/", "at most"),
    ],
)
def test_malformed_urls_are_refused_before_any_lookup(url, words):
    with pytest.raises(AddressRefused, match=words):
        parse_url(url)


def test_every_resolved_address_must_pass_and_is_returned_for_pinning():
    dns = resolver({"ok.test": ["93.184.216.34", "8.8.8.8"], "mixed.test": ["93.184.216.34", "10.1.1.1"]})
    checked = check_url("https://OK.test./a?b=1", resolver=dns)
    assert checked.host == "ok.test" and checked.port == 443 and checked.target == "/a?b=1"
    assert [str(a) for a in checked.addresses] == ["93.184.216.34", "8.8.8.8"]
    with pytest.raises(AddressRefused, match="resolves to 10.1.1.1, a private"):
        check_url("https://mixed.test/", resolver=dns)
    with pytest.raises(AddressRefused, match="does not resolve"):
        check_url("https://missing.test/", resolver=dns)


def test_allow_list_entries_cover_a_network_or_a_host_and_optionally_one_port():
    dns = resolver({"hooks.internal": ["10.2.3.4"], "other.internal": ["10.2.3.4"]})
    by_network = AllowList((AllowEntry(network=ipaddress.ip_network("10.2.0.0/16")),))
    assert check_url("http://hooks.internal/", allow=by_network, resolver=dns)
    by_port = AllowList((AllowEntry(network=ipaddress.ip_network("127.0.0.1/32"), port=8080),))
    assert check_url("http://127.0.0.1:8080/", allow=by_port)
    with pytest.raises(AddressRefused):
        check_url("http://127.0.0.1:8081/", allow=by_port)
    by_host = AllowList((AllowEntry(host="hooks.internal"),))
    assert check_url("http://hooks.internal:9000/", allow=by_host, resolver=dns)
    with pytest.raises(AddressRefused):
        check_url("http://other.internal/", allow=by_host, resolver=dns)
    # An IPv4 network does not silently cover the IPv6-mapped spelling of its addresses.
    with pytest.raises(AddressRefused):
        check_url("http://[::ffff:127.0.0.1]:8080/", allow=by_port)


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"event":"completed"}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("s3cret", 1700000000, body) == f"sha256={expected}"
