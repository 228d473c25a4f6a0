"""Dead letters: a failed message's original key and value, unchanged, plus its context.

The context travels in `dlq.*` headers so that the value stays byte-for-byte what the producer
sent. The message's other headers are kept too, so a replay restores them.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Self

from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import utc_now

Headers = list[tuple[str, bytes]]

PREFIX = "dlq."
#: The end of a stack trace holds the frames that matter; keep that end.
MAX_STACKTRACE_CHARS = 8 * 1024
MAX_MESSAGE_CHARS = 2 * 1024


class Stage(StrEnum):
    """Where in the pipeline the message failed."""

    VALIDATE = "validate"
    DEDUPE = "dedupe"
    RATELIMIT = "ratelimit"
    RENDER = "render"
    STORE = "store"
    PUBLISH = "publish"


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return "[...truncated]\n" + text[-limit:]


def _head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...truncated]"


@dataclass(frozen=True)
class DeadLetter:
    """One entry of `imagegen.dlq`. Build it with `from_failure`, read it with `from_kafka`."""

    key: bytes | None
    value: bytes | None
    original_topic: str
    original_partition: int
    original_offset: int
    original_timestamp_ms: int | None
    error_class: str
    error_message: str
    error_stacktrace: str
    stage: Stage
    attempts: int
    group: str
    failed_at: datetime
    original_headers: Headers = field(default_factory=list)

    @classmethod
    def from_failure(
        cls,
        *,
        error: BaseException,
        stage: Stage,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
        attempts: int,
        group: str,
    ) -> Self:
        stack = "".join(traceback.format_exception(error))
        return cls(
            key=key,
            value=value,
            original_topic=topic,
            original_partition=partition,
            original_offset=offset,
            original_timestamp_ms=timestamp_ms,
            error_class=f"{type(error).__module__}.{type(error).__qualname__}",
            error_message=_head(str(error), MAX_MESSAGE_CHARS),
            error_stacktrace=_tail(stack, MAX_STACKTRACE_CHARS),
            stage=stage,
            attempts=attempts,
            group=group,
            failed_at=utc_now(),
            original_headers=[
                (name, data or b"") for name, data in (headers or []) if not name.startswith(PREFIX)
            ],
        )

    def headers(self) -> Headers:
        context = {
            "original.topic": self.original_topic,
            "original.partition": str(self.original_partition),
            "original.offset": str(self.original_offset),
            "original.timestamp": (
                "" if self.original_timestamp_ms is None else str(self.original_timestamp_ms)
            ),
            "error.class": self.error_class,
            "error.message": self.error_message,
            "error.stacktrace": self.error_stacktrace,
            "stage": self.stage.value,
            "attempts": str(self.attempts),
            "group": self.group,
            "failed.at": self.failed_at.isoformat(),
        }
        ours = [(PREFIX + name, text.encode()) for name, text in context.items()]
        return [*self.original_headers, *ours]

    @classmethod
    def from_kafka(
        cls,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
    ) -> Self:
        """Read a dead letter back from a consumed `imagegen.dlq` record."""
        context: dict[str, str] = {}
        kept: Headers = []
        for name, data in headers or []:
            if name.startswith(PREFIX):
                context[name.removeprefix(PREFIX)] = (data or b"").decode(errors="replace")
            else:
                kept.append((name, data or b""))
        try:
            timestamp = context["original.timestamp"]
            return cls(
                key=key,
                value=value,
                original_topic=context["original.topic"],
                original_partition=int(context["original.partition"]),
                original_offset=int(context["original.offset"]),
                original_timestamp_ms=int(timestamp) if timestamp else None,
                error_class=context["error.class"],
                error_message=context["error.message"],
                error_stacktrace=context["error.stacktrace"],
                stage=Stage(context["stage"]),
                attempts=int(context["attempts"]),
                group=context["group"],
                failed_at=datetime.fromisoformat(context["failed.at"]),
                original_headers=kept,
            )
        except KeyError as exc:
            header = PREFIX + exc.args[0]
            raise InvalidMessage(
                f"not a dead letter: header {header} is missing", [(header, "missing")]
            ) from None
        except ValueError as exc:
            raise InvalidMessage(f"not a dead letter: {exc}", [("", str(exc))]) from None
