"""Crash marks: what a worker holds on disk while it renders, and what a death leaves.
Deaths are real: a child process that exits inside the render, with no cleanup."""

from __future__ import annotations

import multiprocessing
import os
from contextlib import ExitStack
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from imagegen.consumers.crashes import Crashes, CrashLedger, Record
from imagegen.schemas.errors import ConfigError

RECORD = Record("imagegen.render", 3, 41, "01JD3Z5K8Q6W2X9Y7V4T1R0P0M")
OTHER = Record("imagegen.render", 3, 42, "01JD3Z5K8Q6W2X9Y7V4T1R0P0N")
# Threads may run in the test process; a fresh interpreter is the safe child.
SPAWN = multiprocessing.get_context("spawn")


def _render_then_die(directory: Path, records: list[Record]) -> None:
    ledger = CrashLedger(directory)
    with ledger.rendering([(record, ledger.crashes(record)) for record in records]):
        os._exit(0)  # no cleanup runs: as a process killed mid-render


def _render_until_told(directory: Path, marked: Event, finish: Event) -> None:
    with CrashLedger(directory).rendering([(RECORD, Crashes())]):
        marked.set()
        finish.wait(60)


def die_rendering(directory: Path, *records: Record) -> None:
    child = SPAWN.Process(target=_render_then_die, args=(directory, list(records)))
    child.start()
    child.join(60)
    assert child.exitcode == 0


def test_a_record_never_rendered_has_no_crashes(tmp_path) -> None:
    assert CrashLedger(tmp_path).crashes(RECORD) == Crashes()


def test_a_first_death_makes_suspects_and_only_deaths_alone_as_one_count(tmp_path) -> None:
    ledger = CrashLedger(tmp_path)
    die_rendering(tmp_path, RECORD, OTHER)
    assert ledger.crashes(RECORD) == ledger.crashes(OTHER) == Crashes(suspect=True, alone=0)
    die_rendering(tmp_path, RECORD)
    assert ledger.crashes(RECORD) == Crashes(suspect=True, alone=1)
    die_rendering(tmp_path, RECORD)
    assert ledger.crashes(RECORD) == Crashes(suspect=True, alone=2)


def test_a_first_death_alone_only_makes_a_suspect(tmp_path) -> None:
    # Under sparse traffic every batch is of one: an innocent caught by an unrelated death
    # must not be counted against at once.
    die_rendering(tmp_path, OTHER)
    assert CrashLedger(tmp_path).crashes(OTHER) == Crashes(suspect=True, alone=0)


def test_a_render_that_returns_or_raises_leaves_no_mark(tmp_path) -> None:
    ledger = CrashLedger(tmp_path)
    with ledger.rendering([(RECORD, Crashes(suspect=True, alone=1))]):
        pass
    with pytest.raises(RuntimeError), ledger.rendering([(RECORD, Crashes())]):
        raise RuntimeError("the pipeline failed")
    assert ledger.crashes(RECORD) == Crashes()
    assert list(tmp_path.iterdir()) == []


def test_a_live_render_in_this_process_is_not_a_death(tmp_path) -> None:
    ledger = CrashLedger(tmp_path)
    with ledger.rendering([(RECORD, Crashes(suspect=True, alone=1))]):
        assert ledger.crashes(RECORD) == Crashes(suspect=True, alone=1)
        ledger.forget(RECORD)
        # Looking did not take the render's lock from it.
        assert ledger.crashes(RECORD) == Crashes(suspect=True, alone=1)
        assert (tmp_path / RECORD.name).exists()


def test_a_live_render_elsewhere_is_not_a_death(tmp_path) -> None:
    marked, finish = SPAWN.Event(), SPAWN.Event()
    other_worker = SPAWN.Process(target=_render_until_told, args=(tmp_path, marked, finish))
    other_worker.start()
    try:
        assert marked.wait(60)
        ledger = CrashLedger(tmp_path)
        assert ledger.crashes(RECORD) == Crashes()
        ledger.forget(RECORD)  # not a dead render's mark: kept
        assert (tmp_path / RECORD.name).exists()
    finally:
        finish.set()
        other_worker.join(60)
    assert ledger.crashes(RECORD) == Crashes()  # it finished, and removed its mark


def test_forget_removes_what_a_death_left(tmp_path) -> None:
    die_rendering(tmp_path, RECORD)
    ledger = CrashLedger(tmp_path)
    ledger.forget(RECORD)
    assert ledger.crashes(RECORD) == Crashes()


def test_a_render_never_removes_a_newer_mark_of_its_record(tmp_path) -> None:
    old_owner, new_owner = CrashLedger(tmp_path), CrashLedger(tmp_path)
    with ExitStack() as new_render:
        with old_owner.rendering([(RECORD, Crashes())]):
            # The partition moved while the old owner rendered; the new one renders it too.
            new_render.enter_context(new_owner.rendering([(RECORD, Crashes(suspect=True))]))
        assert (tmp_path / RECORD.name).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_mark_of_another_request_at_the_same_offset_does_not_count(tmp_path) -> None:
    die_rendering(tmp_path, RECORD)
    recreated = Record(RECORD.topic, RECORD.partition, RECORD.offset, "another-request")
    assert CrashLedger(tmp_path).crashes(recreated) == Crashes()


def test_an_unreadable_mark_does_not_count(tmp_path) -> None:
    (tmp_path / RECORD.name).write_text("{not json")
    assert CrashLedger(tmp_path).crashes(RECORD) == Crashes()


def test_an_unwritable_directory_names_the_setting(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="IMAGEGEN_STATE_DIR"):
        CrashLedger(blocked / "crashes")
