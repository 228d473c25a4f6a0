"""Prometheus metrics: the metric objects every process shares, the HTTP endpoint that
serves them, and the consumer-lag poller.

The names are a contract with the Grafana dashboard and alerts: rename nothing without
them. Every process registers all of them in the default registry, next to
prometheus_client's process metrics; one a process never touches reads 0, or has no
series at all when it has labels.

- `serve(port, host, setting=..., health=...)` starts `/metrics`, `/healthz` and `/readyz`
  (`imagegen.infra.health`); port 0 leaves them off.
- `LagMonitor(settings, group, topics)` refreshes `imagegen_consumer_lag` from the group's
  committed offsets (`group_lag`) on a thread of its own, off the hot path.
- `observe_gpu_memory(device)` samples CUDA memory after a batch.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from imagegen.infra.kafka import EndOffsets, make_consumer
from imagegen.infra.settings import Settings
from imagegen.schemas.errors import BrokerUnavailable, ConfigError

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    import torch

    from imagegen.infra.health import Health

log = logging.getLogger(__name__)

# From a fast encode (milliseconds) to a large batch on a slow device (a minute).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

RECORDS_CONSUMED = Counter(
    "imagegen_records_consumed_total", "Records read from Kafka, by topic.", ["topic"]
)
RECORDS_PRODUCED = Counter(
    "imagegen_records_produced_total",
    "Records the broker acknowledged, by topic.",
    ["topic"],
)
INTAKE_REQUESTS = Counter(
    "imagegen_intake_requests_total",
    "Requests decided by the intake processor, by outcome: admitted, duplicate, "
    "publish_retry, canceled, expired, rejected (rate-limited and overloaded among them) "
    "or invalid.",
    ["outcome"],
)
RENDER_BATCH_SIZE = Histogram(
    "imagegen_render_batch_size",
    "Requests per successful pipeline call.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
RENDER_SECONDS = Histogram(
    "imagegen_render_seconds",
    "Seconds per successful pipeline call (one batch), retries included.",
    buckets=_DURATION_BUCKETS,
)
ENCODE_SECONDS = Histogram(
    "imagegen_encode_seconds", "Seconds to encode one image.", buckets=_DURATION_BUCKETS
)
UPLOAD_SECONDS = Histogram(
    "imagegen_upload_seconds",
    "Seconds to store one image in the object store, retries included.",
    buckets=_DURATION_BUCKETS,
)
IN_FLIGHT = Gauge(
    "imagegen_in_flight_requests",
    "Requests a worker has accepted and not yet finished and made committable.",
)
RETRIES = Counter("imagegen_retries_total", "Retries after a transient error, by stage.", ["stage"])
DLQ_RECORDS = Counter(
    "imagegen_dlq_records_total", "Dead letters the broker acknowledged, by stage.", ["stage"]
)
DEVICE_SECONDS = Counter(
    "imagegen_device_seconds_total",
    "Device time spent rendering, by model: each request's share of its batch's render time.",
    ["model"],
)
JOBS_ENDED_EARLY = Counter(
    "imagegen_jobs_ended_early_total",
    "Requests answered canceled or expired, by status and where (intake, queue, render).",
    ["status", "where"],
)
CANCELS_IGNORED = Counter(
    "imagegen_cancellations_ignored_total",
    "Cancellations ignored because their user_id is not the request's own.",
)
EVENTS_UNSENT = Counter(
    "imagegen_events_unsent_total",
    "Job events the broker never acknowledged (events are for watching; results still go).",
)
WEBHOOK_DELIVERIES = Counter(
    "imagegen_webhook_deliveries_total",
    "Webhook attempts and what came of them: delivered, retried (after a failed attempt), "
    "deferred (its user had too many in flight), dead_lettered.",
    ["outcome"],
)
WEBHOOK_SECONDS = Histogram(
    "imagegen_webhook_seconds",
    "Seconds per webhook attempt, from resolving the URL to the receiver's answer.",
    buckets=_DURATION_BUCKETS,
)
FLEET_START_RATE = Gauge(
    "imagegen_fleet_start_rate",
    "Renders the worker fleet started per second lately, as the intake processor measures "
    "it for load shedding; 0 while none was seen (nothing is shed then).",
)
ASSIGNED_PARTITIONS = Gauge(
    "imagegen_assigned_partitions",
    "Partitions of the topic that this worker holds in its group now.",
    ["topic"],
)
CONSUMER_LAG = Gauge(
    "imagegen_consumer_lag",
    "Records between a group's committed offset and the end of the partition.",
    ["group", "topic", "partition"],
)
GPU_MEMORY_ALLOCATED = Gauge(
    "imagegen_gpu_memory_allocated_bytes",
    "CUDA memory held by tensors (torch.cuda.memory_allocated).",
    ["device"],
)
GPU_MEMORY_RESERVED = Gauge(
    "imagegen_gpu_memory_reserved_bytes",
    "CUDA memory held by torch's caching allocator (torch.cuda.memory_reserved).",
    ["device"],
)


def serve(port: int, host: str, *, setting: str, health: Health) -> WSGIServer | None:
    """Serve `/metrics`, and `health` on `/healthz` and `/readyz`, on `host:port` from a
    daemon thread, and return the server; port 0 serves nothing.

    `setting` names what chooses the port (a variable, an option), so that the error for a
    port already in use says what to change.
    """
    if port == 0:
        return None
    try:
        server = make_server(host, port, _routes(health), _Server, _QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"the metrics port {port} on {host} is already in use: set {setting} to a "
                "free port, or to 0 to serve no metrics"
            ) from exc
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): check "
            f"{setting} and IMAGEGEN_METRICS_HOST"
        ) from exc
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving metrics on http://%s:%d/metrics (and /healthz, /readyz)", host, port)
    return server


class _Server(ThreadingMixIn, WSGIServer):
    # A slow scrape or probe must not hold up the next one, nor the process's exit.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a probe every few seconds would drown the process's own log


def _routes(health: Health) -> WSGIApplication:
    scrape = make_wsgi_app()
    checks = {"/healthz": health.liveness.stalled, "/readyz": health.readiness.unready}

    def route(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            scraped: Iterable[bytes] = scrape(environ, start_response)
            return scraped
        problems = check()
        status = "503 Service Unavailable" if problems else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [("\n".join(problems) if problems else "ok").encode() + b"\n"]

    return route


class LagMonitor:
    """Sets `imagegen_consumer_lag{group,topic,partition}` every `interval_s` seconds.

    Lag is the partition's end offset minus the group's committed offset: what the group
    still has to read, as seen by the next owner after a crash. A partition the group has
    never committed counts from its beginning, as the group's `auto.offset.reset=earliest`
    would read it. The monitor's two consumers (committed offsets, and the partitions' ends
    through `EndOffsets`) never join the group, so the group's members and their clients
    are untouched.
    """

    def __init__(
        self, settings: Settings, group: str, topics: Sequence[str], interval_s: float = 5.0
    ) -> None:
        self.group = group
        self.topics = list(topics)
        self.interval_s = interval_s
        self._settings = settings
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"lag-{self.group}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            # Bounded: with the broker gone the thread may sit in a call for its timeout. It
            # is a daemon, and its consumer holds nothing that the group needs.
            self._thread.join(timeout=1.0)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        # Created here: the consumer lives and dies on this thread alone.
        consumer = make_consumer(self._settings, self.group, **{"enable.auto.commit": False})
        ends = EndOffsets(self._settings)
        try:
            while True:
                try:
                    lags = group_lag(consumer, ends, self.topics)
                    for (topic, partition), lag in lags.items():
                        CONSUMER_LAG.labels(self.group, topic, str(partition)).set(lag)
                except (KafkaException, BrokerUnavailable) as exc:
                    log.warning("consumer lag of %s not refreshed: %s", self.group, exc)
                if self._stopping.wait(self.interval_s):
                    return
        finally:
            ends.close()
            consumer.close()


def group_lag(
    consumer: Consumer, ends: EndOffsets, topics: Sequence[str], timeout_s: float = 5.0
) -> dict[tuple[str, int], int]:
    """Lag by (topic, partition) of the group that `consumer` names in its group.id.

    The consumer need not be a member: committed offsets are read from the coordinator.
    Ends are the larger of the high watermark and the end a fetch reports, as in `imagegen
    status`: some brokers place the watermark inside the last multi-record batch.
    """
    wanted: list[TopicPartition] = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        if metadata.error is not None:
            raise KafkaException(metadata.error)
        wanted.extend(TopicPartition(topic, p) for p in sorted(metadata.partitions))
    fetched = ends.read([(tp.topic, tp.partition) for tp in wanted], timeout_s)
    lags: dict[tuple[str, int], int] = {}
    for committed in consumer.committed(wanted, timeout=timeout_s):
        coordinates = (committed.topic, committed.partition)
        low, high = consumer.get_watermark_offsets(committed, timeout=timeout_s)
        # A negative offset means "none committed": the group would start at `low`.
        start = committed.offset if committed.offset >= 0 else low
        lags[coordinates] = max(0, max(high, fetched[coordinates]) - start)
    return lags


def observe_gpu_memory(device: torch.device) -> None:
    """Sample CUDA memory on `device`; any other device has no such gauge."""
    if device.type != "cuda":
        return
    import torch  # the caller already loaded it; processes without torch never get here

    index = device.index if device.index is not None else torch.cuda.current_device()
    label = f"cuda:{index}"
    GPU_MEMORY_ALLOCATED.labels(label).set(torch.cuda.memory_allocated(index))
    GPU_MEMORY_RESERVED.labels(label).set(torch.cuda.memory_reserved(index))
