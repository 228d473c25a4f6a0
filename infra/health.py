"""What a long-running process answers on `/healthz` and `/readyz` (beside `/metrics`,
`imagegen.infra.metrics.serve`), for Kubernetes' liveness and readiness probes.

- `Liveness`: `/healthz` is 200 while every loop the process registered has turned within
  its stall limit, and 503 naming the loops that stopped. A stalled loop is what a restart
  fixes, so only the process's own loops count here, never the broker or the store: a
  broker outage must not have every pod restarted.
- `Readiness`: `/readyz` is 200 once every condition holds, and 503 naming those that do
  not. Some conditions the process reports as it goes (joined its group, model loaded);
  others are probes that the endpoint runs (broker and store reachable), each answer kept
  for a few seconds so that frequent probes cost the broker nothing much.

Both are read from the HTTP server's threads and written from the process's own: every
state change is one assignment under a lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from imagegen.infra.kafka import check_broker
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings

#: A loop that has not turned for this long is stalled, unless it registered its own limit.
DEFAULT_STALL_S = 60.0
#: How long a probe's answer is reused.
PROBE_EVERY_S = 5.0


class Liveness:
    """Heartbeats of the process's loops."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._beats: dict[str, tuple[float, float]] = {}  # loop -> (last beat, stall limit)

    def beat(self, loop: str, stall_s: float = DEFAULT_STALL_S) -> None:
        """`loop` turned just now; it counts as stalled once `stall_s` pass without a beat."""
        with self._lock:
            self._beats[loop] = (self._clock(), stall_s)

    def stalled(self) -> list[str]:
        now = self._clock()
        with self._lock:
            beats = dict(self._beats)
        return [
            f"the {loop} has not turned for {now - last:.0f}s"
            for loop, (last, stall_s) in sorted(beats.items())
            if now - last > stall_s
        ]


@dataclass
class _Probe:
    check: Callable[[], None]  # raises, saying why, unless the condition holds
    failure: str | None = None
    checked_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Readiness:
    """Conditions that must all hold before the process takes traffic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[str, str] = {}  # condition -> why it does not hold yet
        self._probes: dict[str, _Probe] = {}

    def wait_for(self, condition: str, why: str) -> None:
        """`condition` does not hold (yet), because `why`."""
        with self._lock:
            self._waiting[condition] = why

    def joining(self, group: str) -> None:
        """The condition "group <group>", until `joined(group)`."""
        self.wait_for(f"group {group}", "not yet assigned partitions")

    def joined(self, group: str) -> None:
        """The process's member of `group` was assigned partitions (or none, being one
        more member than the partitions)."""
        self.holds(f"group {group}")

    def holds(self, condition: str) -> None:
        with self._lock:
            self._waiting.pop(condition, None)

    def probe(self, condition: str, check: Callable[[], None]) -> None:
        """`check` is run when asked, at most once per `PROBE_EVERY_S`; it raises unless
        `condition` holds."""
        with self._lock:
            self._probes[condition] = _Probe(check)

    def unready(self) -> list[str]:
        with self._lock:
            waiting = [f"{condition}: {why}" for condition, why in sorted(self._waiting.items())]
            probes = sorted(self._probes.items())
        return waiting + [
            f"{condition}: {failure}"
            for condition, probe in probes
            if (failure := self._run(probe)) is not None
        ]

    def _run(self, probe: _Probe) -> str | None:
        # One probe runs at a time; a caller meanwhile waits for its answer and reuses it.
        with probe.lock:
            now = self._clock()
            if probe.checked_at is None or now - probe.checked_at >= PROBE_EVERY_S:
                try:
                    probe.check()
                    probe.failure = None
                except Exception as exc:
                    probe.failure = str(exc) or type(exc).__name__
                probe.checked_at = self._clock()
            return probe.failure


@dataclass(frozen=True)
class Health:
    """A process's liveness and readiness, as its metrics port serves them."""

    liveness: Liveness = field(default_factory=Liveness)
    readiness: Readiness = field(default_factory=Readiness)


def probe_broker_and_store(readiness: Readiness, settings: Settings) -> None:
    """Have `/readyz` check that the broker answers and that the bucket exists."""
    store = ObjectStore(settings)

    def bucket_found() -> None:
        if not store.bucket_exists():
            raise LookupError(
                f"the bucket {settings.s3_bucket} does not exist: create it with `imagegen "
                "init`, or set IMAGEGEN_S3_BUCKET"
            )

    readiness.probe("broker", lambda: check_broker(settings, timeout_s=2.0))
    readiness.probe("store", bucket_found)
