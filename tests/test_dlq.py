"""`imagegen dlq list|replay` against a private broker, so the DLQ holds exactly what we wrote."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Message

from imagegen.consumers.dlq import (
    MAX_REPLAY_BYTES,
    Entry,
    FailedRecords,
    Filters,
    read_dlq,
    replay,
)
from imagegen.infra.kafka import make_producer
from imagegen.infra.replay_marks import sign, verify
from imagegen.infra.settings import Settings
from imagegen.schemas import DeadLetter, Stage
from imagegen.schemas.errors import ImagegenError, InvalidMessage, ObjectStoreUnavailable
from imagegen.schemas.headers import REPLAY_HEADER
from imagegen.schemas.topics import DLQ, RENDER, REQUESTS
from tests.conftest import settings_env
from tests.helpers import read_topic

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
R1, R2, R3 = (f"0000000{n}-0000-4000-8000-000000000000" for n in (1, 2, 3))
ALL = {"bad_steps", "render_crash", "unreadable", "store_down", "garbage_value", "legacy"}
REPLAYABLE = {"bad_steps", "render_crash", "store_down", "garbage_value"}


def raised(error: BaseException) -> BaseException:
    """`error` with a traceback, as the pipeline's dead letters have."""
    try:
        raise error
    except BaseException as exc:
        return exc


def request(request_id: str, user: str, **changes: object) -> bytes:
    fields = {"schema_version": 1, "request_id": request_id, "user_id": user, "prompt": "a fox"}
    return json.dumps({**fields, **changes}).encode()


def letter(
    error: BaseException, stage: Stage, topic: str, key: bytes, value: bytes, **more: object
) -> DeadLetter:
    failed_at = more.pop("failed_at", T0)
    fields = {
        "partition": 4,
        "offset": 1234,
        "timestamp_ms": 1_790_000_000_000,
        "headers": [("traceparent", b"00-aa-01")],
        "attempts": 1,
        "group": "imagegen-processor",
        **more,
    }
    made = DeadLetter.from_failure(
        error=raised(error), stage=stage, topic=topic, key=key, value=value, **fields
    )
    return replace(made, failed_at=failed_at)


# name: (DLQ partition, dead letter or None for a record that is no dead letter)
CONTENTS: dict[str, tuple[int, DeadLetter | None]] = {
    "bad_steps": (
        0,
        letter(
            InvalidMessage("steps: must be at most 100"),
            Stage.VALIDATE,
            REQUESTS,
            b"alice",
            request(R1, "alice", steps=500),
        ),
    ),
    "render_crash": (
        0,
        letter(
            RuntimeError("CUDA out of memory\nTried to allocate 2 GiB"),
            Stage.RENDER,
            RENDER,
            b"bob",
            request(R2, "bob"),
            headers=[("imagegen.admitted_at_ms", b"123")],
            attempts=3,
            group="imagegen-worker",
            failed_at=T0 + HOUR,
        ),
    ),
    "unreadable": (0, None),
    "store_down": (
        0,
        letter(
            ObjectStoreUnavailable("S3 answered 503"),
            Stage.STORE,
            RENDER,
            b"carol",
            request(R3, "carol"),
            # A mark nobody signed: no replay. A copy must carry only its own signed mark.
            headers=[(REPLAY_HEADER, b"imagegen.dlq/2/9"), ("traceparent", b"00-cc-01")],
            failed_at=T0 + 2 * HOUR,
        ),
    ),
    "garbage_value": (
        1,
        letter(
            InvalidMessage("not JSON"),
            Stage.VALIDATE,
            REQUESTS,
            b"alice",
            b"\xff\x00 not json",
            failed_at=T0 + 3 * HOUR,
        ),
    ),
    "legacy": (
        1,
        letter(
            ValueError("old format"),
            Stage.VALIDATE,
            "legacy.requests",
            b"dave",
            b"{}",
            failed_at=T0 + 4 * HOUR,
        ),
    ),
}


def write_dlq(settings: Settings, contents: dict[str, tuple[int, DeadLetter | None]]) -> None:
    """Write `contents` to the DLQ in one batch per partition, and wait for every delivery."""
    producer = make_producer(settings, **{"message.max.bytes": 2 * MAX_REPLAY_BYTES})
    delivered = []
    for partition, dead in contents.values():
        record = (
            {"key": b"?", "value": b"junk", "headers": [("other", b"x")]}
            if dead is None
            else {"key": dead.key, "value": dead.value, "headers": dead.headers()}
        )
        producer.produce(
            DLQ, partition=partition, **record, on_delivery=lambda e, _m: delivered.append(e)
        )
    assert producer.flush(10) == 0
    assert delivered == [None] * len(contents)


@pytest.fixture
def dlq(isolated_stack: Settings) -> dict[str, str]:
    """The private stack's DLQ filled with CONTENTS; each name's DLQ coordinates."""
    write_dlq(isolated_stack, CONTENTS)
    coordinates = {}
    offsets = [0, 0, 0]
    for name, (partition, _) in CONTENTS.items():
        coordinates[name] = f"{DLQ}/{partition}/{offsets[partition]}"
        offsets[partition] += 1
    return coordinates


def names(entries: list[Entry], dlq: dict[str, str]) -> set[str]:
    return names_at([entry.coordinates for entry in entries], dlq)


def names_at(coordinates: list[str], dlq: dict[str, str]) -> set[str]:
    by_coordinates = {where: name for name, where in dlq.items()}
    return {by_coordinates[where] for where in coordinates}


def imagegen(
    settings: Settings, *args: str, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    env = {**settings_env(settings), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "imagegen", "dlq", *args],
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def headers_of(message: Message) -> list[tuple[str, bytes]]:
    return list(message.headers() or [])


def test_list_shows_every_entry_with_its_context(
    isolated_stack: Settings, dlq: dict[str, str]
) -> None:
    entries = {entry.coordinates: entry for entry in read_dlq(isolated_stack)}
    assert set(entries) == set(dlq.values())

    bad_steps = entries[dlq["bad_steps"]]
    assert bad_steps.letter == CONTENTS["bad_steps"][1]
    assert bad_steps.request_id == R1
    assert entries[dlq["render_crash"]].request_id == R2
    assert entries[dlq["garbage_value"]].request_id is None
    unreadable = entries[dlq["unreadable"]]
    assert unreadable.letter is None
    assert unreadable.problem.startswith("not a dead letter: header dlq.")

    table = imagegen(isolated_stack, "list")
    assert table.returncode == 0, table.stderr
    assert f"{DLQ}: 6 failed records" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " 0/0 " in line)
    for shown in (
        "2026-03-01 12:00:00",
        "validate",
        "imagegen.schemas.errors.InvalidMessage",
        "steps: must be at most 100",
        f"{REQUESTS}/4/1234",
        R1,
    ):
        assert shown in row
    crash = next(line for line in table.stdout.splitlines() if " 0/1 " in line)
    assert "CUDA out of memory" in crash and "Tried to allocate" not in crash
    assert "unreadable" in next(line for line in table.stdout.splitlines() if " 0/2 " in line)

    as_json = imagegen(isolated_stack, "list", "--json", "--stage", "render")
    assert as_json.returncode == 0, as_json.stderr
    (line,) = as_json.stdout.splitlines()
    shown = json.loads(line)
    assert shown["dlq_partition"] == 0 and shown["dlq_offset"] == 1
    assert shown["stage"] == "render" and shown["attempts"] == 3
    assert shown["error_class"] == "builtins.RuntimeError"
    assert shown["original_topic"] == RENDER and shown["request_id"] == R2
    assert shown["key"] == "bob"
    assert "Traceback" in shown["error_stacktrace"]


def test_each_filter_selects_the_right_entries(
    isolated_stack: Settings, dlq: dict[str, str]
) -> None:
    cases = [
        (Filters(), ALL),
        (Filters(request_id=R1), {"bad_steps"}),
        (Filters(request_id="no-such-request"), set()),
        (Filters(error_class="InvalidMessage"), {"bad_steps", "garbage_value"}),
        (Filters(error_class="builtins.RuntimeError"), {"render_crash"}),
        (Filters(error_class="RuntimeErr"), set()),
        (Filters(stage=Stage.STORE), {"store_down"}),
        (Filters(stage=Stage.VALIDATE), {"bad_steps", "garbage_value", "legacy"}),
        (Filters(since=T0 + HOUR, until=T0 + 3 * HOUR), {"render_crash", "store_down"}),
        (Filters(since=T0 + 4 * HOUR), {"legacy"}),
        (Filters(partition=0), {"bad_steps", "render_crash", "unreadable", "store_down"}),
        (Filters(partition=0, from_offset=1, to_offset=2), {"render_crash", "unreadable"}),
        # Past the end Tansu reports for a partition written in one batch.
        (Filters(partition=0, from_offset=3), {"store_down"}),
        (Filters(from_offset=1), {"render_crash", "unreadable", "store_down", "legacy"}),
        (Filters(to_offset=0), {"bad_steps", "garbage_value"}),
        (Filters(partition=2), set()),
        (Filters(stage=Stage.VALIDATE, partition=1), {"garbage_value", "legacy"}),
    ]
    for filters, expected in cases:
        assert names(list(read_dlq(isolated_stack, filters)), dlq) == expected, filters

    with pytest.raises(ImagegenError, match="no partition 7"):
        list(read_dlq(isolated_stack, Filters(partition=7)))
    with pytest.raises(ValueError, match="needs a timezone"):
        Filters(since=datetime(2026, 3, 1))


def test_nothing_is_published_by_a_dry_run_a_refusal_or_a_no(
    isolated_stack: Settings, dlq: dict[str, str]
) -> None:
    summary = replay(isolated_stack, FailedRecords(isolated_stack), dry_run=True)
    assert summary.dry_run and summary.selected == 6
    assert names_at([r.coordinates for r in summary.replayed], dlq) == REPLAYABLE
    reasons = dict(summary.skipped)
    assert reasons[dlq["legacy"]] == "original topic legacy.requests is not a pipeline topic"
    assert reasons[dlq["unreadable"]].startswith("unreadable entry (not a dead letter")

    dry = imagegen(isolated_stack, "replay", "--partition", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would replay {dlq['render_crash']} to {RENDER}" in dry.stdout
    assert f"skipped {dlq['unreadable']}: unreadable entry" in dry.stdout
    assert "dry run: would replay 3 of 4 selected records, skipped 1" in dry.stdout

    refused = imagegen(isolated_stack, "replay")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr

    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        declined = imagegen(isolated_stack, "replay", stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert declined.returncode == 1
    assert "Replay all 6 failed records" in declined.stdout
    assert "Aborted" in declined.stderr

    # A sentinel keyed like each replayable letter shares its partition: had anything been
    # published, it would come before the sentinel.
    producer = make_producer(isolated_stack)
    targets = {REQUESTS: [b"alice"], RENDER: [b"bob", b"carol"]}
    for topic, keys in targets.items():
        for key in keys:
            producer.produce(topic, key=key, value=b"sentinel")
    assert producer.flush(10) == 0
    for topic, keys in targets.items():
        found = read_topic(isolated_stack, topic, lambda ms, keys=keys: len(ms) >= len(keys))
        assert [m.value() for m in found] == [b"sentinel"] * len(keys)


def test_replay_republishes_originals_with_replay_of(
    isolated_stack: Settings, dlq: dict[str, str]
) -> None:
    calls = []
    summary = replay(
        isolated_stack,
        FailedRecords(isolated_stack),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert names_at([r.coordinates for r in summary.replayed], dlq) == REPLAYABLE
    assert names_at([where for where, _ in summary.skipped], dlq) == {"legacy", "unreadable"}
    assert summary.failed == []
    assert calls == [(n, 6) for n in range(1, 7)]

    republished = [
        *read_topic(isolated_stack, REQUESTS, lambda ms: len(ms) >= 2),
        *read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= 2),
    ]
    by_value = {message.value(): message for message in republished}
    assert len(by_value) == 4
    for name in REPLAYABLE:
        original = CONTENTS[name][1]
        assert original is not None
        message = by_value[original.value]
        assert message.topic() == original.original_topic
        assert message.key() == original.key
        kept = [(k, v) for k, v in original.original_headers if k != REPLAY_HEADER]
        mark = sign(dlq[name], isolated_stack)
        assert headers_of(message) == [*kept, (REPLAY_HEADER, mark)]
        assert verify(mark, isolated_stack) == dlq[name]


def test_cli_replay_with_a_rate_replays_everything(
    isolated_stack: Settings, dlq: dict[str, str]
) -> None:
    done = imagegen(isolated_stack, "replay", "--yes", "--rate", "20")
    assert done.returncode == 0, done.stderr
    assert "replayed 4 of 6 selected records, skipped 2, failed 0" in done.stdout
    assert f"replayed {dlq['bad_steps']} to {REQUESTS} (request {R1})" in done.stdout
    assert "imagegen results --follow" in done.stdout
    assert "imagegen fetch " in done.stdout
    assert f"skipped {dlq['legacy']}: original topic legacy.requests" in done.stdout

    republished = [
        *read_topic(isolated_stack, REQUESTS, lambda ms: len(ms) >= 2),
        *read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= 2),
    ]
    marks = [dict(headers_of(message))[REPLAY_HEADER] for message in republished]
    assert {verify(mark, isolated_stack) for mark in marks} == {dlq[name] for name in REPLAYABLE}


def test_a_failed_publish_is_reported_and_exits_non_zero(isolated_stack: Settings) -> None:
    # The DLQ takes what a replay's size limit refuses.
    value = b"x" * (MAX_REPLAY_BYTES + 1)
    huge = letter(ValueError("too big"), Stage.VALIDATE, REQUESTS, b"erin", value)
    write_dlq(isolated_stack, {"huge": (0, huge), "fine": CONTENTS["bad_steps"]})

    result = imagegen(isolated_stack, "replay", "--yes")
    assert result.returncode == 1
    assert f"failed {DLQ}/0/0: " in result.stdout
    assert "replayed 1 of 2 selected records, skipped 0, failed 1" in result.stdout


def replay_chain(settings: Settings) -> dict[str, tuple[int, DeadLetter | None]]:
    """R1 failed, was replayed and failed again twice (its third letter on another DLQ
    partition); R2 failed once; R3's letter carries a mark nobody signed."""

    def replayed_from(where: str) -> list[tuple[str, bytes]]:
        return [(REPLAY_HEADER, sign(where, settings)), ("traceparent", b"00-aa-01")]

    def r1(**more: object) -> DeadLetter:
        failure = InvalidMessage("steps: must be at most 100")
        value = request(R1, "alice", steps=500)
        return letter(failure, Stage.VALIDATE, REQUESTS, b"alice", value, **more)

    forged_mark = f"{DLQ}/0/0;{'0' * 64}".encode()
    return {  # in DLQ order: 0/0, 0/1, 0/2, then 1/0, 1/1
        "first": (0, r1()),
        "other": (
            0,
            letter(
                RuntimeError("boom"),
                Stage.RENDER,
                RENDER,
                b"bob",
                request(R2, "bob"),
                failed_at=T0 + HOUR,
            ),
        ),
        "second": (
            0,
            r1(offset=2000, headers=replayed_from(f"{DLQ}/0/0"), failed_at=T0 + 2 * HOUR),
        ),
        "forged": (
            1,
            letter(
                InvalidMessage("bad"),
                Stage.VALIDATE,
                REQUESTS,
                b"carol",
                request(R3, "carol", steps=500),
                headers=[(REPLAY_HEADER, forged_mark)],
                failed_at=T0 + 2 * HOUR,
            ),
        ),
        "third": (1, r1(offset=3000, headers=replayed_from(f"{DLQ}/0/2"), failed_at=T0 + 3 * HOUR)),
    }


def test_list_shows_each_failed_record_once_after_its_replays(isolated_stack: Settings) -> None:
    write_dlq(isolated_stack, replay_chain(isolated_stack))
    records = FailedRecords(isolated_stack)
    assert len(records) == 3
    shown = {failure.latest.coordinates: failure for failure in records}
    assert set(shown) == {f"{DLQ}/1/1", f"{DLQ}/0/1", f"{DLQ}/1/0"}
    chain = shown[f"{DLQ}/1/1"]
    assert (chain.replays, chain.first) == (2, f"{DLQ}/0/0")
    assert chain.latest.letter is not None and chain.latest.letter.original_offset == 3000
    assert shown[f"{DLQ}/1/0"].replays == 0  # an unsigned mark joins no record

    # Filters select by the latest letter.
    def latest(filters: Filters) -> set[str]:
        return {failure.latest.coordinates for failure in FailedRecords(isolated_stack, filters)}

    assert latest(Filters(request_id=R1)) == {f"{DLQ}/1/1"}
    assert latest(Filters(partition=0)) == {f"{DLQ}/0/1"}
    assert latest(Filters(until=T0 + 3 * HOUR, stage=Stage.VALIDATE)) == {f"{DLQ}/1/0"}

    table = imagegen(isolated_stack, "list")
    assert table.returncode == 0, table.stderr
    assert f"{DLQ}: 3 failed records" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " 1/1 " in line)
    assert f"{REQUESTS}/4/3000" in row and R1 in row
    assert not any(f" 0/{n} " in line for n in (0, 2) for line in table.stdout.splitlines())

    as_json = imagegen(isolated_stack, "list", "--json", "--request-id", R1)
    (line,) = as_json.stdout.splitlines()
    assert json.loads(line) | {"replays": 2, "first_entry": f"{DLQ}/0/0"} == json.loads(line)


def test_a_replay_skips_records_whose_replay_failed_again(isolated_stack: Settings) -> None:
    write_dlq(isolated_stack, replay_chain(isolated_stack))
    summary = replay(isolated_stack, FailedRecords(isolated_stack), dry_run=True)
    assert {r.coordinates for r in summary.replayed} == {f"{DLQ}/0/1", f"{DLQ}/1/0"}
    ((skipped, reason),) = summary.skipped
    assert skipped == f"{DLQ}/1/1"
    assert reason.startswith("replayed 2 time(s) already and failed again; pass --again")

    again = imagegen(isolated_stack, "replay", "--request-id", R1, "--again")
    assert again.returncode == 0, again.stderr
    assert "replayed 1 of 1 selected records, skipped 0, failed 0" in again.stdout
    (republished,) = read_topic(isolated_stack, REQUESTS, lambda ms: len(ms) >= 1)
    # Only the latest letter goes back, marked as coming from it.
    assert verify(dict(headers_of(republished))[REPLAY_HEADER], isolated_stack) == f"{DLQ}/1/1"

    default = imagegen(isolated_stack, "replay", "--request-id", R1)
    assert default.returncode == 0, default.stderr
    assert "replayed 0 of 1 selected records, skipped 1, failed 0" in default.stdout
    assert "imagegen results --follow" not in default.stdout


def test_listing_and_replaying_hold_no_letters(isolated_stack: Settings) -> None:
    padding = " " * 400_000  # JSON whitespace: the request id stays readable
    contents = {
        f"big{n}": (
            n % 3,
            letter(
                InvalidMessage("too big"),
                Stage.VALIDATE,
                REQUESTS,
                b"alice",
                request(f"{n:08d}-0000-4000-8000-000000000000", "alice", pad=padding),
            ),
        )
        for n in range(24)
    }
    write_dlq(isolated_stack, contents)  # about 9.6 MB of letters
    tracemalloc.start()
    try:
        listed = sum(1 for _ in FailedRecords(isolated_stack))
        summary = replay(isolated_stack, FailedRecords(isolated_stack), dry_run=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed == 24 and len(summary.replayed) == 24
    # Holding the letters would take their 9.6 MB; streaming holds a few at a time.
    assert peak < 4_000_000, peak
