"""Dedupe memory: which request each (user, idempotency key or request id) admitted, and
when, for `IMAGEGEN_DEDUPE_WINDOW_S`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from imagegen.processors.state import Store
from imagegen.schemas import GenerationRequest


class Seen(Enum):
    NEW = "new"
    PUBLISH_RETRY = "publish_retry"  # the same request_id again: the original answers it
    DUPLICATE = "duplicate"  # another request_id with an idempotency key already used
    REDELIVERY = "redelivery"  # the very record we admitted, replayed after a crash


@dataclass(frozen=True)
class Verdict:
    seen: Seen
    admitted_request_id: str | None = None


def dedupe_key(request: GenerationRequest) -> str:
    if request.idempotency_key is not None:
        return f"{request.user_id}\x1fkey\x1f{request.idempotency_key}"
    return f"{request.user_id}\x1fid\x1f{request.request_id}"


class Deduper:
    """`memory` maps dedupe keys to [request_id, admitted_at, partition, offset].

    The admitting record's coordinates tell a crash's redelivery of that record (admit it
    again: the send to the render topic may not have happened) from a publish retry, which
    is another record with the same request_id (drop it).
    """

    def __init__(self, memory: Store, window_s: float) -> None:
        self._memory = memory
        self._window_s = window_s

    def check(self, request: GenerationRequest, partition: int, offset: int, now: float) -> Verdict:
        entry = self._memory.get(dedupe_key(request))
        if entry is None or now - entry[1] >= self._window_s:
            return Verdict(Seen.NEW)
        admitted_id, _, admitted_partition, admitted_offset = entry
        if admitted_id != request.request_id:
            return Verdict(Seen.DUPLICATE, admitted_id)
        if (admitted_partition, admitted_offset) == (partition, offset):
            return Verdict(Seen.REDELIVERY, admitted_id)
        return Verdict(Seen.PUBLISH_RETRY, admitted_id)

    def expired(self, entries: Iterable[tuple[str, list]], now: float) -> list[tuple[str, int]]:
        """The keys among `entries` (key, stored entry) past the window, with the partition
        that admitted each: forgetting them changes no verdict."""
        return [(key, entry[2]) for key, entry in entries if now - entry[1] >= self._window_s]

    def remember(self, request: GenerationRequest, partition: int, offset: int, now: float) -> None:
        self._memory[dedupe_key(request)] = [request.request_id, now, partition, offset]

    def forget(self, request: GenerationRequest, partition: int, offset: int) -> None:
        """Release the entry the record at (partition, offset) made for `request`, so that
        the request's next publish is new again. An entry another record made stays."""
        key = dedupe_key(request)
        entry = self._memory.get(key)
        if entry is not None and (entry[0], entry[2], entry[3]) == (
            request.request_id,
            partition,
            offset,
        ):
            del self._memory[key]
