"""The SSRF guard of webhook URLs: what is refused for good, what is retried, what passes.

IP literals need no DNS, so these run anywhere; `localhost` and `.invalid` (RFC 6761) are
answered by the machine's own resolver.
"""

from __future__ import annotations

import ipaddress

import pytest

from imagegen.infra.webhook_targets import (
    WebhookTargetError,
    WebhookTargetRefused,
    WebhookTargetUnresolvable,
    check_url,
    is_public,
    resolve,
)
from imagegen.schemas.errors import ImagegenError

PRIVATE_ADDRESSES = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # the cloud metadata service
    "100.64.0.1",  # CGNAT
    "0.0.0.0",
    "224.0.1.1",  # multicast, which Python 3.11 calls global
    "240.0.0.1",
    "255.255.255.255",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:169.254.169.254]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[64:ff9b::a00:1]",  # NAT64 of 10.0.0.1
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    "[fe80::1]",
    "[fc00::1]",
    "[fec0::1]",
    "[ff0e::1]",
    "[2001:db8::1]",
]


def test_a_public_https_url_resolves_to_itself() -> None:
    target = resolve("https://93.184.216.34/hooks/imagegen?token=abc#frag", False)
    assert target.scheme == "https"
    assert target.host == "93.184.216.34"
    assert target.port == 443
    assert target.path_and_query == "/hooks/imagegen?token=abc"
    assert target.addresses == ("93.184.216.34",)
    assert target.origin == "https://93.184.216.34:443"


def test_an_ipv6_literal_and_a_port_are_kept() -> None:
    target = resolve("https://[2606:4700:4700::1111]:8443", False)
    assert (target.host, target.port, target.path_and_query) == ("2606:4700:4700::1111", 8443, "/")
    assert target.origin == "https://[2606:4700:4700::1111]:8443"


def test_the_errors_are_project_errors_and_value_errors() -> None:
    for error in (WebhookTargetRefused, WebhookTargetUnresolvable):
        assert issubclass(error, WebhookTargetError)
        assert issubclass(error, ImagegenError) and issubclass(error, ValueError)
    assert WebhookTargetUnresolvable.transient and not WebhookTargetRefused.transient


def test_plain_http_is_refused_unless_private_targets_are_allowed() -> None:
    with pytest.raises(WebhookTargetRefused, match="IMAGEGEN_WEBHOOK_ALLOW_PRIVATE"):
        check_url("http://1.1.1.1/hook", False)
    check_url("http://1.1.1.1/hook", True)
    assert resolve("http://1.1.1.1/hook", True).port == 80


@pytest.mark.parametrize("url", ["ftp://1.1.1.1/", "1.1.1.1/hook", "javascript:alert(1)"])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetRefused, match="https"):
        check_url(url, True)


@pytest.mark.parametrize(
    "url", ["https://user:pass@1.1.1.1/", "https://user@1.1.1.1/", "https://1.1.1.1@10.0.0.1/"]
)
def test_userinfo_is_refused(url: str) -> None:
    with pytest.raises(WebhookTargetRefused, match="user name or password"):
        check_url(url, True)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https:///hook", "no host"),
        ("https://1.1.1.1:0/", "port"),
        ("https://1.1.1.1:99999/", "does not parse"),
        ("https://1.1.1.1/" + "a" * 2048, "2048"),
        ("https://exa\nmple.com/", "control characters"),
        ("https://ex ample.com/", "spaces"),
        ("https://exa$mple.com/", "neither a DNS name"),
        ("https://127.1/", "non-standard form"),
        ("https://2130706433/", "non-standard form"),
        ("https://0x7f.0.0.1/", "non-standard form"),
    ],
)
def test_malformed_urls_are_refused_by_syntax(url: str, why: str) -> None:
    with pytest.raises(WebhookTargetRefused, match=why):
        check_url(url, True)


@pytest.mark.parametrize("host", PRIVATE_ADDRESSES)
def test_non_public_ip_literals_are_refused_without_dns(host: str) -> None:
    url = f"https://{host}:8443/hook?token=s3cret"
    with pytest.raises(WebhookTargetRefused, match="IMAGEGEN_WEBHOOK_ALLOW_PRIVATE") as refused:
        check_url(url, False)
    assert "s3cret" not in str(refused.value) and "/hook" not in str(refused.value)
    with pytest.raises(WebhookTargetRefused):
        resolve(url, False)


def test_allow_private_accepts_loopback_by_address_and_by_name() -> None:
    assert resolve("https://127.0.0.1:9/x", True).addresses == ("127.0.0.1",)
    target = resolve("http://localhost:8080/x?y=1", True)
    assert target.host == "localhost" and target.addresses
    assert all(not is_public(ipaddress.ip_address(a)) for a in target.addresses)


def test_a_name_resolving_to_loopback_is_refused_after_dns() -> None:
    check_url("https://localhost/hook", False)  # the syntax is fine: only DNS tells
    with pytest.raises(WebhookTargetRefused, match="'localhost' resolves to"):
        resolve("https://localhost/hook", False)


def test_an_unresolvable_name_is_retryable_not_refused() -> None:
    with pytest.raises(WebhookTargetUnresolvable, match=r"no-such-host\.invalid") as failed:
        resolve("https://no-such-host.invalid/hook?token=s3cret", False)
    assert not isinstance(failed.value, WebhookTargetRefused)
    assert "s3cret" not in str(failed.value)


def test_hosts_are_normalised() -> None:
    assert resolve("https://[::FFFF:1.1.1.1]/", False).host == "::ffff:101:101"
    check_url("https://Hooks.Example.COM./x", False)
    check_url("https://bücher.example/x", False)


@pytest.mark.parametrize("address", ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
