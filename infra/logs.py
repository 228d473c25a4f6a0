"""Structured logs: one JSON object per line on stderr, or plain text for people.

Every line has `ts` (ISO-8601 UTC, milliseconds), `level`, `logger` and `message`, plus
`exception` (the formatted traceback) when the record carries one. Lines about a request
also carry what is known of `request_id`, `user_id`, `topic`, `partition`, `offset`,
`stage` and `trace_id`; a line about a whole batch carries `request_ids` instead.

Two ways to attach those fields, giving the same output:

- `log.info("...", extra={"request_id": rid})` for one call;
- `with log_context(request_id=rid, stage="render"):` for every line logged inside the
  block, by this thread or asyncio task (a context variable: a thread pool's threads do
  not inherit it, so bind it inside the work they run).

A call's `extra` wins over the context. `IMAGEGEN_LOG_FORMAT` picks `json` (the default)
or `text`, `IMAGEGEN_LOG_LEVEL` the level (`info`); a command's `--log-level` overrides
the latter.

- `configure_logging(settings, level=None)` sets up a plain process (the worker, tools).
- `logging_config(settings, level=None)` is the same as a `logging.config.dictConfig` dict,
  for `faust.Worker(app, loglevel=..., logging_config=...)`: mode's worker clears the root
  logger's handlers and applies that dict as it is, so faust's own lines come out in the
  same format.

No line carries a credential, at any level: both install `Redactor`, which scrubs every
secret setting's value and the signature and credential of presigned S3 URLs (urllib3 logs
each request line at debug, query string and all) before any line is formatted.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, get_args
from urllib.parse import quote

from pydantic import SecretStr

from imagegen.infra.settings import LogLevel, Settings
from imagegen.schemas.errors import ConfigError

CONTEXT_FIELDS = (
    "request_id",
    "request_ids",
    "user_id",
    "topic",
    "partition",
    "offset",
    "stage",
    "trace_id",
)
LEVELS: tuple[str, ...] = get_args(LogLevel)
REDACTED = "[redacted]"
# SigV4 query parameters of a presigned URL, and the same words in an Authorization header.
_SIGNED = re.compile(
    r"((?:X-Amz-)?(?:Signature|Credential|Security-Token)=)[^&\s,;\"'<>]+", re.IGNORECASE
)

# An API key's secret part; its key_id, public, stays readable (`imagegen.schemas.api_keys`).
_API_KEY_SECRET = re.compile(r"(igk_[a-z0-9]{12}_)[A-Za-z0-9_-]{43}")
# A webhook signing secret (`imagegen.schemas.webhook_secrets`), whole but its prefix. Any
# length, URL-safe letters and percent-escapes too: a secret cut short, or carried in a URL,
# is as secret.
_WEBHOOK_SECRET = re.compile(r"(whsec_)(?:[A-Za-z0-9+/_-]|%[0-9A-Fa-f]{2})+=*")

_context: ContextVar[Mapping[str, object]] = ContextVar(
    "imagegen_log_context", default=MappingProxyType({})
)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Attach `fields` (names from `CONTEXT_FIELDS`; None values are left out) to every
    line logged in the block."""
    unknown = fields.keys() - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"not log context fields: {', '.join(sorted(unknown))}")
    bound = {name: value for name, value in fields.items() if value is not None}
    token = _context.set({**_context.get(), **bound})
    try:
        yield
    finally:
        _context.reset(token)


def _context_of(record: logging.LogRecord) -> dict[str, object]:
    """The context fields of `record`: the bound context, overridden by the call's extra."""
    fields = dict(_context.get())
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field holding something exotic must not cost the line.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [field=value ...]`, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _context_of(record)
        if not fields:
            return text
        return f"{text} [{' '.join(f'{name}={value}' for name, value in fields.items())}]"


class Redactor(logging.Filter):
    """Replaces `secrets`, the signature and credential of signed URLs, the secret part of
    API keys and webhook signing secrets, in each record's message, traceback and stack with
    `REDACTED`.

    A handler's filter, not a logger's: it then sees every record the handler writes,
    whichever library's logger it comes from.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Each as written, as a URL carries it, and as repr() shows it inside a message.
        spellings = {
            spelling
            for secret in secrets
            if secret
            for spelling in (secret, quote(secret, safe=""), repr(secret)[1:-1])
        }
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted(spellings, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _API_KEY_SECRET.sub(rf"\1{REDACTED}", text)
        text = _WEBHOOK_SECRET.sub(rf"\1{REDACTED}", text)
        return _SIGNED.sub(rf"\1{REDACTED}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: no reason to raise
            message = f"{record.msg} {record.args}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info:
            # Formatted here, so that the handler's formatter prints the redacted text.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def secrets_of(settings: Settings) -> list[str]:
    """The values of every secret setting that is set."""
    values = (getattr(settings, name) for name in type(settings).model_fields)
    return [value.get_secret_value() for value in values if isinstance(value, SecretStr)]


def logging_config(settings: Settings, level: str | None = None) -> dict[str, Any]:
    """A `dictConfig` dict: the root logger at `level` (default: the settings' level),
    writing to stderr in the settings' format, through a `Redactor` of its secrets."""
    formatter = JsonFormatter if settings.log_format == "json" else TextFormatter
    return {
        "version": 1,
        # Module loggers exist from import time on; dictConfig would silence them.
        "disable_existing_loggers": False,
        "formatters": {"imagegen": {"()": formatter}},
        "filters": {"redact": {"()": Redactor, "secrets": secrets_of(settings)}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "imagegen",
                "filters": ["redact"],
            }
        },
        "root": {"level": _level(level or settings.log_level), "handlers": ["stderr"]},
    }


def configure_logging(settings: Settings, level: str | None = None) -> None:
    """Log as the settings say, at `level` when given (a command's --log-level)."""
    logging.config.dictConfig(logging_config(settings, level))
    # Libraries' warnings (deprecations, for one) become log lines in the same format
    # instead of free text between them.
    logging.captureWarnings(True)


def _level(name: str) -> str:
    if name.lower() not in LEVELS:
        raise ConfigError(f"log level {name!r} is not one of {', '.join(LEVELS)}")
    return name.upper()
