"""The pipeline that the end-to-end and overload benchmarks drive, and how they drive it.

Both time requests from publish to result through one `imagegen processor` and one
`imagegen worker`, run as child processes on a private embedded stack with rate limits that
admit everything. They share all of that here, so that their figures are taken the same way:
- `running_pipeline`: the stack, a `ResultSubscriber` and a `RequestPublisher` made before
  the children start (so no result can slip past the subscriber), and the children;
- `Pipeline.poll_results`: results read in polls of at most `RESULT_POLL_S`, so the reader
  adds at most that to a latency, with the children checked alive before each poll;
- `OpenLoop`: open-loop publishing, each request at its slot by the clock, whether or not
  earlier ones have been answered;
- `percentiles`: how latencies are summarised.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from statistics import quantiles
from typing import Any, Generic, Protocol, TypeVar

from bench.command import positive
from bench.intake import NO_LIMITS
from bench.stack import child_env, private_stack
from imagegen.cli.children import imagegen_child
from imagegen.consumers.results import ResultSubscriber, ResultTimeout
from imagegen.infra.settings import Settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationResult

# Each read of the results waits at most this long, so a result is timed within it of its
# arrival (a longer read would hold arrived results back until it ends).
RESULT_POLL_S = 0.01
#: Publishes run from a small pool, so that one slow acknowledgement does not delay the next.
PUBLISH_THREADS = 4
#: An open loop's first slot lies this far ahead, so that it is not late by the time the
#: publishing thread starts.
SCHEDULE_LEAD_S = 0.1

#: The children by name ("processor", "worker"), each with its log.
Children = dict[str, tuple[subprocess.Popen[bytes], Path]]


@dataclass(frozen=True)
class PipelineOptions:
    """What both benchmarks' options say about the requests' shape and the worker."""

    users: int = 10
    model: str = "tiny"
    device: str = "cpu"
    width: int = 64
    height: int = 64
    # `imagegen worker`'s defaults: the batching wait a deployment gets belongs in its
    # latency, and a shorter one would flatter the figures.
    max_batch: int = 4
    max_wait_ms: float = 10.0
    # The worker renders on one core and leaves the other to the stack, as `--cpu-threads`
    # advises for a shared host: with a thread per core, a render waits for whichever of its
    # threads the broker, the store or the processor preempts.
    cpu_threads: int = 1
    # Covers building the tiny model on a busy machine.
    warm_up_timeout_s: float = 300.0

    def worker_args(self) -> list[str]:
        return [
            *("worker", "--model", self.model, "--device", self.device),
            *("--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms)),
            *("--cpu-threads", str(self.cpu_threads), "--log-level", "warning"),
        ]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options for the worker's fields of `PipelineOptions`."""
    parser.add_argument("--max-batch", type=positive, help="the worker's (default 4)")
    parser.add_argument("--max-wait-ms", type=float, help="the worker's (default 10)")
    parser.add_argument("--device", help="the worker's (default cpu)")
    parser.add_argument("--cpu-threads", type=positive, help="the worker's (default 1)")


def worker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What `add_worker_arguments`' options override (None where one was not given)."""
    return {
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "device": args.device,
        "cpu_threads": args.cpu_threads,
    }


@dataclass(frozen=True)
class Pipeline:
    """A running pipeline: its stack's settings, the readers and writers made before its
    children started, and the children."""

    settings: Settings
    subscriber: ResultSubscriber
    publisher: RequestPublisher
    children: Children

    def check_alive(self) -> None:
        """Raise if a child has exited: the figures would be of a pipeline that is not there."""
        for name, (process, log) in self.children.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited with {process.returncode}; log: {log}")

    def poll_results(
        self, request_ids: Iterable[str], on_result: Callable[[GenerationResult], None]
    ) -> None:
        """Check the children, then read for at most `RESULT_POLL_S`, passing each result for
        `request_ids` that arrives to `on_result`. A read with nothing new is no error: the
        caller checks its clock and polls again."""
        self.check_alive()
        with suppress(ResultTimeout):
            self.subscriber.wait_for(request_ids, RESULT_POLL_S, on_result=on_result)


@contextmanager
def running_pipeline(options: PipelineOptions, logs: Path) -> Iterator[Pipeline]:
    """The pipeline on a private stack, with the children's logs in `logs`; on the way out
    the children are stopped, then the stack."""
    with private_stack() as settings, ExitStack() as cleanup:
        subscriber = cleanup.enter_context(ResultSubscriber(settings))
        publisher = cleanup.enter_context(RequestPublisher(settings))
        commands = {
            "processor": (
                ["processor", "--log-level", "warning"],
                child_env(settings, **NO_LIMITS),
            ),
            "worker": (options.worker_args(), child_env(settings)),
        }
        children: Children = {}
        for name, (args, env) in commands.items():
            log = logs / f"{name}.log"
            children[name] = (cleanup.enter_context(imagegen_child(args, env, log)), log)
        yield Pipeline(settings, subscriber, publisher, children)


# ---- open-loop publishing --------------------------------------------------------------


class Scheduled(Protocol):
    """What an open loop publishes: anything that knows its slot."""

    @property
    def scheduled(self) -> float:
        """When to publish it, in `time.perf_counter()` seconds."""
        ...


Item = TypeVar("Item", bound=Scheduled)


def schedule_start() -> float:
    """The first slot of an open loop's schedule, in `time.perf_counter()` seconds."""
    return time.perf_counter() + SCHEDULE_LEAD_S


class OpenLoop(Generic[Item]):
    """Publishes `items` on their schedule from a background thread and a pool of
    `PUBLISH_THREADS`, each with `publish(item)`.

    Pacing by the clock is the point of an open loop: a slow pipeline does not slow the
    offered load. Leaving the `with` block stops publishing, so that a failed run leaves
    nothing behind."""

    def __init__(
        self,
        items: Sequence[Item],
        publish: Callable[[Item], None],
        drain_s: float,
        name: str,
    ) -> None:
        """`drain_s`: how long after the last publish returned the answers still missing are
        awaited; `name`: the threads' names begin with it."""
        self._items = items
        self._publish = publish
        self._drain_s = drain_s
        self._name = name
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._schedule, name=f"{name}-schedule", daemon=True)
        self.finished_at: float | None = None  # monotonic, once every publish returned

    def __enter__(self) -> OpenLoop[Item]:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self._thread.join()

    def _schedule(self) -> None:
        try:
            prefix = f"{self._name}-publish"
            with ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix=prefix) as pool:
                for item in self._items:
                    if self._stopping.wait(max(0.0, item.scheduled - time.perf_counter())):
                        return
                    pool.submit(self._publish, item)
        finally:
            self.finished_at = time.monotonic()

    def done_draining(self) -> bool:
        """True once the answers still missing have had `drain_s` after the last publish
        returned."""
        finished = self.finished_at
        return finished is not None and time.monotonic() > finished + self._drain_s


# ---- figures ---------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max, rounded to 0.1; empty with fewer than two values."""
    if len(values) < 2:
        return {}
    cuts = quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 1),
        "p95": round(cuts[94], 1),
        "p99": round(cuts[98], 1),
        "max": round(max(values), 1),
    }
