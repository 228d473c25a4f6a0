"""Dead letters: a failed message's original key and value, unchanged, plus its context.

The context travels in `dlq.*` headers so that the value stays byte-for-byte what the producer
sent. The message's other headers are kept too, so a replay restores them.

A letter is a Kafka record, and a record has a size limit. Its context is bounded (the
stack trace keeps its last `MAX_STACKTRACE_CHARS` characters, the message its first
`MAX_MESSAGE_CHARS`, each marked where cut), but the original's key, value and headers are
not: a letter too large to send holds them in an object instead, packed by `pack_original`
and named by the header `dlq.original.object` (`imagegen.infra.dead_letter_spill` decides
and writes). Nothing of the original is ever cut.
"""

from __future__ import annotations

import base64
import binascii
import json
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Self

from imagegen.schemas.errors import InvalidMessage
from imagegen.schemas.fields import utc_now
from imagegen.schemas.headers import REPLAY_HEADER

Headers = list[tuple[str, bytes]]

PREFIX = "dlq."
#: The end of a stack trace holds the frames that matter; keep that end.
MAX_STACKTRACE_CHARS = 8 * 1024
MAX_MESSAGE_CHARS = 2 * 1024
#: What a record header costs on the wire beyond its name and value: two varint lengths.
HEADER_OVERHEAD_BYTES = 10
#: The longest `replay.of` a spilled letter copies: a genuine mark is about 100 bytes.
MAX_KEPT_MARK_BYTES = 512
#: Names the layout of a packed original, so that a later layout can tell it apart.
ORIGINAL_FORMAT = "imagegen.dlq.original/1"


class Stage(StrEnum):
    """Where in the pipeline the message failed."""

    VALIDATE = "validate"
    DEDUPE = "dedupe"
    RATELIMIT = "ratelimit"
    RENDER = "render"
    STORE = "store"
    PUBLISH = "publish"
    #: A webhook was not delivered within IMAGEGEN_WEBHOOK_RETRY_S, or its URL is refused.
    WEBHOOK = "webhook"


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
    #: Set when the original's key, value and headers are in the object store, at this key:
    #: `key` is then None, `value` empty (some clients refuse a record with neither), and
    #: `original_headers` holds only a copy of the original's `replay.of` (when one short
    #: enough to be genuine was there), so that the DLQ tooling follows replays without
    #: reading objects.
    original_object: str | None = None

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
        if self.original_object is not None:
            context["original.object"] = self.original_object
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
                original_object=context.get("original.object"),
            )
        except KeyError as exc:
            header = PREFIX + exc.args[0]
            raise InvalidMessage(
                f"not a dead letter: header {header} is missing", [(header, "missing")]
            ) from None
        except ValueError as exc:
            raise InvalidMessage(f"not a dead letter: {exc}", [("", str(exc))]) from None

    def size_bytes(self) -> int:
        """The letter's size as a record, as Kafka clients count it against their limit."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(
                len(name.encode()) + len(data) + HEADER_OVERHEAD_BYTES
                for name, data in self.headers()
            )
        )

    def replay_mark(self) -> bytes | None:
        """The original's `replay.of` header, unverified: the record was a replay if the
        mark's signature holds (`imagegen.infra.replay_marks.verify`)."""
        return next((data for name, data in self.original_headers if name == REPLAY_HEADER), None)

    def spilled(self, object_key: str) -> Self:
        """This letter with its original moved out to the object at `object_key`."""
        mark = self.replay_mark()
        kept = [] if mark is None or len(mark) > MAX_KEPT_MARK_BYTES else [(REPLAY_HEADER, mark)]
        return replace(self, key=None, value=b"", original_headers=kept, original_object=object_key)

    def restored(self, packed: bytes) -> Self:
        """A spilled letter with its original back in place, from the object's bytes."""
        key, value, headers = unpack_original(packed)
        return replace(self, key=key, value=value, original_headers=headers)


def pack_original(letter: DeadLetter) -> bytes:
    """The original's key, value and headers as one JSON document: readable with any
    S3 client and `jq`, and the same bytes for the same original (which the object's name
    relies on)."""
    document = {
        "format": ORIGINAL_FORMAT,
        "key": _b64(letter.key),
        "value": _b64(letter.value),
        "headers": [[name, _b64(data)] for name, data in letter.original_headers],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def unpack_original(packed: bytes) -> tuple[bytes | None, bytes | None, Headers]:
    """The key, value and headers `pack_original` packed; `InvalidMessage` for anything else."""
    try:
        document = json.loads(packed)
        if not isinstance(document, dict) or document.get("format") != ORIGINAL_FORMAT:
            raise ValueError(f"not a {ORIGINAL_FORMAT} document")
        headers = [(_text(name), _unb64(data) or b"") for name, data in document["headers"]]
        return _unb64(document["key"]), _unb64(document["value"]), headers
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        problem = f"not a packed dead-letter original: {exc}"
        raise InvalidMessage(problem, [("", problem)]) from None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: object) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(_text(text), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, found {type(value).__name__}")
    return value
