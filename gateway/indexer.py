"""Index imagegen.results into the job store: each request's latest result becomes its
`jobs/<request_id>/result.json` (`gateway.job_store`).

Every gateway runs one, in the consumer group `imagegen-job-index`. The group shares the
partitions of imagegen.results among the gateways, so each result is indexed by one of
them; when a gateway stops, its partitions move to the others at once (when it dies: after
the session timeout, IMAGEGEN_KAFKA_SESSION_TIMEOUT_MS), and they go on from its last
commit.

Where a group starts: a group with no commits reads from the earliest retained result
(`auto.offset.reset=earliest`), so a first deployment indexes every result that the topic
still holds, the same 7 days that the job store keeps. After that, every start resumes
from the group's committed offsets: results published while no gateway ran are indexed
when one starts.

At least once: a batch's offsets are committed only once every one of its results is
written, so a crash between the two writes the same results again, which changes nothing.
The latest result of a request wins: a request's results lie in one partition, in the
order they were written (they are keyed by request id), and the indexer writes them in
that order, batch after batch; within a batch only the last result of each request is
written. (The one way to break that order: a gateway cut off from the broker but not from
the store, whose partitions moved on after its session timed out, finishes the batch in
hand; a request with two results in that batch's few seconds could end with the older.)

Nothing stops it but `close`: a record that is not a `GenerationResult` is skipped with a
warning, and a store that fails (unreachable, or refusing) is retried with backoff for as
long as it takes, never skipped. While it retries, the consumer's partitions are paused and
it keeps polling, so that it stays in its group; when a rebalance takes its partitions
meanwhile, it drops the batch, which their new owner reads again from the last commit.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Self

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from imagegen.gateway.job_store import JobStore
from imagegen.infra.kafka import consume_available, make_consumer, record_position
from imagegen.infra.metrics import RETRIES
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationResult, decode
from imagegen.schemas.errors import ImagegenError, InvalidMessage
from imagegen.schemas.topics import JOB_INDEX_GROUP, RESULTS

log = logging.getLogger(__name__)

#: Records taken per poll; their results are written together, then committed.
_BATCH = 500
#: Writes in flight at once: as many as the object store client keeps connections.
_WRITERS = 16
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 10.0
#: What librdkafka prefetches, in KiB. Its default, 64 MiB, is memory spent on nothing:
#: at 5,000 results a second, a second of them is about 4 MiB.
_PREFETCH_KIB = 4096
#: Session timeouts a join may take before the log says that it has not happened.
_JOIN_PATIENCE = 10
_Where = tuple[str, int]  # (topic, partition)


class JobIndexer:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self._settings = settings
        self._store = store
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._failing = threading.Event()  # a batch's writes are being retried
        # Read and written by the indexing thread only (the consumer's callbacks run in it).
        self._paused = False
        self._revocations = 0
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start indexing in a thread of its own; return at once. Joining the group takes
        a moment (on Tansu, the embedded broker, half the session timeout): `healthy`
        says when it has joined."""
        consumer = make_consumer(
            self._settings,
            group_id=JOB_INDEX_GROUP,
            **{"enable.auto.commit": False, "queued.max.messages.kbytes": _PREFETCH_KIB},
        )
        self._thread = threading.Thread(
            target=self._run, args=(consumer,), name="job-indexer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop, leaving the group: the other gateways' indexers take over its partitions."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            if self._thread.is_alive():
                log.warning("the job indexer did not stop within 30s; leaving it behind")
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def healthy(self) -> bool:
        """Whether it runs, has joined its group, and is not retrying a failing store."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._joined.is_set()
            and not self._failing.is_set()
        )

    # ---- the indexing thread --------------------------------------------------------------

    def _run(self, consumer: Consumer) -> None:
        try:
            with ThreadPoolExecutor(_WRITERS, thread_name_prefix="job-index-write") as writers:
                consumer.subscribe(
                    [RESULTS],
                    on_assign=self._on_assign,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_revoke,
                )
                waiting = _JoinWatch(self._settings.kafka_session_timeout_ms)
                while not self._stopping.is_set():
                    if not self._joined.is_set():
                        waiting.check()
                    messages = consume_available(consumer, _BATCH, 0.1)
                    if messages:
                        self._index(consumer, writers, messages)
        except Exception:
            log.exception("the job indexer stopped: restart the gateway")
        finally:
            consumer.close()

    def _index(
        self, consumer: Consumer, writers: ThreadPoolExecutor, messages: list[Message]
    ) -> None:
        revocations = self._revocations
        latest: dict[str, GenerationResult] = {}
        ends: dict[_Where, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("reading %s: %s", RESULTS, error)
                continue
            topic, partition, offset = record_position(message)
            ends[(topic, partition)] = offset + 1
            result = _readable(message)
            if result is not None:
                latest[result.request_id] = result
        if self._write(consumer, writers, list(latest.values()), revocations):
            _commit(consumer, ends)

    def _write(
        self,
        consumer: Consumer,
        writers: ThreadPoolExecutor,
        results: list[GenerationResult],
        revocations: int,
    ) -> bool:
        """Write every one of `results`, retrying for as long as it takes; False when the
        indexer stops or loses its partitions first."""
        attempt = 0
        while results:
            results, error = self._write_once(writers, results)
            if error is None:
                break
            attempt += 1
            self._failing.set()
            RETRIES.labels("index").inc()
            delay = random.uniform(0, min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2**attempt))
            log.log(
                logging.WARNING if error.transient else logging.ERROR,
                "indexing %d result(s) failed (attempt %d), retrying in %.2fs: %s",
                len(results),
                attempt,
                delay,
                error,
            )
            if not self._wait_paused(consumer, delay, revocations):
                return False
        self._failing.clear()
        return True

    def _write_once(
        self, writers: ThreadPoolExecutor, results: list[GenerationResult]
    ) -> tuple[list[GenerationResult], ImagegenError | None]:
        """Write `results` in parallel; return those not written, and the first error."""
        futures = [(result, writers.submit(self._store.put_result, result)) for result in results]
        unwritten: list[GenerationResult] = []
        first: ImagegenError | None = None
        for result, future in futures:
            try:
                future.result()
            except CancelledError:
                unwritten.append(result)
            except ImagegenError as error:
                unwritten.append(result)
                if first is None:
                    first = error
                    for _, queued in futures:
                        queued.cancel()  # the store is failing: spare it the rest for now
        return unwritten, first

    def _wait_paused(self, consumer: Consumer, delay_s: float, revocations: int) -> bool:
        """Wait `delay_s` with the partitions paused, polling so that the consumer stays in
        its group; False when the indexer stops or a rebalance revokes partitions."""
        self._paused = True
        if assignment := consumer.assignment():
            consumer.pause(assignment)
        try:
            deadline = time.monotonic() + delay_s
            while (left := deadline - time.monotonic()) > 0:
                message = consumer.poll(min(left, 0.1))
                if message is not None and message.error() is None:
                    # librdkafka discards what it fetched before a pause; should a record
                    # arrive anyway, it is read again after the resume.
                    consumer.seek(TopicPartition(*record_position(message)))
                if self._stopping.is_set() or self._revocations != revocations:
                    return False
            return True
        finally:
            self._paused = False
            if assignment := consumer.assignment():
                consumer.resume(assignment)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined.set()
        log.info("indexing %s", _names(partitions))
        consumer.assign(partitions)
        # Assigned while retrying: nothing is fetched until the retry. Otherwise resumed,
        # since librdkafka keeps a partition paused across its revocation and return: one
        # revoked during an earlier retry would never be read again here.
        (consumer.pause if self._paused else consumer.resume)(partitions)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Each batch is committed once written, so there is nothing to commit here.
        self._revocations += 1
        log.info("no longer indexing %s", _names(partitions))


class _JoinWatch:
    """Says, in the log, that the indexer has still not joined its group, and what to do.

    Until its first assignment the gateway is not ready (/readyz answers 503), and nothing
    else would say why. A join takes a few session timeouts at most: one to expire a member
    that died without leaving (SIGKILL), after which the others rejoin without it, each once
    it has written the batch in hand; and on Tansu, the embedded broker, half of one more
    for a first join. Past `_JOIN_PATIENCE` of them, something is wrong with the broker or
    with another member of the group, not with this gateway. (Measured on Tansu 0.6.0 with a
    2 s session, results streaming in and every core busy: the survivor of a SIGKILL held
    every partition 4 to 6 s after the kill, and a new gateway joined within 8 s.)"""

    def __init__(self, session_timeout_ms: int) -> None:
        self._every_s = _JOIN_PATIENCE * session_timeout_ms / 1000
        self._started = time.monotonic()
        self._next = self._started + self._every_s

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self._every_s
        log.warning(
            "the job indexer has not joined the consumer group %s after %.0fs, so /readyz "
            "answers 503: check that the broker answers, and which members the group holds "
            "(kafka-consumer-groups.sh --describe --members --group %s). A member that "
            "does not rejoin holds back the others for up to its max.poll.interval.ms; "
            "stopping it (or its gateway) lets the rest go on",
            JOB_INDEX_GROUP,
            now - self._started,
            JOB_INDEX_GROUP,
        )


def _readable(message: Message) -> GenerationResult | None:
    try:
        return decode(GenerationResult, message.value())
    except InvalidMessage as exc:
        log.warning(
            "skipping %s[%s]@%s: not a result (%s)",
            RESULTS,
            message.partition(),
            message.offset(),
            exc,
        )
        return None


def _commit(consumer: Consumer, ends: dict[_Where, int]) -> None:
    offsets = [TopicPartition(topic, partition, end) for (topic, partition), end in ends.items()]
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as exc:
        # A rebalance, most often: the partitions' next owner indexes these results again.
        log.warning("could not commit %s: %s", _names(offsets), exc)


def _names(partitions: list[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
