"""Crash marks: what a worker leaves on disk while it renders, and what a death leaves."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from consumers.crashes import CrashLedger, Record
from infra.errors import ConfigError

RECORD = Record("imagegen.render", 3, 41, "01JD3Z5K8Q6W2X9Y7V4T1R0P0M")


def _die_while_rendering(directory: Path, crashes_so_far: int) -> None:
    with CrashLedger(directory).rendering([(RECORD, crashes_so_far)]):
        os._exit(0)  # no cleanup runs: as a process killed mid-render


def _die_rendering(directory: Path, crashes_so_far: int) -> None:
    child = multiprocessing.get_context("fork").Process(
        target=_die_while_rendering, args=(directory, crashes_so_far)
    )
    child.start()
    child.join(30)
    assert child.exitcode == 0


def test_a_record_never_rendered_has_no_crashes(tmp_path) -> None:
    assert CrashLedger(tmp_path).crashes(RECORD) == 0


def test_each_death_during_a_render_counts(tmp_path) -> None:
    ledger = CrashLedger(tmp_path)
    _die_rendering(tmp_path, ledger.crashes(RECORD))
    assert ledger.crashes(RECORD) == 1
    _die_rendering(tmp_path, ledger.crashes(RECORD))
    assert ledger.crashes(RECORD) == 2


def test_a_render_that_returns_or_raises_leaves_no_mark(tmp_path) -> None:
    ledger = CrashLedger(tmp_path)
    with ledger.rendering([(RECORD, 0)]):
        assert ledger.crashes(RECORD) == 1  # what a death right now would leave
    assert ledger.crashes(RECORD) == 0
    with pytest.raises(RuntimeError), ledger.rendering([(RECORD, 1)]):
        raise RuntimeError("the pipeline failed")
    assert ledger.crashes(RECORD) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_mark_of_another_request_at_the_same_offset_does_not_count(tmp_path) -> None:
    _die_rendering(tmp_path, 0)
    recreated = Record(RECORD.topic, RECORD.partition, RECORD.offset, "another-request")
    assert CrashLedger(tmp_path).crashes(recreated) == 0


def test_an_unreadable_mark_does_not_count(tmp_path) -> None:
    (tmp_path / RECORD.name).write_text("{not json")
    assert CrashLedger(tmp_path).crashes(RECORD) == 0


def test_an_unwritable_directory_names_the_setting(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="IMAGEGEN_STATE_DIR"):
        CrashLedger(blocked / "crashes")
