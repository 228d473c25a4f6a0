"""How long a new request would wait for a render to start: the backlog ahead of it over
the fleet's throughput. The intake sheds a request that cannot start before its deadline
(`imagegen.processors.intake`); `imagegen.processors.fleet_watch` keeps this fed from Kafka.

- Backlog: the render queues' records the worker group has not committed yet, as last read
  (every `refresh_s`), less what the fleet started since that read at its measured rate,
  plus what this processor admitted since. An `interactive` request waits behind the
  interactive queue only; a `batch` one behind both, since workers take interactive work
  first.
- Throughput: the `started` job events the fleet sent per second over its current busy
  run (`StartRate`).
- Wait: backlog / throughput. With no throughput measured (no worker started anything
  lately, or the fleet has been busy for only a few seconds), the wait is unknown and
  nothing is shed.

Everything here is plain arithmetic over what it is told, driven by a clock that tests set.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from imagegen.schemas import GenerationRequest

#: Starts further back than this are forgotten.
WINDOW_S = 30.0
#: No start for this long means no worker is busy: the fleet is idle or gone, and its
#: throughput is unknown until it is seen busy again.
IDLE_GAP_S = 15.0
#: A busy fleet is watched this long before its rate counts: a rate from a second's watch
#: is mostly noise. The rate is also at least the starts of this last stretch per second,
#: so that a fleet that grows is seen at once. Erring high sheds late, never wrongly.
SHORT_WINDOW_S = 5.0


@dataclass(frozen=True)
class QueueEstimate:
    """What is ahead of a request if it were admitted now."""

    ahead: int  # requests ahead of it in the queues it would wait behind
    wait_s: float | None  # until its render would start; None with no throughput measured
    margin_s: float  # how far the wait may be off through the age of the backlog read


class StartRate:
    """Arrival times of `started` events; thread-safe (one thread adds, another asks).

    The rate is measured over the fleet's current busy run: from the first start after the
    last gap of `idle_gap_s` without one (at most `window_s` back) until now. A window
    that also held the idle time before would read a fleet that just got busy as slow.
    """

    def __init__(
        self,
        window_s: float = WINDOW_S,
        idle_gap_s: float = IDLE_GAP_S,
        short_window_s: float = SHORT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._idle_gap_s = idle_gap_s
        self._short_s = short_window_s
        self._clock = clock
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def add(self, count: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._starts.extend([now] * count)

    def per_s(self) -> float | None:
        """Starts a second over the busy run, or over the last short window where that is
        higher. None while no run is under way, or the run is shorter than a short window."""
        now = self._clock()
        with self._lock:
            while self._starts and self._starts[0] <= now - self._window_s:
                self._starts.popleft()
            starts = list(self._starts)
        if not starts or now - starts[-1] > self._idle_gap_s:
            return None  # no worker started anything lately
        run = len(starts) - 1
        while run > 0 and starts[run] - starts[run - 1] <= self._idle_gap_s:
            run -= 1
        busy_s = now - starts[run]
        if busy_s < self._short_s:
            return None
        recent = len(starts) - bisect.bisect_right(starts, now - self._short_s)
        return max((len(starts) - run) / busy_s, recent / self._short_s)


@dataclass(frozen=True)
class _Reading:
    at: float  # when the backlog read began, on the load's clock
    interactive: int  # uncommitted records of the interactive render queue
    batch: int  # of the batch render queue
    per_s: float | None
    # This processor's admission counts when the read began: what it admitted since is
    # not in the read.
    admitted_interactive: int
    admitted_batch: int


class FleetLoad:
    """The latest backlog and throughput readings, and the estimate for a request.

    `estimate` and `admitted` run on the processor's event loop for every request, so they
    only read: a reading is replaced whole by the thread that refreshes it, and the
    admission counters are written by the event loop alone (the refresh only reads them).
    """

    def __init__(self, refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh_s = refresh_s
        self._clock = clock
        self._reading: _Reading | None = None
        self._admitted_interactive = 0
        self._admitted_batch = 0
        # A reading this old means the refresh is failing (the broker, say): estimate
        # nothing rather than shed on stale numbers.
        self._stale_after_s = max(10 * refresh_s, 10.0)

    def mark(self) -> tuple[float, int, int]:
        """Call when a backlog read begins; pass the mark to `observe` with its result."""
        return self._clock(), self._admitted_interactive, self._admitted_batch

    def observe(
        self, mark: tuple[float, int, int], interactive: int, batch: int, per_s: float | None
    ) -> None:
        at, admitted_interactive, admitted_batch = mark
        self._reading = _Reading(
            at, interactive, batch, per_s, admitted_interactive, admitted_batch
        )

    def admitted(self, request: GenerationRequest) -> None:
        """Count an admission until the next read sees it in the queue."""
        if request.priority == "batch":
            self._admitted_batch += 1
        else:
            self._admitted_interactive += 1

    def estimate(self, request: GenerationRequest) -> QueueEstimate | None:
        """The queue ahead of `request`; None while no fresh reading exists."""
        reading = self._reading
        if reading is None:
            return None
        age = self._clock() - reading.at
        if age > self._stale_after_s:
            return None
        queued = float(reading.interactive)
        since = self._admitted_interactive - reading.admitted_interactive
        if request.priority == "batch":
            queued += reading.batch
            since += self._admitted_batch - reading.admitted_batch
        per_s = reading.per_s
        if per_s is None:
            return QueueEstimate(int(queued) + since, None, self.refresh_s)
        # What was queued at the read has been draining since, at the measured rate.
        ahead = max(0.0, queued - per_s * age) + since
        return QueueEstimate(round(ahead), ahead / per_s, self.refresh_s)
