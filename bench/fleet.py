"""Fleet benchmark: 3 processors and 3 workers under steady load while every instance gets a
rolling restart, one after the other.

All run as child processes on a private embedded stack, with rate limits that admit
everything; the workers serve the built-in `fixed:<cost>` model (`imagegen.consumers.
fixed_cost`), so their renders do not compete for the host's cores. Each child has a metrics
port, and an instance counts as back once its `/readyz` answers 200.

1. Requests are published through the processors at `rate_per_s` (a third of the workers'
   capacity: 3 workers x `max_batch` images per `cost_ms`), each at its slot by the clock,
   from many users, for `steady_s` before the first restart and on until the last instance
   is back.
2. The restarts: each processor, then each worker, gets SIGTERM, and a new process takes its
   place; the next restart starts once it is ready.
3. Publishing stops; every request must then be answered within `drain_s`.

Figures: requests published and answered; *lost* (no success: no answer, or another), which
must be 0;
end-to-end latency (the request's `submitted_at` to its result's `completed_at`, one host's
clock) of requests submitted before the first restart against those submitted during the
restarts; each restart's seconds from SIGTERM to ready; and requests rendered more than
once (a restart's in-flight work, done again by the partition's next owner: wasted device
time, never a second object).

Run: `python -m bench.fleet [--quick]`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import threading
import time
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.command import exit_on_sigterm, overridden, run_alone
from bench.intake import NO_LIMITS
from bench.pipeline import percentiles
from bench.stack import child_env, free_port, private_stack
from imagegen.cli.children import imagegen_child, wait_ready
from imagegen.consumers.results import ResultSubscriber, ResultTimeout
from imagegen.infra.settings import Settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationRequest, GenerationResult, Status


@dataclass(frozen=True)
class Options:
    processors: int = 3
    workers: int = 3
    cost_ms: int = 200
    max_batch: int = 4
    rate_per_s: float = 20.0
    users: int = 60
    steady_s: float = 20.0
    drain_s: float = 120.0
    ready_timeout_s: float = 300.0


QUICK = Options(steady_s=8.0)
DEFAULT = Options()


@dataclass
class Instance:
    """A child process restarted in place: the same command and metrics port."""

    name: str
    args: list[str]
    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    _running: ExitStack = field(default_factory=ExitStack)

    def start(self) -> None:
        self.generation += 1
        log = self.logs / f"{self.name}-{self.generation}.log"
        args = [*self.args, "--metrics-port", str(self.port)]
        self.process = self._running.enter_context(imagegen_child(args, self.env, log))

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None, "start it first"
        wait_ready(self.process, f"http://127.0.0.1:{self.port}", timeout_s)

    def restart(self, timeout_s: float) -> float:
        """SIGTERM, a new process, ready: the seconds it took."""
        assert self.process is not None, "start it first"
        started = time.monotonic()
        self.stop()
        if self.process.returncode != 0:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode} on SIGTERM")
        self.start()
        self.wait_ready(timeout_s)
        return round(time.monotonic() - started, 1)

    def stop(self) -> None:
        self._running.close()


class Load:
    """Publishes requests at a fixed rate by the clock from a thread, until stopped."""

    def __init__(self, publisher: RequestPublisher, options: Options) -> None:
        self._publisher = publisher
        self._options = options
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-load", daemon=True)
        self.sent: list[GenerationRequest] = []
        self.error: BaseException | None = None

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()
        for i in itertools.count():
            slot = start + i / self._options.rate_per_s
            if self._stopping.wait(max(0.0, slot - time.perf_counter())):
                return
            request = GenerationRequest.new(
                user_id=f"fleet-{i % self._options.users}",
                prompt=f"a lighthouse {i}",
                width=64,
                height=64,
                steps=2,
                seed=i,
            )
            try:
                self._publisher.publish(request)
            except Exception as error:  # the run fails with it, after the restarts
                self.error = error
                return
            self.sent.append(request)


def instances(options: Options, settings: Settings, logs: Path) -> list[Instance]:
    env = child_env(settings, metrics_host="127.0.0.1", **NO_LIMITS)
    worker = [
        *("worker", "--model", f"tiny=fixed:{options.cost_ms}ms", "--device", "cpu"),
        *("--max-batch", str(options.max_batch), "--log-level", "warning"),
    ]
    processor = ["processor", "--log-level", "warning"]
    return [
        *(Instance(f"processor-{n}", processor, env, logs) for n in range(options.processors)),
        *(Instance(f"worker-{n}", worker, env, logs) for n in range(options.workers)),
    ]


def run(options: Options, scratch: Path) -> dict[str, Any]:
    with private_stack() as settings, ExitStack() as cleanup:
        subscriber = cleanup.enter_context(ResultSubscriber(settings))
        publisher = cleanup.enter_context(RequestPublisher(settings))
        fleet = instances(options, settings, scratch)
        for instance in fleet:
            instance.start()
            cleanup.callback(instance.stop)
        for instance in fleet:
            instance.wait_ready(options.ready_timeout_s)
        with Load(publisher, options) as load:
            time.sleep(options.steady_s)  # the steady phase is a length of time, not an event
            restarts_from = time.time()
            restarts = {i.name: i.restart(options.ready_timeout_s) for i in fleet}
            restarts_until = time.time()
        if load.error is not None:
            raise RuntimeError(f"publishing failed: {load.error}")
        answers = collect(subscriber, load.sent, options.drain_s)
    figures = summarise(load.sent, answers, restarts, restarts_from, restarts_until)
    return {"options": asdict(options), **figures}


def collect(
    subscriber: ResultSubscriber, sent: list[GenerationRequest], drain_s: float
) -> dict[str, list[GenerationResult]]:
    """Every result of `sent`, read until each has one or `drain_s` passed."""
    answers: dict[str, list[GenerationResult]] = {}
    deadline = time.monotonic() + drain_s
    missing = {r.request_id for r in sent}
    while missing and time.monotonic() < deadline:
        # A timeout keeps what arrived; the loop reads on until the deadline.
        with suppress(ResultTimeout):
            subscriber.wait_for(
                missing,
                min(5.0, deadline - time.monotonic()),
                on_result=lambda r: answers.setdefault(r.request_id, []).append(r),
            )
        missing = {r.request_id for r in sent} - answers.keys()
    return answers


def summarise(
    sent: list[GenerationRequest],
    answers: dict[str, list[GenerationResult]],
    restarts: dict[str, float],
    restarts_from: float,
    restarts_until: float,
) -> dict[str, Any]:
    def latency_ms(request: GenerationRequest) -> float | None:
        succeeded = [r for r in answers.get(request.request_id, []) if r.status is Status.SUCCEEDED]
        if not succeeded:
            return None
        return (succeeded[0].completed_at - request.submitted_at).total_seconds() * 1000

    def phase(before: bool) -> list[float]:
        chosen = [r for r in sent if (r.submitted_at.timestamp() < restarts_from) == before]
        return [ms for ms in map(latency_ms, chosen) if ms is not None]

    lost = [r.request_id for r in sent if latency_ms(r) is None]
    rendered_twice = sum(
        1 for results in answers.values() if sum(r.status is Status.SUCCEEDED for r in results) > 1
    )
    return {
        "published": len(sent),
        "answered": len(answers),
        "requests_lost": len(lost),
        "lost_examples": lost[:5],
        "rendered_more_than_once": rendered_twice,
        "restart_s": restarts,
        "restarts_took_s": round(restarts_until - restarts_from, 1),
        "latency_ms_steady": percentiles(phase(before=True)),
        "latency_ms_during_restarts": percentiles(phase(before=False)),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter steady phase")
    parser.add_argument("--rate", type=float, help="requests/s (default 20)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    options = overridden(QUICK if args.quick else DEFAULT, {"rate_per_s": args.rate})
    run_alone("fleet", lambda scratch: run(options, scratch), args.out)


if __name__ == "__main__":
    main()
