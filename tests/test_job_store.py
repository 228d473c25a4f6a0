"""The job store and its indexer, against the real S3 server and broker.

The store's tests share the session's stack (each uses user ids of its own). The indexer's
tests each get a stack of their own: they watch the offsets that the job-index group
commits, which no other test may move.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import urllib3
from confluent_kafka import KafkaError, Message, TopicPartition

from imagegen.gateway.indexer import JobIndexer
from imagegen.gateway.job_store import InvalidCursor, JobRecord, JobStore
from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.schemas import GenerationRequest, GenerationResult, Reason, Status, encode
from imagegen.schemas.fields import utc_now
from imagegen.schemas.topics import JOB_INDEX_GROUP, RESULTS
from tests.helpers import free_port, imagegen, s3_client
from tests.proxy import Proxy

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def _request(user_id: str | None = None) -> GenerationRequest:
    return GenerationRequest.new(user_id=user_id or f"u-{uuid.uuid4()}", prompt="a fox")


def _record(
    request: GenerationRequest, created_at: datetime = T0, body: bytes = b"{}"
) -> JobRecord:
    return JobRecord(
        request=request, created_at=created_at, body_sha256=hashlib.sha256(body).hexdigest()
    )


def _succeeded(request: GenerationRequest, bucket: str, key: str, data: bytes) -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        user_id=request.user_id,
        status=Status.SUCCEEDED,
        bucket=bucket,
        object_key=key,
        content_type="image/png",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        completed_at=utc_now(),
    )


def _failed(request: GenerationRequest, detail: str = "out of memory") -> GenerationResult:
    return GenerationResult(
        request_id=request.request_id,
        user_id=request.user_id,
        status=Status.FAILED,
        reason=Reason.RENDER_ERROR,
        detail=detail,
        completed_at=utc_now(),
    )


@pytest.fixture
def jobs(settings: Settings) -> JobStore:
    return JobStore(ObjectStore(settings))


@pytest.fixture
def unreachable() -> JobStore:
    """A store whose every request to S3 would fail: a call that returns never made one."""
    return JobStore(ObjectStore(load_settings(s3_endpoint=f"127.0.0.1:{free_port()}"), 1))


# ---- the store ------------------------------------------------------------------------------


def test_a_job_and_its_result_round_trip(jobs: JobStore, settings: Settings) -> None:
    request = _request()
    record = _record(request)
    assert jobs.put_job(record) == record
    assert jobs.job(request.request_id) == record
    assert jobs.result(request.request_id) is None
    result = _succeeded(request, settings.s3_bucket, "images/x.png", b"pixels")
    jobs.put_result(result)
    assert jobs.result(request.request_id) == result


def test_the_first_record_of_a_request_id_stays(jobs: JobStore) -> None:
    request = _request()
    first = _record(request, T0, b"first body")
    jobs.put_job(first)
    assert jobs.put_job(_record(request, T0 + timedelta(seconds=5), b"second body")) == first
    assert jobs.job(request.request_id) == first
    assert jobs.list_jobs(request.user_id, 10, None) == ([request.request_id], None)


def test_a_later_result_replaces_the_earlier(jobs: JobStore, settings: Settings) -> None:
    request = _request()
    jobs.put_result(_failed(request))
    latest = _succeeded(request, settings.s3_bucket, "images/x.png", b"pixels")
    jobs.put_result(latest)
    assert jobs.result(request.request_id) == latest


def test_a_missing_job_and_result_are_none(jobs: JobStore) -> None:
    request_id = _request().request_id
    assert (jobs.job(request_id), jobs.result(request_id)) == (None, None)


@pytest.mark.parametrize(
    "request_id",
    [
        "",
        "..",
        "../../users/alice/jobs",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV/../01ARZ3NDEKTSV4RRFFQ69G5FAW",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV/",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV\n",
        "01arz3ndektsv4rrffq69g5fav",  # a ULID has one spelling: uppercase
        "8ZZZZZZZZZZZZZZZZZZZZZZZZZ",  # beyond the largest ULID
        "6F9619FF-8B86-D011-B42D-00C04FC964FF",  # a UUID has one spelling: lowercase
        "%2e%2e",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV?x=1",
    ],
)
def test_anything_but_a_request_id_is_no_job_and_reaches_no_store(
    unreachable: JobStore, request_id: str
) -> None:
    assert unreachable.job(request_id) is None
    assert unreachable.result(request_id) is None


def test_a_listing_is_newest_first_in_pages(jobs: JobStore) -> None:
    user = f"u-{uuid.uuid4()}"
    requests = [_request(user) for _ in range(5)]
    for i in (3, 0, 4, 1, 2):  # written out of order: the order is the creation time's
        jobs.put_job(_record(requests[i], T0 + timedelta(seconds=i)))
    newest_first = [r.request_id for r in reversed(requests)]

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = jobs.list_jobs(user, 2, cursor)
        pages.append(page)
        if cursor is None:
            break
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    # A page that ends exactly at the last job has no next page to offer.
    assert jobs.list_jobs(user, 5, None) == (newest_first, None)
    assert jobs.list_jobs(user, 100, None) == (newest_first, None)


def test_a_listing_shows_only_its_users_jobs(jobs: JobStore) -> None:
    user = f"u-{uuid.uuid4()}"
    mine = _request(user)
    jobs.put_job(_record(mine))
    for neighbour in (f"{user}x", f"{user}.x", f"x{user}"):  # prefixes and extensions of it
        jobs.put_job(_record(_request(neighbour)))
    assert jobs.list_jobs(user, 100, None) == ([mine.request_id], None)
    assert jobs.list_jobs(f"u-{uuid.uuid4()}", 100, None) == ([], None)


@pytest.mark.parametrize("user", [".", "..", "a@b.c", "_-"])
def test_any_user_id_has_a_listing_of_its_own(jobs: JobStore, user: str) -> None:
    """Also the ids that S3 clients would refuse or resolve away as key segments."""
    request = _request(user)
    jobs.put_job(_record(request, datetime.now(UTC)))  # newest: first in a shared listing
    page, _cursor = jobs.list_jobs(user, 1, None)
    assert page == [request.request_id]


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        "../../jobs",
        "0000000000000",
        "0000000000000-",
        "000000000000-01ARZ3NDEKTSV4RRFFQ69G5FAV",  # 12 digits
        "00000000000000-01ARZ3NDEKTSV4RRFFQ69G5FAV",  # 14 digits
        "000000000000٣-01ARZ3NDEKTSV4RRFFQ69G5FAV",  # a digit, but not an ASCII one
        "0000000000000-01ARZ3NDEKTSV4RRFFQ69G5FAV/../x",
        "0000000000000_01ARZ3NDEKTSV4RRFFQ69G5FAV",
    ],
)
def test_a_cursor_that_was_never_issued_is_refused(unreachable: JobStore, cursor: str) -> None:
    with pytest.raises(InvalidCursor, match="next_cursor") as refused:
        unreachable.list_jobs("alice", 10, cursor)
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("limit", [0, -1, 101])
def test_a_page_holds_1_to_100_jobs(unreachable: JobStore, limit: int) -> None:
    with pytest.raises(ValueError, match="limit must be 1 to 100"):
        unreachable.list_jobs("alice", limit, None)


def test_an_image_url_serves_the_image(jobs: JobStore, settings: Settings) -> None:
    request = _request()
    key = f"images/user={request.user_id}/{request.request_id}.png"
    ObjectStore(settings).put_if_absent(key, b"pixels", "image/png")
    url = jobs.image_url(_succeeded(request, settings.s3_bucket, key, b"pixels"), 60)
    response = urllib3.request("GET", url)
    assert (response.status, response.data) == (200, b"pixels")
    with pytest.raises(ValueError, match="has no image"):
        jobs.image_url(_failed(request), 60)
    with pytest.raises(ValueError, match="IMAGEGEN_S3_BUCKET"):
        jobs.image_url(_succeeded(request, "another-bucket", key, b"pixels"), 60)


def test_init_sets_the_7_day_expiry_of_jobs_and_users(settings: Settings) -> None:
    done = imagegen(settings, "init")  # on the provisioned stack: it changes nothing
    assert done.returncode == 0, done.stderr
    assert "jobs/ and users/ expire after 7 days" in done.stdout
    rules = s3_client(settings).get_bucket_lifecycle_configuration(Bucket=settings.s3_bucket)
    expiring = {
        rule["Filter"]["Prefix"]: rule["Expiration"]["Days"]
        for rule in rules["Rules"]
        if rule["Status"] == "Enabled"
    }
    assert expiring == {"jobs/": 7, "users/": 7}


# ---- the indexer ----------------------------------------------------------------------------


def _publish(settings: Settings, records: list[tuple[int, bytes, bytes | None]]) -> list[int]:
    """Send (partition, key, value) records to imagegen.results; return their offsets."""
    producer = make_producer(settings)
    offsets: dict[int, int] = {}

    def delivered(index: int) -> Callable[[KafkaError | None, Message], None]:
        def record(error: KafkaError | None, message: Message) -> None:
            assert error is None, f"the broker refused a record: {error}"
            offsets[index] = message.offset()

        return record

    for index, (partition, key, value) in enumerate(records):
        producer.produce(RESULTS, value, key, partition=partition, on_delivery=delivered(index))
    assert producer.flush(30) == 0, "records still unsent after 30s"
    return [offsets[index] for index in range(len(records))]


def _result_record(partition: int, result: GenerationResult) -> tuple[int, bytes, bytes]:
    return partition, result.kafka_key, encode(result)


def _eventually(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def committed(isolated_stack: Settings) -> Iterator[Callable[[int], int]]:
    """The job-index group's committed offset of a partition of imagegen.results."""
    reader = make_consumer(isolated_stack, group_id=JOB_INDEX_GROUP)  # asks, never joins

    def offset(partition: int) -> int:
        (position,) = reader.committed([TopicPartition(RESULTS, partition)], timeout=10)
        return position.offset

    yield offset
    reader.close()


def _indexed_past(
    committed: Callable[[int], int], partition: int, offset: int
) -> Callable[[], bool]:
    """Whether the group has committed past `offset`: everything up to it is written."""
    return lambda: committed(partition) > offset


def test_the_indexer_writes_the_latest_result_of_each_request(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    jobs = JobStore(ObjectStore(isolated_stack))
    a, b, c = _request(), _request(), _request()
    bucket = isolated_stack.s3_bucket
    a_first, a_latest = _failed(a), _succeeded(a, bucket, "images/a.png", b"a")
    b_only, c_only = _failed(b), _succeeded(c, bucket, "images/c.png", b"c")
    with JobIndexer(isolated_stack, jobs):
        ends = _publish(
            isolated_stack,
            [
                _result_record(0, a_first),
                _result_record(0, b_only),
                _result_record(0, a_latest),  # a replay from the DLQ answers a again
                _result_record(3, c_only),
            ],
        )
        _eventually(_indexed_past(committed, 0, ends[2]), "partition 0 indexed")
        _eventually(_indexed_past(committed, 3, ends[3]), "partition 3 indexed")
    assert jobs.result(a.request_id) == a_latest
    assert jobs.result(b.request_id) == b_only
    assert jobs.result(c.request_id) == c_only


def _result_or_fail(jobs: JobStore, request: GenerationRequest) -> GenerationResult:
    result = jobs.result(request.request_id)
    assert result is not None, f"no result.json for {request.request_id}"
    return result


def test_unreadable_records_are_skipped_and_later_results_indexed(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    jobs = JobStore(ObjectStore(isolated_stack))
    after = _request()
    with JobIndexer(isolated_stack, jobs):
        ends = _publish(
            isolated_stack,
            [
                (1, b"garbage", b"\xff not json"),
                (1, b"half", b'{"request_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}'),
                (1, b"tombstone", None),
                _result_record(1, _failed(after)),
            ],
        )
        _eventually(_indexed_past(committed, 1, ends[-1]), "partition 1 indexed")
    assert _result_or_fail(jobs, after).status is Status.FAILED


def test_an_indexer_started_later_indexes_what_was_published_before(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    """A new group starts from the earliest result; a restarted one from its commits."""
    jobs = JobStore(ObjectStore(isolated_stack))
    early, late = _request(), _request()
    (early_end,) = _publish(isolated_stack, [_result_record(2, _failed(early))])
    with JobIndexer(isolated_stack, jobs):
        _eventually(_indexed_past(committed, 2, early_end), "the earlier result indexed")
    assert _result_or_fail(jobs, early).status is Status.FAILED

    (late_end,) = _publish(isolated_stack, [_result_record(2, _failed(late))])
    assert jobs.result(late.request_id) is None  # no indexer runs
    with JobIndexer(isolated_stack, jobs):
        _eventually(_indexed_past(committed, 2, late_end), "the later result indexed")
    assert _result_or_fail(jobs, late).status is Status.FAILED


def test_a_store_outage_holds_the_results_until_it_ends(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    host, port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = JobStore(
        ObjectStore(isolated_stack.model_copy(update={"s3_endpoint": proxy.address}), 2)
    )
    request = _request()
    try:
        with JobIndexer(isolated_stack, through_proxy) as indexer:
            _eventually(indexer.healthy, "the indexer joined its group")
            proxy.cut()
            (end,) = _publish(isolated_stack, [_result_record(4, _failed(request))])
            _eventually(lambda: not indexer.healthy(), "the indexer reports the failing store")
            assert committed(4) <= end  # not committed past a result it could not write
            proxy.restore()
            _eventually(_indexed_past(committed, 4, end), "the result indexed after the outage")
            _eventually(indexer.healthy, "the indexer healthy again")
    finally:
        proxy.close()
    assert _result_or_fail(JobStore(ObjectStore(isolated_stack)), request).status is Status.FAILED


def test_the_partitions_of_a_stopped_indexer_move_to_the_other(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    jobs = JobStore(ObjectStore(isolated_stack))
    partitions = range(6)  # imagegen.results has 6

    def publish_to_every_partition() -> list[tuple[GenerationRequest, int, int]]:
        requests = [_request() for _ in partitions]
        ends = _publish(
            isolated_stack,
            [_result_record(p, _failed(r)) for p, r in zip(partitions, requests, strict=True)],
        )
        return list(zip(requests, partitions, ends, strict=True))

    def all_indexed(published: list[tuple[GenerationRequest, int, int]]) -> None:
        for request, partition, end in published:
            _eventually(_indexed_past(committed, partition, end), f"partition {partition} indexed")
            assert _result_or_fail(jobs, request).status is Status.FAILED

    with JobIndexer(isolated_stack, jobs) as staying:
        leaving = JobIndexer(isolated_stack, jobs).start()
        try:
            # Both joined: the group shared the partitions between them.
            _eventually(lambda: staying.healthy() and leaving.healthy(), "both joined")
            all_indexed(publish_to_every_partition())
        finally:
            leaving.close()
        all_indexed(publish_to_every_partition())


def test_partitions_that_moved_away_during_an_outage_are_read_when_they_come_back(
    isolated_stack: Settings, committed: Callable[[int], int]
) -> None:
    """The indexer pauses its partitions while it retries a failing store, and librdkafka
    keeps a partition paused across its revocation and return: those that another gateway
    took meanwhile must be read again once they come back."""
    host, port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = JobStore(
        ObjectStore(isolated_stack.model_copy(update={"s3_endpoint": proxy.address}), 2)
    )
    direct = JobStore(ObjectStore(isolated_stack))
    partitions = range(6)  # imagegen.results has 6
    try:
        with JobIndexer(isolated_stack, through_proxy) as staying:
            _eventually(staying.healthy, "the indexer joined its group")
            proxy.cut()
            _publish(isolated_stack, [_result_record(p, _failed(_request())) for p in partitions])
            _eventually(lambda: not staying.healthy(), "the indexer reports the failing store")
            with JobIndexer(isolated_stack, direct) as passing:
                _eventually(passing.healthy, "a second indexer joined, taking partitions")
                proxy.restore()
                _eventually(staying.healthy, "the first indexer healthy again")
            # Every partition is the first indexer's again.
            requests = [_request() for _ in partitions]
            ends = _publish(
                isolated_stack,
                [_result_record(p, _failed(r)) for p, r in zip(partitions, requests, strict=True)],
            )
            for partition, end in zip(partitions, ends, strict=True):
                _eventually(_indexed_past(committed, partition, end), f"partition {partition}")
    finally:
        proxy.close()
    for request in requests:
        assert _result_or_fail(direct, request).status is Status.FAILED
