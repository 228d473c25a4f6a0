"""Requests that a worker process died rendering, so that none can crash-loop the workers.

Some requests kill the process that renders them, past every exception handler: the
kernel's out-of-memory killer, a crash in a native kernel, a GPU fault. Their record is
never committed, so the restarted worker reads it again and dies again, and the requests
behind it on its partition wait for ever.

So before a batch renders, the worker leaves a mark on local disk for each of its records,
and removes the marks once the pipeline returns, however it returns. A mark found when a
record is read again counts the renders of it that a process did not survive. The worker
renders such a record alone, so that it takes no innocent company down with it, and once
it has killed `IMAGEGEN_MAX_ATTEMPTS` processes, fails it to the DLQ without rendering.

The marks live under `IMAGEGEN_STATE_DIR/worker/crashes`, one small file per record being
rendered. A restarted worker must find the same directory (on Kubernetes, a volume that
outlives the container, such as an emptyDir). A partition that moves to another host starts
counting afresh there.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.errors import ConfigError, ImagegenError

log = logging.getLogger(__name__)


class RenderKilledWorkers(ImagegenError):
    """The request's renders killed worker processes (permanent: it would kill the next)."""


@dataclass(frozen=True)
class Record:
    """A record being rendered: where it lives in Kafka, and what it asks for."""

    topic: str
    partition: int
    offset: int
    request_id: str

    @property
    def name(self) -> str:
        # Kafka topic names are letters, digits, ".", "_" and "-", and never "." or "..".
        return f"{self.topic}-{self.partition}-{self.offset}"


class CrashLedger:
    """The marks of one worker host. Safe to share between threads and processes: each
    record has its own file, and only its partition's owner renders it."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(_unwritable(directory, exc)) from exc

    def crashes(self, record: Record) -> int:
        """How many renders of `record` a worker process died in."""
        path = self._directory / record.name
        try:
            mark = json.loads(path.read_text(encoding="utf-8"))
            crashes = int(mark["crashes"])
            request_id = mark["request_id"]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable crash mark %s: %s", path, exc)
            return 0
        # A mark for another request: left from before the topic was deleted and made anew.
        return crashes if request_id == record.request_id else 0

    @contextmanager
    def rendering(self, records: Sequence[tuple[Record, int]]) -> Iterator[None]:
        """Mark each (record, crashes so far) as rendering for the duration of the block."""
        paths = [self._mark(record, crashes + 1) for record, crashes in records]
        try:
            yield
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    def _mark(self, record: Record, crashes: int) -> Path:
        path = self._directory / record.name
        staged = path.with_name(f".{record.name}.new")
        # Written aside and renamed, so that a death mid-write leaves no torn mark. No fsync:
        # a process that dies leaves its writes to the kernel, which keeps them.
        try:
            staged.write_text(
                json.dumps({"request_id": record.request_id, "crashes": crashes}),
                encoding="utf-8",
            )
            os.replace(staged, path)
        except OSError as exc:
            raise ConfigError(_unwritable(self._directory, exc)) from exc
        return path


def _unwritable(directory: Path, exc: OSError) -> str:
    return (
        f"cannot write crash marks in {directory} ({exc}); point IMAGEGEN_STATE_DIR at a "
        "writable directory with free space"
    )
