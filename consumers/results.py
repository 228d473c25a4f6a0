"""Follow `imagegen.results`: wait for given requests' answers, or read them as they come.

A request's state is its latest result. A request can have several: at least once
delivery can publish one twice, and a failed request that an operator replays from the
DLQ is answered again (failed, then succeeded). Both producers key results by request id
and partition them with Kafka's murmur2 (`infra.partitioning`), so all of a request's
results lie in one partition, in the order they were written: the one read last is the
latest.

A subscriber reads every partition, or, given `request_ids`, only the partitions where
those requests' results land; where it starts (`start`) is as `consumers.topic_reader`
says: create it before publishing, and no answer can slip past it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator

from imagegen.consumers.topic_reader import Start, Subscription, TopicReader, readable
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult
from imagegen.schemas.errors import ImagegenError
from imagegen.schemas.topics import RESULTS


class ResultTimeout(ImagegenError):
    """Some awaited requests had no result in time."""

    transient = True

    def __init__(
        self, missing: list[str], timeout_s: float, found: dict[str, GenerationResult]
    ) -> None:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        super().__init__(
            f"no result within {timeout_s:g}s for {len(missing)} request(s): {shown}. "
            "Check that a processor and a worker are running (`imagegen processor`, "
            "`imagegen worker`), or wait longer with a larger timeout."
        )
        self.missing = missing
        self.found = found


class ResultSubscriber(Subscription[GenerationResult]):
    def __init__(
        self,
        settings: Settings,
        start: Start = "end",
        request_ids: Iterable[str] | None = None,
    ) -> None:
        # GenerationResult.kafka_key: the request id's bytes.
        keys = None if request_ids is None else [i.encode() for i in request_ids]
        super().__init__(TopicReader(settings, "imagegen-results-reader", [RESULTS], start, keys))

    def wait_for(
        self,
        request_ids: Iterable[str],
        timeout_s: float,
        on_result: Callable[[GenerationResult], None] | None = None,
    ) -> dict[str, GenerationResult]:
        """`await_results` on this subscriber's results."""
        return await_results(self._poll, self._reader.caught_up, request_ids, timeout_s, on_result)

    async def wait_for_async(
        self, request_ids: Iterable[str], timeout_s: float
    ) -> dict[str, GenerationResult]:
        """`wait_for` for asyncio: the blocking polls run in a worker thread."""
        return await asyncio.to_thread(self.wait_for, list(request_ids), timeout_s)

    def _poll(self, timeout_s: float) -> Iterator[GenerationResult]:
        for message in self._reader.poll(timeout_s):
            result = readable(GenerationResult, message.value())
            if result is not None:
                yield result


def await_results(
    poll: Callable[[float], Iterable[GenerationResult]],
    caught_up: Callable[[], bool],
    request_ids: Iterable[str],
    timeout_s: float,
    on_result: Callable[[GenerationResult], None] | None = None,
) -> dict[str, GenerationResult]:
    """Each request's latest result, once every one has a result and the reader has read up
    to where it started (so a retained result cannot hide a newer one). `poll(timeout_s)`
    gives the results read next; `on_result` sees each request's first result as it
    arrives. `ResultTimeout` names the requests still missing."""
    wanted = set(request_ids)
    found: dict[str, GenerationResult] = {}
    deadline = time.monotonic() + timeout_s
    while wanted - found.keys() or not caught_up():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if wanted - found.keys():
                raise ResultTimeout(sorted(wanted - found.keys()), timeout_s, found)
            return found  # every request answered; the broker was slow to say where it ends
        for result in poll(min(remaining, 0.5)):
            if result.request_id not in wanted:
                continue
            first = result.request_id not in found
            found[result.request_id] = result
            if first and on_result is not None:
                on_result(result)
    return found


def latest_results(results: Iterable[GenerationResult]) -> dict[str, GenerationResult]:
    """Each request's latest result among `results` (read in offset order, as a subscriber
    reads them), in the order those latest results came."""
    latest: dict[str, GenerationResult] = {}
    for result in results:
        latest.pop(result.request_id, None)  # re-inserted: ordered by its latest result
        latest[result.request_id] = result
    return latest


def latest_result(settings: Settings, request_id: str) -> GenerationResult | None:
    """The request's latest result retained on `imagegen.results`, or None if it has none;
    only the one partition where its results land is read."""
    latest = None
    with ResultSubscriber(settings, start="beginning", request_ids=[request_id]) as subscriber:
        for result in subscriber.until_caught_up():
            if result.request_id == request_id:
                latest = result  # read in offset order: a later one is newer
    return latest
