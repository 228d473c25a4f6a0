"""Where a webhook may go: the deliverer's guard against server-side request forgery.

A job's `webhook_url` is the user's input, and the deliverer runs inside the operator's
network: unguarded, it would POST wherever a user points it (the cloud's metadata service,
an admin port on localhost, a database in the private range). So a URL is checked twice:

- `check_url`, syntax only (no DNS): https, a host, no user:password, no odd host forms;
- `resolve`, on every attempt: the name's addresses, every one of which must be public. The
  sender then connects to one of these addresses, never to the name again, so a name that
  answers differently a moment later (DNS rebinding) cannot move the connection.

The two failures differ on purpose. `WebhookTargetRefused` is permanent: the same URL is
refused the same way tomorrow, so its delivery is dead-lettered at once. A
`WebhookTargetUnresolvable` name may resolve later (a DNS outage, a record not yet
published), so its delivery is retried like any failed one.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit

from imagegen.schemas.errors import ImagegenError

MAX_URL_LENGTH: Final = 2048
ALLOW_PRIVATE: Final = "IMAGEGEN_WEBHOOK_ALLOW_PRIVATE"
DEFAULT_PORTS: Final = {"https": 443, "http": 80}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Spaces and control characters anywhere: urlsplit silently drops tabs and newlines, so the
# URL checked could differ from the URL the user wrote.
_UNSAFE_CHARACTERS: Final = re.compile(r"[\x00-\x20\x7f-\x9f]")
# One label of a DNS name, in its ASCII (IDNA) form. Underscores appear in real records.
_LABEL: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# IPv4 written as anything but dotted decimal ("2130706433", "0x7f.1", "127.1"): resolvers
# read these as addresses, so they are refused rather than resolved as names.
_NUMERIC_LABEL: Final = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
# Networks that embed an IPv4 address in their last 32 bits: IPv4-compatible (::/96,
# deprecated) and the NAT64 well-known prefix. A private IPv4 address inside one is private.
_EMBEDDING_LAST_32_BITS: Final = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)
_SITE_LOCAL: Final = ipaddress.IPv6Network("fec0::/10")


class WebhookTargetError(ImagegenError, ValueError):
    """A webhook URL that cannot be delivered to now; see the two subclasses."""


class WebhookTargetRefused(WebhookTargetError):
    """A URL that is never delivered to: its syntax, or an address it resolves to. Retrying
    gives the same answer, so the delivery is dead-lettered at once."""


class WebhookTargetUnresolvable(WebhookTargetError):
    """A name that does not resolve now; it may later, so the delivery is retried."""

    transient = True


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the vetted addresses to connect to (in the resolver's order)."""

    url: str
    scheme: str
    #: Lowercase, in its ASCII (IDNA) form; an IPv6 literal without its brackets.
    host: str
    port: int
    #: "/" at least; the query, if any, after "?". No fragment: it is never sent.
    path_and_query: str
    addresses: tuple[str, ...]

    @property
    def origin(self) -> str:
        """scheme://host:port: what an error message may show of the URL (the path and
        query may hold the receiver's secrets)."""
        return f"{self.scheme}://{_bracketed(self.host)}:{self.port}"


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a webhook URL by its syntax alone (no DNS): `WebhookTargetRefused` says why."""
    _checked(url, allow_private)


def resolve(url: str, allow_private: bool) -> WebhookTarget:
    """`check_url`, then the host's addresses, each of which must be public unless
    `allow_private`. Raises `WebhookTargetRefused` (never deliverable) or
    `WebhookTargetUnresolvable` (the name does not resolve now: retry later)."""
    parts = _checked(url, allow_private)
    scheme, host, port = _origin_of(parts)
    literal = _ip_literal(host)
    addresses = (literal,) if literal is not None else _lookup(host, port)
    if not allow_private:
        for address in addresses:
            _refuse_unless_public(ipaddress.ip_address(address), host)
    path = parts.path or "/"
    return WebhookTarget(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        path_and_query=f"{path}?{parts.query}" if parts.query else path,
        addresses=tuple(str(address) for address in addresses),
    )


def is_public(address: IPAddress) -> bool:
    """Whether `address` is reachable on the public internet, and nothing else: not
    loopback, private, link-local (169.254.169.254, the metadata service), CGNAT, multicast,
    unspecified or reserved, also not in a form that embeds such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded)
        if address in _SITE_LOCAL:
            return False
    # is_global alone is not enough on every Python: 3.11 calls multicast global.
    return address.is_global and not (
        address.is_multicast
        or address.is_reserved
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_private
    )


def _checked(url: str, allow_private: bool) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookTargetRefused(
            f"the webhook URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are allowed"
        )
    if _UNSAFE_CHARACTERS.search(url):
        raise WebhookTargetRefused(
            "the webhook URL contains spaces or control characters; percent-encode them"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port raises for a malformed one)
    except ValueError as exc:
        raise WebhookTargetRefused(f"the webhook URL does not parse: {exc}") from None
    _check_scheme(parts.scheme, allow_private)
    if "@" in parts.netloc:
        raise WebhookTargetRefused(
            "the webhook URL carries a user name or password (user:pass@host); "
            "receivers authenticate deliveries by their signature instead"
        )
    if parts.port == 0:
        raise WebhookTargetRefused("the webhook URL's port is 0; name a port from 1 to 65535")
    _, host, _ = _origin_of(parts)
    _check_host(host)
    literal = _ip_literal(host)
    if literal is not None and not allow_private:
        _refuse_unless_public(literal, host)
    return parts


def _check_scheme(scheme: str, allow_private: bool) -> None:
    if scheme == "https":
        return
    if scheme == "http":
        if allow_private:
            return
        raise WebhookTargetRefused(
            f"the webhook URL is plain http; use https (http is accepted only with "
            f"{ALLOW_PRIVATE}=true, for test and private deployments)"
        )
    raise WebhookTargetRefused(
        f"the webhook URL's scheme is {scheme or 'missing'!r}; use an https:// URL"
    )


def _origin_of(parts: SplitResult) -> tuple[str, str, int]:
    host = _ascii_host(parts.hostname or "")
    return parts.scheme, host, parts.port or DEFAULT_PORTS[parts.scheme]


def _ascii_host(host: str) -> str:
    """The host in the form DNS and TLS use: IDNA for an internationalised name, the
    canonical text of an IP address."""
    literal = _ip_literal(host)
    if literal is not None:
        return str(literal)
    if host.isascii():
        return host.lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise WebhookTargetRefused(
            "the webhook URL's host is not a valid internationalised domain name"
        ) from None


def _check_host(host: str) -> None:
    if not host:
        raise WebhookTargetRefused("the webhook URL has no host; write https://host/path")
    if _ip_literal(host) is not None:
        return
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise WebhookTargetRefused(
            f"the webhook URL's host {host!r} is neither a DNS name nor an IP address"
        )
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise WebhookTargetRefused(
            f"the webhook URL's host {host!r} looks like an IPv4 address in a non-standard "
            "form; write IPv4 addresses as four decimal numbers (203.0.113.7)"
        )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _lookup(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise WebhookTargetUnresolvable(
            f"the webhook URL's host {host!r} does not resolve ({exc}); "
            "the delivery is retried, so check the name's DNS records"
        ) from None
    # Deduplicated in the resolver's order, which the sender tries in turn.
    addresses = tuple(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))
    if not addresses:
        raise WebhookTargetUnresolvable(f"the webhook URL's host {host!r} has no addresses")
    return addresses


def _refuse_unless_public(address: IPAddress, host: str) -> None:
    if is_public(address):
        return
    via = "" if str(address) == host else f" (which {host!r} resolves to)"
    raise WebhookTargetRefused(
        f"the webhook URL points at {address}{via}, which is not a public address "
        f"(loopback, private, link-local or otherwise reserved); deliveries go only to public "
        f"addresses unless {ALLOW_PRIVATE}=true"
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _EMBEDDING_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
