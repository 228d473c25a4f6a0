"""Settings, read from `IMAGEGEN_*` environment variables.

One plain typed object: every process builds it once with `load_settings()` and passes it down.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from imagegen.schemas.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "text"]


def split_host_port(address: str, setting: str) -> tuple[str, int]:
    """Split "host:port", naming the setting when the address is malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{setting}={address!r} is not host:port (for example 127.0.0.1:9092)")
    return host, int(port)


class RateOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_s: float = Field(gt=0)
    burst: float = Field(ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="ignore", frozen=True)

    # Kafka. The security settings pass straight through to real clusters.
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_ssl_certificate_location: str | None = None
    kafka_ssl_key_location: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_session_timeout_ms: int = Field(default=45_000, ge=1_000)
    # The longest a consumer's fetch waits for records. Apache Kafka answers a waiting fetch
    # as soon as records arrive, so there this only paces idle fetches; some brokers (Tansu,
    # the embedded one) answer only when the wait ends, and then it adds to every hop:
    # set 10 for them (the tests, benchmarks and demo do).
    kafka_fetch_wait_ms: int = Field(default=100, ge=0, le=60_000)
    # -1 lets the cluster pick its default.replication.factor.
    topic_replication_factor: int = Field(default=-1, ge=-1)

    # Object store (MinIO or any S3).
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: SecretStr = SecretStr("minioadmin")
    s3_bucket: str = "images"
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # Intake: dedupe memory and rate limits.
    dedupe_window_s: float = Field(default=86_400, gt=0)
    # Rates are in tokens a second, bursts (bucket sizes) in tokens. Tokens are cost units:
    # a request costs ceil(width * height * steps / (512 * 512 * 25)) tokens, at least 1,
    # so a 512x512, 25-step image is one. A user's burst is also the dearest request they
    # may make: one costing more is rejected `exceeds_burst`. The global bucket counts the
    # same units, shared out over the partitions of imagegen.requests.
    rate_user_per_s: float = Field(default=2.0, gt=0)
    rate_user_burst: float = Field(default=10.0, ge=1)
    rate_global_per_s: float = Field(default=200.0, gt=0)
    rate_global_burst: float = Field(default=400.0, ge=1)
    # Per-user tiers, in the same tokens: {"user_id": {"per_s": 20, "burst": 50}, ...}
    rate_user_overrides: dict[str, RateOverride] = Field(default_factory=dict)

    # Job lifecycle: a request without `expires_at` expires this long after `submitted_at`.
    # No render starts after a request's deadline; it is answered `expired` instead.
    default_ttl_s: float = Field(default=600.0, gt=0)

    # Render workers: attempts per request before it fails to the DLQ, and the first
    # retry's delay (doubling each time, with jitter).
    max_attempts: int = Field(default=3, ge=1)
    retry_base_delay_s: float = Field(default=0.5, gt=0)
    # How long a worker rides out an unreachable object store or broker (partitions paused,
    # retrying with backoff) before the requests it holds fail.
    outage_budget_s: float = Field(default=300.0, ge=0)

    # The key that signs the `replay.of` mark of `imagegen dlq replay`, shared by operators
    # and processors; without it no replay mark is trusted and `imagegen dlq replay` refuses.
    replay_key: SecretStr | None = None

    # Where `imagegen stack` keeps pid files and logs of the embedded stack, and workers
    # cache built models.
    state_dir: str = ".imagegen"

    # The HTTP gateway (`imagegen gateway`): where it listens, how long a submission waits
    # for the intake decision before it is answered 202 anyway, the largest request body,
    # and how long the presigned image URLs it hands out stay valid.
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_intake_wait_s: float = Field(default=5.0, gt=0, le=60)
    gateway_max_body_bytes: int = Field(default=65_536, ge=1_024)
    gateway_url_ttl_s: int = Field(default=600, ge=1, le=7 * 86_400)

    # Webhooks (`imagegen webhooks`). A failed delivery is retried for webhook_retry_s, at
    # first after webhook_first_retry_s, then after ten times as long each time, up to
    # 1,000 times as long; then it is dead-lettered. Private and loopback addresses (and
    # plain http) are refused unless webhook_allow_private: a job's URL is the user's
    # input, and the deliverer sits inside the network.
    webhook_retry_s: float = Field(default=86_400.0, gt=0)
    webhook_first_retry_s: float = Field(default=6.0, gt=0)
    webhook_allow_private: bool = False
    webhook_connect_timeout_s: float = Field(default=5.0, gt=0, le=60)
    webhook_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Deliveries in flight at once, and at most this many of them to one user's endpoints:
    # a slow endpoint holds its own user's share, never the others'.
    webhook_concurrency: int = Field(default=64, ge=1, le=1_024)
    webhook_concurrency_per_user: int = Field(default=4, ge=1)

    # Observability. A metrics port of 0 serves no metrics; each kind of process has its
    # own default port so that a processor and a worker can share a host.
    processor_metrics_port: int = Field(default=9464, ge=0, le=65535)
    worker_metrics_port: int = Field(default=9465, ge=0, le=65535)
    webhooks_metrics_port: int = Field(default=9466, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for address in value.split(","):
            split_host_port(address.strip(), "IMAGEGEN_KAFKA_BOOTSTRAP")
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_is_host_port(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(
                f"IMAGEGEN_S3_ENDPOINT={value!r} must be host:port without a scheme; "
                "set IMAGEGEN_S3_SECURE=true for https"
            )
        split_host_port(value, "IMAGEGEN_S3_ENDPOINT")
        return value

    def kafka_security(self) -> dict[str, str]:
        """librdkafka properties for the cluster's security settings."""
        config: dict[str, str] = {"security.protocol": self.kafka_security_protocol}
        uses_sasl = self.kafka_security_protocol.startswith("SASL")
        if uses_sasl:
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username):
                raise ConfigError(
                    f"IMAGEGEN_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                    "IMAGEGEN_KAFKA_SASL_MECHANISM, IMAGEGEN_KAFKA_SASL_USERNAME and "
                    "IMAGEGEN_KAFKA_SASL_PASSWORD"
                )
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
            config["sasl.username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        optional = {
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
            "ssl.key.password": (
                self.kafka_ssl_key_password.get_secret_value()
                if self.kafka_ssl_key_password
                else None
            ),
        }
        config.update({key: value for key, value in optional.items() if value is not None})
        return config


def as_environment(settings: Settings) -> dict[str, str]:
    """`settings` as `IMAGEGEN_*` variables, so that a child process loads the same ones."""
    dumped = settings.model_dump(mode="json")
    environment: dict[str, str] = {}
    for name, value in dumped.items():
        raw = getattr(settings, name)
        if raw is None:
            continue
        if isinstance(raw, SecretStr):
            text = raw.get_secret_value()  # model_dump masks secrets
        elif isinstance(value, dict | list):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        environment[f"IMAGEGEN_{name.upper()}"] = text
    return environment


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; `overrides` win over it. (They are `Any`:
    `Settings` validates them as it does the environment.)"""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(error["loc"], error["msg"]) for error in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None
    except SettingsError as exc:
        raise ConfigError(f"invalid settings: {exc} (this setting takes JSON)") from None


def _describe(location: tuple[int | str, ...], message: str) -> str:
    variable = f"IMAGEGEN_{str(location[0]).upper()}" if location else "settings"
    inside = ".".join(str(part) for part in location[1:])
    return f"{variable}: {inside + ': ' if inside else ''}{message}"
