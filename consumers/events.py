"""Follow `imagegen.events`: what happens to requests on their way, alone or with results.

Events and results are both keyed by request id and partitioned with murmur2, so a follower
of some requests reads only the partitions where their ids land, on each topic. Where it
starts (`start`) is as `consumers.topic_reader` says: create it before publishing, and no
event or result can slip past it. Unreadable records are skipped.

- `EventSubscriber`: the `JobEvent`s, of given requests or of all.
- `JobFollower`: given requests' events and results from one consumer, for showing a
  request's progress until its result (`imagegen watch`, `imagegen submit --wait`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from imagegen.consumers.results import await_results
from imagegen.consumers.topic_reader import Start, Subscription, TopicReader, readable
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, JobEvent
from imagegen.schemas.topics import EVENTS, RESULTS

#: What a `JobFollower` reads: an event on the way, or a result at the end.
Update = JobEvent | GenerationResult


class EventSubscriber(Subscription[JobEvent]):
    def __init__(
        self,
        settings: Settings,
        start: Start = "end",
        request_ids: Iterable[str] | None = None,
    ) -> None:
        self._wanted = None if request_ids is None else set(request_ids)
        keys = None if self._wanted is None else [i.encode() for i in self._wanted]
        super().__init__(TopicReader(settings, "imagegen-events-reader", [EVENTS], start, keys))

    def _poll(self, timeout_s: float) -> Iterator[JobEvent]:
        for message in self._reader.poll(timeout_s):
            event = readable(JobEvent, message.value())
            # A partition holds other requests' events too.
            if event is not None and (self._wanted is None or event.request_id in self._wanted):
                yield event


class JobFollower(Subscription[Update]):
    """The events and results of `request_ids`, read by one consumer in the order each
    partition holds them. (Between the two topics there is no order: a request's `finished`
    event may come before or after its result.)"""

    def __init__(
        self, settings: Settings, request_ids: Iterable[str], start: Start = "end"
    ) -> None:
        self._wanted = set(request_ids)
        keys = [i.encode() for i in self._wanted]
        super().__init__(
            TopicReader(settings, "imagegen-job-follower", [EVENTS, RESULTS], start, keys)
        )

    def wait_for(
        self,
        request_ids: Iterable[str],
        timeout_s: float,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> dict[str, GenerationResult]:
        """Each request's latest result, as `ResultSubscriber.wait_for` returns it, while
        `on_event` sees the requests' events as they arrive."""
        wanted = set(request_ids)

        def results(timeout_s: float) -> Iterator[GenerationResult]:
            for update in self._poll(timeout_s):
                if isinstance(update, GenerationResult):
                    yield update
                elif on_event is not None and update.request_id in wanted:
                    on_event(update)

        return await_results(results, self._reader.caught_up, wanted, timeout_s)

    def _poll(self, timeout_s: float) -> Iterator[Update]:
        for message in self._reader.poll(timeout_s):
            update = _update(message.topic(), message.value())
            if update is not None and update.request_id in self._wanted:
                yield update


def _update(topic: str | None, value: bytes | None) -> Update | None:
    if topic == EVENTS:
        return readable(JobEvent, value)
    return readable(GenerationResult, value)
