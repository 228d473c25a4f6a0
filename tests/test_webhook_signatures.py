"""Webhook signatures (`imagegen.webhooks.signatures`), pure: no stack. Round trips, every way a
delivery can fail verification, rotation's two signatures, and vectors computed here with
hmac and base64 and taken from the Standard Webhooks spec, so that a receiver using any
Standard Webhooks library verifies what the deliverer signs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from imagegen.schemas import mint_secret
from imagegen.webhooks import WebhookVerificationError, sign, signed_headers, verify

NOW = 1_764_000_000.0
WEBHOOK_ID = "msg_" + "0123456789abcdef" * 2
BODY = json.dumps({"request_id": "01JD5Y3Z7V0000000000000000", "status": "succeeded"}).encode()


def headers_for(secret: str, body: bytes = BODY, at: float = NOW) -> dict[str, str]:
    return signed_headers([secret], WEBHOOK_ID, body, at)


def test_a_signed_delivery_verifies_and_returns_its_json_body() -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    assert headers.keys() == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == WEBHOOK_ID and headers["webhook-timestamp"] == "1764000000"
    assert verify(BODY, headers, secret, now=NOW) == json.loads(BODY)
    assert verify(BODY.decode(), headers, secret, now=NOW + 299) == json.loads(BODY)


def test_the_clock_is_the_default_time() -> None:
    secret = mint_secret()
    assert verify(BODY, signed_headers([secret], WEBHOOK_ID, BODY), secret) == json.loads(BODY)


def test_a_known_vector_computed_independently() -> None:
    key = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key).decode()
    content = f"{WEBHOOK_ID}.1764000000.".encode() + BODY
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    assert sign([secret], WEBHOOK_ID, 1764000000, BODY) == f"v1,{expected}"
    assert headers_for(secret)["webhook-signature"] == f"v1,{expected}"
    # A receiver that keeps the secret without its prefix verifies as well.
    assert verify(BODY, headers_for(secret), secret.removeprefix("whsec_"), now=NOW)


def test_the_example_of_the_standard_webhooks_spec() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign([secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == signature
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": signature,
    }
    assert verify(body, headers, secret, now=1614265330) == {"test": 2432232314}


def test_a_forged_signature_is_refused() -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    forged = base64.b64encode(b"\0" * 32).decode()
    for signature in (f"v1,{forged}", "v1,", "v1", "", "v2," + headers["webhook-signature"][3:]):
        with pytest.raises(WebhookVerificationError, match=r"no v1 signature|missing header"):
            verify(BODY, {**headers, "webhook-signature": signature}, secret, now=NOW)


def test_a_tampered_body_is_refused() -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    for body in (BODY + b" ", BODY.replace(b"succeeded", b"failed"), b"", json.dumps({}).encode()):
        with pytest.raises(WebhookVerificationError, match="no v1 signature matches"):
            verify(body, headers, secret, now=NOW)


def test_another_secret_is_refused() -> None:
    with pytest.raises(WebhookVerificationError, match="no v1 signature matches this secret"):
        verify(BODY, headers_for(mint_secret()), mint_secret(), now=NOW)


@pytest.mark.parametrize(
    ("changed", "value"), [("webhook-id", "msg_" + "f" * 32), ("webhook-timestamp", "1764000001")]
)
def test_the_id_and_timestamp_are_signed(changed: str, value: str) -> None:
    secret = mint_secret()
    headers = {**headers_for(secret), changed: value}
    with pytest.raises(WebhookVerificationError, match="no v1 signature matches"):
        verify(BODY, headers, secret, now=NOW)


@pytest.mark.parametrize(
    ("offset_s", "words"), [(301, "too old: 301s ago"), (-301, "too new: 301s in the future")]
)
def test_a_timestamp_beyond_the_tolerance_either_way_is_refused(offset_s: int, words: str) -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    assert verify(BODY, headers, secret, now=NOW + offset_s - offset_s // abs(offset_s))
    with pytest.raises(WebhookVerificationError, match=words):
        verify(BODY, headers, secret, now=NOW + offset_s)
    # A wider tolerance takes it.
    assert verify(BODY, headers, secret, tolerance_s=400, now=NOW + offset_s)


@pytest.mark.parametrize("timestamp", ["soon", "1764000000.5", "-1764000000", "١٧٦٤", " "])
def test_a_timestamp_that_is_not_integer_seconds_is_refused(timestamp: str) -> None:
    secret = mint_secret()
    headers = {**headers_for(secret), "webhook-timestamp": timestamp}
    with pytest.raises(WebhookVerificationError, match=r"bad webhook-timestamp|missing header"):
        verify(BODY, headers, secret, now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_named(missing: str) -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"missing header {missing}"):
        verify(BODY, headers, secret, now=NOW)


def test_one_signature_per_secret_and_either_secret_verifies() -> None:
    new, old = mint_secret(), mint_secret()
    headers = signed_headers([new, old], WEBHOOK_ID, BODY, NOW)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(entry.startswith("v1,") for entry in entries)
    assert entries[0] == sign([new], WEBHOOK_ID, int(NOW), BODY)
    assert entries[1] == sign([old], WEBHOOK_ID, int(NOW), BODY)
    # A receiver that still holds the old secret, one that has the new, during the grace.
    assert verify(BODY, headers, old, now=NOW) == verify(BODY, headers, new, now=NOW)
    with pytest.raises(WebhookVerificationError, match=r"\(2 offered in webhook-signature\)"):
        verify(BODY, headers, mint_secret(), now=NOW)


def test_other_schemes_in_the_signature_header_are_passed_over() -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    headers["webhook-signature"] = (
        "v1a,c29tZSBlZDI1NTE5IHNpZ25hdHVyZQ==  " + headers["webhook-signature"] + " v2,xyz"
    )
    assert verify(BODY, headers, secret, now=NOW) == json.loads(BODY)


class Headers(Mapping[str, str]):
    """Headers as a web framework hands them over: a Mapping of its own, names as sent."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_header_names_are_matched_whatever_their_case() -> None:
    secret = mint_secret()
    headers = headers_for(secret)
    for spell in (str.title, str.upper, lambda name: name.replace("webhook", "WebHook")):
        mixed = Headers({spell(name): value for name, value in headers.items()})
        assert verify(BODY, mixed, secret, now=NOW) == json.loads(BODY)


def test_a_signed_body_that_is_not_json_is_refused_after_the_signature() -> None:
    secret = mint_secret()
    body = b"\xff not json"
    with pytest.raises(WebhookVerificationError, match="signature matches but the body is not"):
        verify(body, headers_for(secret, body), secret, now=NOW)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_not base64!", "igk_abc"])
def test_a_malformed_secret_is_the_callers_error_and_is_not_echoed(secret: str) -> None:
    with pytest.raises(ValueError, match="whsec_ and standard base64") as caught:
        sign([secret], WEBHOOK_ID, int(NOW), BODY)
    assert not isinstance(caught.value, WebhookVerificationError)
    with pytest.raises(ValueError, match="whsec_ and standard base64"):
        verify(BODY, headers_for(mint_secret()), secret, now=NOW)
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(caught.value)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        sign([], WEBHOOK_ID, int(NOW), BODY)


def test_the_verification_error_is_a_value_error() -> None:
    assert issubclass(WebhookVerificationError, ValueError)


def test_receivers_import_only_the_standard_library() -> None:
    script = (
        "import sys; before = set(sys.modules); import imagegen.webhooks; "
        "print(*sorted(set(sys.modules) - before))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "imagegen.webhooks.signatures" in loaded
    foreign = [
        name
        for name in loaded
        if name.split(".")[0] not in sys.stdlib_module_names
        and name not in {"imagegen", "imagegen.webhooks", "imagegen.webhooks.signatures"}
    ]
    assert foreign == []
