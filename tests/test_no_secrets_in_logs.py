"""No log line, at any level, carries a credential or a signed URL.

Each test logs at debug through `configure_logging`, as the commands do, runs real code
against the real stack (urllib3 logs every request line at debug, query string and all), and
reads what reached stderr: the secret settings' values, the signature of every presigned URL
handed out, and any `X-Amz-Signature=` or `X-Amz-Credential=` value must not be there.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from confluent_kafka import KafkaException
from pydantic import SecretStr

from imagegen.cli.results import fetch
from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.logs import REDACTED, configure_logging, secrets_of
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, as_environment, load_settings
from imagegen.schemas import (
    GenerationResult,
    Status,
    WebhookSecretRecord,
    encode,
    mint_key,
    mint_secret,
    new_request_id,
)
from imagegen.schemas.errors import ConfigError
from imagegen.schemas.topics import RESULTS
from tests.conftest import settings_env
from tests.processes import Service

# Every secret setting, each with a value no other text could contain by chance; the
# password has characters a URL or a repr() would escape.
SECRETS = {
    "kafka_sasl_password": SecretStr("sasl-pass/word 'one'"),
    "kafka_ssl_key_password": SecretStr("ssl-key-pass-3f9a"),
    "replay_key": SecretStr("replay-key-7c21"),
}
SIGNED = re.compile(r"X-Amz-(?:Signature|Credential)=(?!\[redacted\])", re.IGNORECASE)


def with_secrets(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={**SECRETS, **changes})


def assert_clean(text: str, settings: Settings, *signatures: str) -> None:
    for secret in (*secrets_of(settings), *signatures):
        assert secret not in text, f"{secret!r} reached the logs"
    assert not SIGNED.search(text), SIGNED.search(text)


def signature_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]


# The redactor itself, without a stack.


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_and_signed_urls_are_scrubbed_from_every_part_of_a_line(
    root_logging: None, capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    settings = load_settings(s3_secret_key="s3-secret-a81b", log_format=log_format, **SECRETS)
    configure_logging(settings, "debug")
    log = logging.getLogger("test.redaction")
    password = "sasl-pass/word 'one'"
    url = (
        "http://127.0.0.1:9000/images/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIDEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )
    log.debug("connecting with %s and %r", password, {"password": password})
    log.debug("PUT %s", url)
    log.debug("Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/x, Signature=abc123")
    log.info("escaped in a URL: %s", "sasl-pass%2Fword%20%27one%27")
    try:
        raise RuntimeError("the store refused s3-secret-a81b")
    except RuntimeError:
        log.exception("writing k.png to bucket images failed")
    log.info("replay mark %s", "replay-key-7c21", stack_info=True)
    api_key = mint_key()
    log.warning("a client sent Authorization: Bearer %s", api_key)
    webhook_secret = mint_secret()
    log.warning("signing with %s", webhook_secret)
    log.warning(
        "a record %s", encode(WebhookSecretRecord.new(user_id="ann", secret=webhook_secret))
    )

    err = capsys.readouterr().err
    assert_clean(err, settings, "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")
    assert "abc123" not in err and "AKIDEXAMPLE" not in err
    assert api_key not in err and api_key[:-43] in err  # the key_id stays, the secret goes
    assert webhook_secret.removeprefix("whsec_") not in err
    assert f"whsec_{REDACTED}" in err
    # What is not secret stays readable.
    assert "bucket images failed" in err and "RuntimeError" in err and "X-Amz-Algorithm" in err
    assert err.count(REDACTED) >= 11


@pytest.mark.parametrize(
    "spelling",
    [
        lambda secret: secret,
        lambda secret: secret[:20],  # cut short, still secret
        lambda secret: secret.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"),
        lambda secret: repr({"secret": secret}),
        lambda secret: "whsec_" + secret[6:].replace("+", "-").replace("/", "_"),
    ],
)
def test_webhook_secrets_are_scrubbed_however_spelled(
    root_logging: None, capsys: pytest.CaptureFixture[str], spelling: Callable[[str], str]
) -> None:
    configure_logging(load_settings(), "debug")
    secret = mint_secret()
    written = spelling(secret)
    logging.getLogger("test.redaction").info("the secret is %s, as said", written)
    err = capsys.readouterr().err
    assert written.split("whsec_")[1][:8] not in err, err
    assert f"whsec_{REDACTED}" in err and "as said" in err


def test_settings_loading_says_nothing_secret(
    root_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(f"IMAGEGEN_{name.upper()}", value.get_secret_value())
    monkeypatch.setenv("IMAGEGEN_S3_SECRET_KEY", "s3-secret-a81b")
    settings = load_settings()
    configure_logging(settings, "debug")
    # A secret in the wrong variable: the error names the variable, never the value.
    monkeypatch.setenv("IMAGEGEN_KAFKA_SASL_MECHANISM", "hunter2-in-the-wrong-place")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "IMAGEGEN_KAFKA_SASL_MECHANISM" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    logging.getLogger("test.settings").debug("loaded %r", settings)
    assert_clean(capsys.readouterr().err, settings)


# Real clients against the real stack.


def test_the_object_store_at_debug_logs_no_signed_url(
    settings: Settings, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configured = with_secrets(settings)
    configure_logging(configured, "debug")
    store = ObjectStore(configured)
    key = f"test/redaction/{uuid.uuid4()}.png"
    assert store.put_if_absent(key, b"image", "image/png")  # a presigned PUT, through urllib3
    assert store.stat(key) is not None
    assert store.get(key) == b"image"
    url = store.presigned_url(key)

    err = capsys.readouterr().err
    # urllib3 did log the signed request line, and only its redacted form came out.
    assert re.search(
        rf"PUT /{configured.s3_bucket}/{re.escape(key)}\?\S*{re.escape(REDACTED)}", err
    )
    assert_clean(err, configured, signature_of(url))


def test_fetch_at_debug_logs_no_credentials(
    settings: Settings,
    root_logging: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    configured = with_secrets(settings)
    for name, value in as_environment(configured).items():  # `fetch` loads its own settings
        monkeypatch.setenv(name, value)
    request_id = new_request_id()
    key = f"v1/ann/{request_id}.png"
    ObjectStore(configured).put_if_absent(key, b"png bytes", "image/png")
    result = GenerationResult(
        request_id=request_id,
        user_id="ann",
        status=Status.SUCCEEDED,
        bucket=configured.s3_bucket,
        object_key=key,
        content_type="image/png",
        size_bytes=9,
        sha256="0" * 64,
        completed_at=datetime.now(UTC),
    )
    producer = make_producer(configured)
    producer.produce(RESULTS, key=result.kafka_key, value=encode(result))
    assert producer.flush(10) == 0
    capsys.readouterr()

    configure_logging(configured, "debug")
    fetch(request_id, tmp_path / "image.png")

    assert (tmp_path / "image.png").read_bytes() == b"png bytes"
    captured = capsys.readouterr()
    assert f'"GET /{configured.s3_bucket}/{key} ' in captured.err  # urllib3 logged at debug
    assert_clean(captured.err, configured)


def test_kafka_clients_with_a_sasl_password_log_none_of_it(
    settings: Settings, root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # The embedded broker speaks no SASL: the clients try, fail, and log all about it.
    configured = with_secrets(
        settings,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="ann",
    )
    configure_logging(configured, "debug")
    producer = make_producer(configured, debug="all")
    admin = make_admin(configured, debug="all")
    for client in (producer, admin):
        with pytest.raises(KafkaException):
            client.list_topics(timeout=2)
    producer.poll(0.5)
    admin.poll(0.5)

    err = capsys.readouterr().err
    assert "sasl" in err.lower()  # librdkafka did log its SASL settings and attempts
    assert_clean(err, configured)


def test_the_worker_starting_at_debug_logs_no_credentials(
    settings: Settings, tmp_path: Path
) -> None:
    configured = with_secrets(settings)
    env = {**settings_env(configured), "IMAGEGEN_LOG_LEVEL": "debug"}
    worker = Service(["worker", "--device", "cpu"], env, tmp_path / "worker.log")
    worker.start()
    try:
        deadline = time.monotonic() + 180
        while "serving" not in worker.log.read_text():
            worker.assert_running()
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        assert worker.stop() == 0
    text = worker.log.read_text()
    assert '"level": "debug"' in text
    assert_clean(text, configured)
