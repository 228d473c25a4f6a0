"""Settings come from IMAGEGEN_* variables; a bad one is named in the error."""

from __future__ import annotations

import pytest

from imagegen.infra.settings import as_environment, load_settings
from imagegen.schemas.errors import ConfigError


def test_defaults_point_at_the_local_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IMAGEGEN_KAFKA_BOOTSTRAP", "IMAGEGEN_S3_ENDPOINT", "IMAGEGEN_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.s3_endpoint == "127.0.0.1:9000"
    assert settings.s3_bucket == "images"
    assert settings.kafka_security() == {"security.protocol": "PLAINTEXT"}


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_KAFKA_BOOTSTRAP", "kafka-1:9093,kafka-2:9093")
    monkeypatch.setenv("IMAGEGEN_S3_SECURE", "true")
    monkeypatch.setenv("IMAGEGEN_S3_BUCKET", "renders")
    settings = load_settings()
    assert settings.kafka_bootstrap == "kafka-1:9093,kafka-2:9093"
    assert settings.s3_secure is True
    assert settings.s3_bucket == "renders"


def test_sasl_and_tls_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("IMAGEGEN_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("IMAGEGEN_KAFKA_SASL_USERNAME", "svc-imagegen")
    monkeypatch.setenv("IMAGEGEN_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("IMAGEGEN_KAFKA_SSL_CA_LOCATION", "/etc/ssl/kafka-ca.pem")
    assert load_settings().kafka_security() == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc-imagegen",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
    }


def test_sasl_without_credentials_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="IMAGEGEN_KAFKA_SASL_USERNAME"):
        load_settings().kafka_security()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IMAGEGEN_KAFKA_BOOTSTRAP", "no-port"),
        ("IMAGEGEN_KAFKA_BOOTSTRAP", "host:99999"),
        ("IMAGEGEN_S3_ENDPOINT", "http://minio:9000"),
        ("IMAGEGEN_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("IMAGEGEN_KAFKA_SESSION_TIMEOUT_MS", "soon"),
        ("IMAGEGEN_S3_SECURE", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_the_environment_form_loads_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    original = load_settings(
        kafka_bootstrap="10.0.0.1:9092,10.0.0.2:9092",
        kafka_sasl_password="s3cret",
        s3_secure=True,
        rate_user_overrides={"gold": {"per_s": 20, "burst": 50}},
        dedupe_window_s=3.5,
    )
    for name, value in as_environment(original).items():
        monkeypatch.setenv(name, value)
    assert load_settings() == original
