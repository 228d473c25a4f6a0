"""Several render workers in one group: a worker joining or leaving moves only the partitions
that must move (cooperative-sticky assignment), each topic stays shared out evenly, and a
render longer than the poll interval costs no worker its membership."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from imagegen.consumers.storage import object_key
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationRequest, Status
from imagegen.schemas.topics import RENDER
from tests import test_worker
from tests.helpers import results_for, s3_client
from tests.test_worker import small_requests, submit, wait_for_line

worker_factory = test_worker.worker_factory  # the fixture, shared

_MOVE = re.compile(r"^(assigned|revoked|lost) (\[.*\])$")


def moves(log: Path) -> list[tuple[str, set[str]]]:
    """The worker's rebalance log lines, in order: ("assigned", {"imagegen.render[0]", ...})."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        matched = _MOVE.match(json.loads(line).get("message", "")) if line.startswith("{") else None
        if matched:
            found.append((matched[1], set(ast.literal_eval(matched[2]))))
    return found


def held(log: Path) -> set[str]:
    partitions: set[str] = set()
    for kind, names in moves(log):
        partitions = partitions | names if kind == "assigned" else partitions - names
    return partitions


def interactive(partitions: set[str]) -> set[str]:
    return {name for name in partitions if name.startswith(f"{RENDER}[")}


def test_workers_joining_and_leaving_move_only_the_partitions_that_must_move(
    worker_factory, isolated_stack: Settings
) -> None:
    s3 = s3_client(isolated_stack)
    s3.put_bucket_versioning(
        Bucket=isolated_stack.s3_bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    # Longer than the tests' 2 s poll interval, and rendering while the others join.
    slow = GenerationRequest.new(
        user_id="user-slow", prompt="a slow lighthouse", width=256, height=256, steps=100
    )
    requests = [slow, *small_requests(60)]
    first = worker_factory("--log-level", "debug")
    submit(isolated_stack, [slow])
    wait_for_line(first.log, "rendering 1 request(s)")
    submit(isolated_stack, requests[1:])
    everything = set(held(first.log))
    assert len(everything) == 12, moves(first.log)  # 6 interactive and 6 batch partitions

    second = worker_factory()
    wait_for_line(second.log, "assigned ")
    third = worker_factory()
    wait_for_line(third.log, "assigned ")
    found = results_for(isolated_stack, {r.request_id for r in requests}, timeout_s=180)

    # Each join took partitions from those who held them; nobody gave up all it held to
    # take some back (the eager protocol's revoke-everything), and nobody lost any.
    workers = (first, second, third)
    for worker in workers:
        worker.assert_running()
        kinds = [kind for kind, _ in moves(worker.log)]
        assert "lost" not in kinds, worker.log.read_text()[-3000:]
    first_moves = moves(first.log)
    revoked = [names for kind, names in first_moves if kind == "revoked"]
    assert revoked and all(names < everything for names in revoked), first_moves
    holdings = [held(worker.log) for worker in workers]
    assert set().union(*holdings) == everything
    assert sum(len(h) for h in holdings) == len(everything), holdings
    # Each topic is shared out evenly: every worker has its third of the interactive work.
    assert [len(interactive(h)) for h in holdings] == [2, 2, 2], holdings

    # The third leaves: its partitions go to the others, who keep what they hold.
    kept = [held(first.log), held(second.log)]
    assert third.stop() == 0
    leftover = [*small_requests(12)]
    submit(isolated_stack, leftover)
    found |= results_for(isolated_stack, {r.request_id for r in leftover}, timeout_s=120)
    for worker, before in zip((first, second), kept, strict=True):
        assert before <= held(worker.log), moves(worker.log)
        assert len(interactive(held(worker.log))) == 3
    assert held(first.log) | held(second.log) == everything

    versions = s3.list_object_versions(Bucket=isolated_stack.s3_bucket).get("Versions", [])
    per_key: dict[str, int] = {}
    for version in versions:
        per_key[version["Key"]] = per_key.get(version["Key"], 0) + 1
    for request in [*requests, *leftover]:
        assert any(r.status is Status.SUCCEEDED for r in found[request.request_id])
        assert per_key[object_key(request)] == 1
    (slow_result, *_) = found[slow.request_id]
    assert slow_result.timings is not None and slow_result.timings.render_ms > 2500
