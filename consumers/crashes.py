"""Requests that worker processes died rendering, so that none can crash-loop the workers.

Some requests kill the process that renders them, past every exception handler: the
kernel's out-of-memory killer, a crash in a native kernel, a GPU fault. Their record is
never committed, so the restarted worker reads it again and dies again, and the requests
behind it on its partition wait for ever.

So while a batch renders, the worker holds a mark on local disk for each of its records: a
small file, locked for as long as the render runs, and unlinked before the lock is let go
when the pipeline returns, however it returns. A mark found in place and unlocked when a
record is read again was left by a process that died rendering it. Such a record is a
suspect: it renders alone from then on, so that it takes no innocent company down with it.
Only deaths while it renders alone as a suspect count against it, and once
`IMAGEGEN_MAX_ATTEMPTS` of those have happened the worker fails it to the DLQ without
rendering it. Any death counts, so a process killed from outside during such a render
counts too.

The marks live under `IMAGEGEN_STATE_DIR/worker/crashes`, which must be on a local file
system: the locks are flock(2) locks, which network file systems may only emulate. Workers
on one host may share the directory: the locks tell a live render (an earlier owner of a
partition, still finishing) from a dead one. A restarted worker must find the same
directory (on Kubernetes, a volume that outlives the container, such as an emptyDir), and a
request whose partition moves to another host starts with a clean record there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagegen.schemas.errors import ConfigError, ImagegenError

log = logging.getLogger(__name__)


class RenderKilledWorkers(ImagegenError):
    """Worker processes died rendering the request alone (permanent: it would kill the next)."""


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


@dataclass(frozen=True)
class Crashes:
    """What the processes that died rendering a record left behind."""

    suspect: bool = False  # some process died rendering it, alone or in a batch
    alone: int = 0  # how many died while it rendered alone as a suspect


class CrashLedger:
    """The marks of one host's workers. Thread-safe: each record has a file of its own."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()
        except OSError as exc:
            raise ConfigError(_unwritable(directory, exc)) from exc

    def crashes(self, record: Record) -> Crashes:
        """What earlier renders of `record` on this host left: nothing when none died."""
        try:
            with (self._directory / record.name).open("rb") as file:
                mark = json.loads(file.read())
                live = _locked(file.fileno())
                # Unlinked since it was opened: its render finished (a render unlinks its
                # mark before it lets go of the lock; a dead process never does), or a
                # newer render of the record replaced it.
                gone = os.fstat(file.fileno()).st_nlink == 0
            if mark["request_id"] != record.request_id:
                return Crashes()  # another request's: left from before the topic was made anew
            earlier = Crashes(bool(mark["suspect"]), int(mark["alone_deaths"]))
            died_alone = bool(mark["rendering_alone"])
        except FileNotFoundError:
            return Crashes()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable crash mark of %s: %s", record.name, exc)
            return Crashes()
        if live:
            return earlier  # an earlier owner of the partition is still rendering it
        if gone:
            return Crashes()
        return Crashes(True, earlier.alone + int(died_alone and earlier.suspect))

    @contextmanager
    def rendering(self, records: Sequence[tuple[Record, Crashes]]) -> Iterator[None]:
        """Hold a mark for each (record, its crashes so far) for the duration of the block."""
        alone = len(records) == 1
        with ExitStack() as marks:
            for record, crashes in records:
                path, fd = self._mark(record, crashes, alone)
                marks.callback(_release, path, fd)
            yield

    def forget(self, record: Record) -> None:
        """Remove the mark a dead render of `record` left, once it has served its purpose."""
        path = self._directory / record.name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if not _locked(fd):  # a live render's mark is its own to remove
                _unlink_if_same(path, fd)
        except OSError as exc:
            log.warning("could not remove the crash mark of %s: %s", record.name, exc)
        finally:
            os.close(fd)

    def _mark(self, record: Record, crashes: Crashes, alone: bool) -> tuple[Path, int]:
        content = {
            "request_id": record.request_id,
            "suspect": crashes.suspect,
            "alone_deaths": crashes.alone,
            "rendering_alone": alone,
        }
        # Locked before it has its name, so that no one sees it unlocked while it lives;
        # written aside and renamed, so that a death mid-write leaves no torn mark. No fsync:
        # the kernel keeps the writes of a process that dies.
        try:
            fd, staged = tempfile.mkstemp(prefix=".", dir=self._directory)
        except OSError as exc:
            raise ConfigError(_unwritable(self._directory, exc)) from exc
        path = self._directory / record.name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(content).encode())
            os.replace(staged, path)
        except OSError as exc:
            os.close(fd)
            Path(staged).unlink(missing_ok=True)
            raise ConfigError(_unwritable(self._directory, exc)) from exc
        return path, fd


def _locked(fd: int) -> bool:
    """Whether a live process holds the file's lock (the lock dies with its holder)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _release(path: Path, fd: int) -> None:
    """Unlink a render's mark, then let go of its lock, in that order (see `crashes`)."""
    try:
        _unlink_if_same(path, fd)
    finally:
        os.close(fd)


def _unlink_if_same(path: Path, fd: int) -> None:
    """Unlink `path` if it is still the file open as `fd`: another worker may have marked the
    record afresh since (a partition's new owner, while its old one finished). A mark that
    replaces it between the check and the unlink is lost, and with it at most one death."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass


def _unwritable(directory: Path, exc: OSError) -> str:
    return (
        f"cannot write crash marks in {directory} ({exc}); point IMAGEGEN_STATE_DIR at a "
        "writable directory with free space"
    )
