"""Signing and verifying webhooks as the Standard Webhooks spec (standardwebhooks.com) says.

A delivery carries three headers: `webhook-id` (the same on every attempt, so a receiver can
drop repeats), `webhook-timestamp` (integer Unix seconds of this attempt) and
`webhook-signature`: one or more space-separated `v1,<signature>`, where a signature is the
standard base64 of HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>"). A secret is
`whsec_` and the base64 of the key. While a user's secret is being rotated a delivery carries
one signature per secret, so a receiver holding either keeps verifying.

The standard library only: receivers import this module, and should need nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

SECRET_PREFIX: Final = "whsec_"
ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"
#: The spec's recommended window, either way: wide enough for clock skew and a slow network,
#: short enough that a captured delivery cannot be replayed later.
DEFAULT_TOLERANCE_S: Final = 300
_VERSION: Final = "v1"


class WebhookVerificationError(ValueError):
    """A delivery that is not proven to come from the sender, unchanged and recent: answer
    it with a 4xx and do not act on it."""


def sign(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: one `v1,<signature>` per secret, in order."""
    if not secrets:
        raise ValueError("sign() needs at least one secret (whsec_...)")
    content = _signed_content(webhook_id, str(timestamp), body)
    return " ".join(f"{_VERSION},{_signature(_key(secret), content)}" for secret in secrets)


def signed_headers(
    secrets: Sequence[str], webhook_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The three headers of one attempt at sending `body`, timestamped `now` (default: the
    clock's time)."""
    timestamp = int(time.time() if now is None else now)
    return {
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secrets, webhook_id, timestamp, body),
    }


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """The parsed JSON body of a delivery whose signature matches `secret` and whose
    timestamp is within `tolerance_s` of `now` (default: the clock's time), either way.

    `body` must be the raw bytes received: parsing and serialising JSON again changes them.
    Header names are matched whatever their case. Raises `WebhookVerificationError`, saying
    which check failed, for anything else; a malformed `secret` is the caller's error, a
    plain `ValueError`.
    """
    key = _key(secret)
    raw = body.encode() if isinstance(body, str) else body
    lowered = {name.lower(): value for name, value in headers.items()}
    webhook_id, timestamp, signatures = (
        _header(lowered, name) for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    )
    _check_timestamp(timestamp, tolerance_s, time.time() if now is None else now)
    # The timestamp as received, not as re-formatted: it is what the sender signed.
    expected = _signature(key, _signed_content(webhook_id, timestamp, raw)).encode()
    offered = [
        given.encode(errors="replace")
        for version, _, given in (entry.partition(",") for entry in signatures.split())
        if version == _VERSION  # other schemes (v1a: asymmetric) are not ours to check
    ]
    # Every entry is compared, each in constant time, so timing tells nothing of which matched.
    matches = [hmac.compare_digest(expected, given) for given in offered]
    if not any(matches):
        raise WebhookVerificationError(
            f"no {_VERSION} signature matches this secret and body ({len(offered)} offered "
            f"in {SIGNATURE_HEADER}): check that the secret is this user's current one "
            "(`imagegen keys webhook-secret`) and that the body is the raw bytes received"
        )
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError
        raise WebhookVerificationError(
            f"the signature matches but the body is not JSON: {exc}"
        ) from exc


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise WebhookVerificationError(
            f"missing header {name}: not a signed webhook, or a proxy dropped the header"
        )
    return value


def _check_timestamp(timestamp: str, tolerance_s: int, now: float) -> None:
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise WebhookVerificationError(
            f"bad {TIMESTAMP_HEADER} {timestamp[:32]!r}: expected integer Unix seconds"
        )
    age = now - int(timestamp)
    if age > tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is too old: {age:.0f}s ago, more than the {tolerance_s}s "
            "tolerance (a replayed delivery, or this machine's clock is off)"
        )
    if -age > tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is too new: {-age:.0f}s in the future, more than the "
            f"{tolerance_s}s tolerance (this machine's clock, or the sender's, is off)"
        )


def _signed_content(webhook_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{webhook_id}.{timestamp}.".encode() + body


def _signature(key: bytes, content: bytes) -> str:
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def _key(secret: str) -> bytes:
    # Some receivers keep the secret without its prefix; the spec's libraries take both.
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        # Never echo the secret: this message may end up in a log.
        raise ValueError(
            f"a webhook secret is {SECRET_PREFIX} and standard base64, as "
            "`imagegen keys webhook-secret --user U` prints it; this one is not"
        )
    return key
