"""`imagegen status`: the pipeline's topics, consumer groups and services, as they are now.

Record counts are a partition's end minus its low watermark, and a group's lag is the end
minus the group's committed offset. The end is the one a fetch reports
(`imagegen.infra.kafka.fetched_end_offsets`): Tansu 0.6.0, the embedded broker, answers ListOffsets
with an offset inside a partition's last multi-record batch. A group's state and members are
shown as the broker reports them; Tansu says STABLE with no members while members run.

Every request to the broker, the object store and the metrics endpoints has a short timeout,
so a dead service is reported within seconds instead of hanging the command.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer
import urllib3
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from urllib3.exceptions import HTTPError

from imagegen.infra.kafka import check_broker, fetched_end_offsets, make_admin, make_consumer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.infra.topics import TOPICS
from imagegen.schemas.errors import BrokerUnavailable, ImagegenError
from imagegen.schemas.topics import (
    DLQ,
    PROCESSOR_GROUP,
    REQUESTS,
    WORKER_GROUPS,
)

# The groups the pipeline's own consumers join, and the topics each one reads, so that a
# group that has committed nothing yet still shows the backlog waiting for it.
PIPELINE_GROUPS = {
    PROCESSOR_GROUP: (REQUESTS,),
    **{group: (topic,) for topic, group in WORKER_GROUPS.items()},
}

# Only reads watermarks: it never subscribes, so it never joins or commits.
_STATUS_GROUP = "imagegen-status"

# Addresses a metrics server listening on every interface answers on here.
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    healthy: bool
    detail: str
    # A failed required check makes `imagegen status` exit 1; the others only inform.
    required: bool = True


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    low: int
    high: int

    @property
    def records(self) -> int:
        return max(0, self.high - self.low)


@dataclass(frozen=True)
class TopicStatus:
    name: str
    partitions: tuple[PartitionRange, ...] = ()
    error: str | None = None

    @property
    def records(self) -> int:
        return sum(partition.records for partition in self.partitions)


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here
    end: int | None  # None: the partition's watermarks are unknown
    lag: int | None


@dataclass(frozen=True)
class GroupStatus:
    group: str
    state: str
    members: int | None
    partitions: tuple[PartitionLag, ...] = ()
    error: str | None = None

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions if p.lag is not None)


@dataclass(frozen=True)
class StackStatus:
    checks: tuple[Check, ...]
    topics: tuple[TopicStatus, ...]
    groups: tuple[GroupStatus, ...]

    @property
    def healthy(self) -> bool:
        return all(check.healthy for check in self.checks if check.required)

    @property
    def dlq_records(self) -> int | None:
        dlq = next((t for t in self.topics if t.name == DLQ and t.error is None), None)
        return dlq.records if dlq else None

    def as_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "checks": [vars(check) for check in self.checks],
            "topics": [
                {
                    "name": topic.name,
                    "error": topic.error,
                    "records": topic.records,
                    "partitions": [{**vars(p), "records": p.records} for p in topic.partitions],
                }
                for topic in self.topics
            ],
            "groups": [
                {
                    "group": group.group,
                    "state": group.state,
                    "members": group.members,
                    "error": group.error,
                    "total_lag": group.total_lag,
                    "partitions": [vars(p) for p in group.partitions],
                }
                for group in self.groups
            ],
            "dlq_records": self.dlq_records,
        }


def collect(settings: Settings, timeout_s: float = 3.0) -> StackStatus:
    broker, topics, groups = _kafka_status(settings, timeout_s)
    checks = (broker, *_object_store_checks(settings, timeout_s), *_metrics_checks(settings))
    return StackStatus(checks, topics, groups)


def _kafka_status(
    settings: Settings, timeout_s: float
) -> tuple[Check, tuple[TopicStatus, ...], tuple[GroupStatus, ...]]:
    address = settings.kafka_bootstrap
    try:
        check_broker(settings, timeout_s)
    except BrokerUnavailable as exc:
        return Check("broker", address, False, str(exc)), (), ()
    admin = make_admin(settings)
    consumer = make_consumer(settings, _STATUS_GROUP, **{"enable.auto.commit": False})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
        names = [spec.name for spec in TOPICS] + sorted(
            name
            for name in metadata.topics
            if name.startswith(f"{PROCESSOR_GROUP}-") and name.endswith("-changelog")
        )
        topics = _with_fetched_ends(
            settings,
            tuple(_topic_status(consumer, metadata, name, timeout_s) for name in names),
            timeout_s,
        )
        ranges = {(t.name, p.partition): p for t in topics for p in t.partitions}
        groups = tuple(
            _group_status(admin, metadata, ranges, group, timeout_s)
            for group in _group_ids(admin, timeout_s)
        )
    except (KafkaException, TimeoutError) as exc:
        detail = f"the broker stopped answering: {_kafka_reason(exc)}"
        return Check("broker", address, False, detail), (), ()
    except BrokerUnavailable as exc:
        return Check("broker", address, False, f"the broker stopped answering: {exc}"), (), ()
    finally:
        consumer.close()
    detail = f"answers; brokers in the cluster: {len(metadata.brokers)}"
    return Check("broker", address, True, detail), topics, groups


def _topic_status(
    consumer: Consumer, metadata: ClusterMetadata, name: str, timeout_s: float
) -> TopicStatus:
    topic = metadata.topics.get(name)
    if topic is None or topic.error is not None:
        return TopicStatus(name, error="missing: create it with `imagegen init`")
    ranges = []
    try:
        for partition in sorted(topic.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(name, partition), timeout=timeout_s, cached=False
            )
            ranges.append(PartitionRange(partition, low, high))
    except KafkaException as exc:
        return TopicStatus(name, error=f"watermarks unavailable: {exc.args[0].str()}")
    return TopicStatus(name, tuple(ranges))


def _with_fetched_ends(
    settings: Settings, topics: tuple[TopicStatus, ...], timeout_s: float
) -> tuple[TopicStatus, ...]:
    """`topics` with each partition's high watermark replaced by the end a fetch reports."""
    wanted = [(t.name, p.partition) for t in topics for p in t.partitions]
    ends = fetched_end_offsets(settings, wanted, timeout_s)
    return tuple(
        replace(
            topic,
            partitions=tuple(
                replace(p, high=max(p.high, ends[(topic.name, p.partition)]))
                for p in topic.partitions
            ),
        )
        for topic in topics
    )


def _group_ids(admin: AdminClient, timeout_s: float) -> list[str]:
    """The pipeline's groups, then every other group the broker knows, by name."""
    listed = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    others = sorted({g.group_id for g in listed.valid} - PIPELINE_GROUPS.keys())
    return [*PIPELINE_GROUPS, *others]


def _group_status(
    admin: AdminClient,
    metadata: ClusterMetadata,
    ranges: dict[tuple[str, int], PartitionRange],
    group: str,
    timeout_s: float,
) -> GroupStatus:
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout_s)[
            group
        ].result(timeout=timeout_s)
        offsets = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s
        )[group].result(timeout=timeout_s)
    except (KafkaException, TimeoutError) as exc:
        return GroupStatus(group, "unknown", None, error=_kafka_reason(exc))
    committed: dict[tuple[str, int], int | None] = {}
    for expected in PIPELINE_GROUPS.get(group, ()):
        if expected in metadata.topics:
            # The group's own topics in full, so that partitions it never committed on count.
            partitions = metadata.topics[expected].partitions
            committed.update(dict.fromkeys((expected, p) for p in partitions))
    committed.update(
        ((tp.topic, tp.partition), tp.offset)
        for tp in offsets.topic_partitions
        if tp.error is None and tp.offset >= 0
    )
    lags = tuple(
        _lag(topic, partition, offset, ranges.get((topic, partition)))
        for (topic, partition), offset in sorted(committed.items())
    )
    return GroupStatus(group, description.state.name, len(description.members), lags)


def _kafka_reason(exc: KafkaException | TimeoutError) -> str:
    return exc.args[0].str() if isinstance(exc, KafkaException) else "no answer in time"


def _lag(
    topic: str, partition: int, committed: int | None, end: PartitionRange | None
) -> PartitionLag:
    if end is None:
        return PartitionLag(topic, partition, committed, None, None)
    # A group without a committed offset starts at the earliest record (auto.offset.reset).
    start = end.low if committed is None else committed
    return PartitionLag(topic, partition, committed, end.high, max(0, end.high - start))


def _object_store_checks(settings: Settings, timeout_s: float) -> list[Check]:
    store = ObjectStore(settings, timeout_s=timeout_s)
    address = settings.s3_endpoint
    try:
        store.check()
    except ImagegenError as exc:
        return [Check("object store", address, False, str(exc))]
    reachable = Check("object store", address, True, "answers")
    target = f"{address}/{settings.s3_bucket}"
    try:
        present = store.bucket_exists()
    except ImagegenError as exc:
        return [reachable, Check("bucket", target, False, str(exc))]
    if not present:
        detail = f"bucket {settings.s3_bucket} does not exist: create it with `imagegen init`"
        return [reachable, Check("bucket", target, False, detail)]
    return [reachable, Check("bucket", target, True, "exists")]


def _metrics_checks(settings: Settings) -> list[Check]:
    """Whether this host's processor and worker serve metrics; a port of 0 means they don't."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False)
    host = "127.0.0.1" if settings.metrics_host in _WILDCARD_HOSTS else settings.metrics_host
    ports = {"processor": settings.processor_metrics_port, "worker": settings.worker_metrics_port}
    checks = []
    for component, port in ports.items():
        if port == 0:
            continue
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        advice = (
            f"is a {component} running on this host? Start one with `imagegen {component}` "
            f"(it serves metrics on IMAGEGEN_{component.upper()}_METRICS_PORT)"
        )
        try:
            response = http.request("GET", f"http://{target}/metrics")
        except HTTPError as exc:
            detail = f"{_reason(exc)}; {advice}"
            checks.append(Check(f"{component} metrics", target, False, detail, required=False))
            continue
        healthy = response.status == 200
        detail = "answers" if healthy else f"answered HTTP {response.status}; {advice}"
        checks.append(Check(f"{component} metrics", target, healthy, detail, required=False))
    return checks


def _reason(exc: HTTPError) -> str:
    """A few words for a failed HTTP request, instead of urllib3's paragraph."""
    # Checked first: urllib3 makes a refused connection a kind of connect timeout.
    if isinstance(exc.__cause__, OSError) and exc.__cause__.strerror:
        return exc.__cause__.strerror.lower()
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return "no answer in time"
    return str(exc)


def render(report: StackStatus, console: Console) -> None:
    health = _table("health", "check", "state", "where", "detail")
    for check in report.checks:
        colour = "green" if check.healthy else "red" if check.required else "yellow"
        state = f"[{colour}]{'ok' if check.healthy else 'down'}[/{colour}]"
        health.add_row(check.name, state, escape(check.target), escape(check.detail))
    console.print(health)
    if not report.topics:
        console.print("topics and consumer groups unknown: the broker did not answer")
        return
    console.print(_topics_table(report.topics))
    console.print(_groups_table(report.groups))
    dlq = report.dlq_records
    if dlq is None:
        console.print(f"{DLQ}: unknown")
    elif dlq:
        console.print(
            f"[yellow]{DLQ}: {dlq} record(s)[/yellow]; inspect them with `imagegen dlq list`"
        )
    else:
        console.print(f"{DLQ}: empty")


def _table(title: str, *columns: str) -> Table:
    """A table whose last column wraps, breaking long words, and whose others never do."""
    table = Table(title=title, title_justify="left")
    for column in columns[:-1]:
        table.add_column(column, no_wrap=True)
    table.add_column(columns[-1], overflow="fold")
    return table


def _topics_table(topics: Iterable[TopicStatus]) -> Table:
    table = _table("topics", "topic", "partitions", "records", "records per partition")
    for topic in topics:
        if topic.error is not None:
            table.add_row(topic.name, "-", "-", f"[red]{escape(topic.error)}[/red]")
            continue
        spread = " ".join(f"{p.partition}:{p.records}" for p in topic.partitions)
        table.add_row(topic.name, str(len(topic.partitions)), str(topic.records), spread)
    return table


def _groups_table(groups: Iterable[GroupStatus]) -> Table:
    table = _table("consumer groups", "group", "state", "members", "total lag", "lag per partition")
    for group in groups:
        members = "-" if group.members is None else str(group.members)
        if group.error is not None:
            error = f"[red]{escape(group.error)}[/red]"
            table.add_row(escape(group.group), group.state, members, "-", error)
            continue
        by_topic: dict[str, list[PartitionLag]] = {}
        for lag in group.partitions:
            by_topic.setdefault(lag.topic, []).append(lag)
        spreads = [
            f"{topic} " + " ".join(f"{p.partition}:{'?' if p.lag is None else p.lag}" for p in lags)
            for topic, lags in by_topic.items()
        ]
        cell = "\n".join(spreads) if spreads else "no committed offsets"
        table.add_row(escape(group.group), group.state, members, str(group.total_lag), cell)
    return table


def pipeline_status(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of tables.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for each answer from a service.")
    ] = 3.0,
) -> None:
    """Topics, consumer groups with their lag, the DLQ, and the stack's health; exit 1 when the
    broker or the object store is unhealthy.

    Records per partition are its end minus its low watermark, and lag is the end minus the
    group's committed offset, with the end a fetch reports (exact on Tansu too). Group state
    and members are what the broker reports.
    """
    report = collect(load_settings(), timeout)
    if as_json:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        render(report, Console(soft_wrap=True, highlight=False))
    if not report.healthy:
        raise typer.Exit(1)
