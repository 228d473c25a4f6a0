"""Every cancellation on `imagegen.cancellations`, in memory, kept current by a thread.

The processor asks it before admitting a request, and the worker before and while rendering
one. `start` returns once the book holds everything the topic held when it was called, so
a cancellation published before a process started is honoured by it. After that, a new
cancellation reaches the book within about one fetch wait (`IMAGEGEN_KAFKA_FETCH_WAIT_MS`);
the reading is `infra.compacted_book`'s.

The topic is compacted by request_id, and retention deletes what no running request can
need, so the book holds about a week of cancellations: a few hundred bytes each.

A cancellation counts only when its `user_id` is the request's own (`honoured`); any
other is ignored, and counted once per request in `imagegen_cancellations_ignored_total`.
Records that are not a `CancelRequest` are skipped with a warning: a bad record never stops
a reader.
"""

from __future__ import annotations

import logging

from imagegen.infra.compacted_book import CompactedBook
from imagegen.infra.metrics import CANCELS_IGNORED
from imagegen.infra.settings import Settings
from imagegen.schemas import CancelRequest, GenerationRequest
from imagegen.schemas.topics import CANCELLATIONS

log = logging.getLogger(__name__)


class CancelBook(CompactedBook[CancelRequest]):
    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings, CANCELLATIONS, CancelRequest, "imagegen-cancel-book", "the cancel book"
        )
        self._cancels: dict[str, CancelRequest] = {}
        self._ignored: set[str] = set()  # request ids whose foreign cancellation was counted

    def honoured(self, request: GenerationRequest) -> CancelRequest | None:
        """The request's cancellation, if it has one from its own user."""
        with self._lock:
            cancel = self._cancels.get(request.request_id)
            if cancel is None or cancel.user_id == request.user_id:
                return cancel
            if request.request_id not in self._ignored:
                self._ignored.add(request.request_id)
                CANCELS_IGNORED.inc()
                log.warning(
                    "ignoring a cancellation of %s from user %r: the request is %r's",
                    request.request_id,
                    cancel.user_id,
                    request.user_id,
                    extra={"request_id": request.request_id},
                )
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._cancels)

    def _keep(self, key: str, record: CancelRequest) -> None:
        self._cancels[record.request_id] = record

    def _forget(self, key: str) -> None:
        self._cancels.pop(key, None)
