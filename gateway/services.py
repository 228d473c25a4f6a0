"""What one gateway instance runs beside its routes, started and stopped together: the key
book, the event hub, the job store and its indexer, and the request publisher.

Every call that blocks (the object store, a key book start) runs in a thread
(`blocking`), so the event loop only ever waits; an unreachable broker or store becomes the
503 `unavailable` problem.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from imagegen.gateway.hub import EventHub
from imagegen.gateway.indexer import JobIndexer
from imagegen.gateway.job_store import JobRecord, JobStore
from imagegen.gateway.problems import Problem, unavailable
from imagegen.gateway.views import Job, job_view
from imagegen.infra.key_book import KeyBook
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.producers.publisher import AsyncRequestPublisher
from imagegen.schemas import GenerationResult, Status
from imagegen.schemas.errors import BrokerUnavailable, ObjectStoreError, ObjectStoreUnavailable
from imagegen.schemas.fields import utc_now

log = logging.getLogger(__name__)
T = TypeVar("T")


async def blocking(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` in a thread; a broker or store outage is the `unavailable` problem."""
    try:
        return await asyncio.to_thread(call, *args)
    except (ObjectStoreUnavailable, ObjectStoreError, BrokerUnavailable) as exc:
        log.warning("a backing service failed: %s", exc)
        raise unavailable(f"{exc}; try again shortly") from exc


@dataclass
class Services:
    settings: Settings
    keys: KeyBook
    hub: EventHub
    jobs: JobStore
    indexer: JobIndexer
    publisher: AsyncRequestPublisher
    store: ObjectStore  # the job store's, where uploads go too

    @classmethod
    async def start(cls, settings: Settings) -> Services:
        keys = await asyncio.to_thread(KeyBook(settings).start)
        hub = await asyncio.to_thread(EventHub(settings).start)
        store = ObjectStore(settings)
        jobs = JobStore(store)
        indexer = JobIndexer(settings, jobs).start()
        return cls(settings, keys, hub, jobs, indexer, AsyncRequestPublisher(settings), store)

    async def close(self) -> None:
        await self.publisher.close()
        await asyncio.to_thread(self.indexer.close)
        await asyncio.to_thread(self.hub.close)
        await asyncio.to_thread(self.keys.close)

    def unready(self) -> list[str]:
        """What is not ready to serve yet; empty when all is."""
        checks = {
            "the key book is catching up with imagegen.api-keys": self.keys.caught_up(),
            "the event hub stopped": self.hub.healthy(),
            "the job indexer has not joined its group, or its store fails": (
                self.indexer.healthy()
            ),
        }
        return [what for what, ok in checks.items() if not ok]

    # ---- jobs -----------------------------------------------------------------------------

    async def record(self, request_id: str, user_id: str) -> JobRecord:
        """The user's job; the `not-found` problem for a missing job and another's."""
        record = await blocking(self.jobs.job, request_id)
        if record is None or record.request.user_id != user_id:
            raise Problem("not-found", f"no job {request_id} of yours", job_id=request_id)
        return record

    async def result(self, request_id: str) -> GenerationResult | None:
        """The latest result: the hub's when it saw one, else the store's; a `duplicate`
        resolved to the result of the job it duplicates."""
        # A job the hub saw on its way ends on a result the hub sees too: only a job it
        # never saw, forgot, or saw only ending needs the store.
        state = self.hub.state(request_id)
        if state is not None and state.result_known:
            result = state.result
        else:
            result = await blocking(self.jobs.result, request_id)
        if result is not None and result.status is Status.DUPLICATE:
            assert result.duplicate_of is not None
            original = await self.result(result.duplicate_of)
            return (
                None if original is None else original.model_copy(update={"request_id": request_id})
            )
        return result

    async def view(self, record: JobRecord) -> Job:
        request_id = record.request.request_id
        result = await self.result(request_id)
        return job_view(
            record.request,
            result,
            self.hub.state(request_id),
            self.sign,
            self.settings.gateway_url_ttl_s,
            utc_now(),
        )

    def sign(self, result: GenerationResult) -> str:
        return self.jobs.image_url(result, self.settings.gateway_url_ttl_s)
