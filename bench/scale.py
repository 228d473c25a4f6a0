"""Scale benchmark: throughput of 1, 2, 3 and 6 render workers (and 8, beyond the partition
count, in a full run) against N x the throughput of one.

The model is the built-in `fixed:<cost>` (`imagegen.consumers.fixed_cost`): each batch
takes exactly `cost_ms` asleep and draws a test pattern, so the workers' compute does not
compete for the host's cores and the figure measures the pipeline around the model: the
broker, the object store, commits and rebalances.

For each N, on a private embedded stack of its own:
1. N `imagegen worker --model tiny=fixed:<cost>` children start, each with a metrics port,
   and the run waits for every one's `/readyz` (loaded, and assigned in the group).
2. Warm-up: `warm_up_per_partition` requests per partition, all answered, so that the
   group has settled and every worker has rendered.
3. Measurement: `per_worker` x min(N, partitions) requests go onto `imagegen.render` at once
   (as the processor admits them; its intake has a benchmark of its own), spread evenly
   over its partitions by explicit partition, so that the figure is not of key skew.
   Throughput is the results after the first, per second between the first and the last.

The figure for N is throughput(N) / (N x throughput(1)), for N up to the partition count
(target at least 0.9). Beyond it the extra workers hold no partition: `busy_workers`, read
from the results' `worker_id`, shows how many rendered anything.

Run: `python -m bench.scale [--quick] [--cost-ms MS]`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.command import exit_on_sigterm, overridden, positive, run_alone
from bench.stack import child_env, free_port, private_stack
from imagegen.cli.children import imagegen_child, wait_ready
from imagegen.consumers.results import ResultSubscriber
from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics
from imagegen.schemas import GenerationRequest, GenerationResult, Status, encode
from imagegen.schemas.topics import RENDER


@dataclass(frozen=True)
class Options:
    worker_counts: tuple[int, ...] = (1, 2, 3, 6, 8)
    cost_ms: int = 200
    max_batch: int = 4
    per_worker: int = 200  # requests per busy worker: about 10 s of batches at 200 ms
    warm_up_per_partition: int = 8
    ready_timeout_s: float = 300.0
    result_timeout_s: float = 300.0


QUICK = Options(worker_counts=(1, 2, 3, 6), per_worker=40, warm_up_per_partition=4)
DEFAULT = Options()


def requests(count: int, tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest.new(
            user_id=f"scale-user-{i}", prompt=f"{tag} {i}", width=64, height=64, steps=2, seed=i
        )
        for i in range(count)
    ]


def publish(producer: Producer, batch: list[GenerationRequest], partitions: int) -> None:
    for i, request in enumerate(batch):
        value = encode(request)
        producer.produce(RENDER, key=request.kafka_key, value=value, partition=i % partitions)
    if producer.flush(60) != 0:
        raise RuntimeError("the broker did not take every request within 60 s")


def answered(
    subscriber: ResultSubscriber, batch: list[GenerationRequest], timeout_s: float
) -> list[tuple[float, GenerationResult]]:
    """Each request's first result, with the monotonic time it was read."""
    first: dict[str, tuple[float, GenerationResult]] = {}

    def record(result: GenerationResult) -> None:
        first.setdefault(result.request_id, (time.monotonic(), result))

    subscriber.wait_for([r.request_id for r in batch], timeout_s, on_result=record)
    failed = [r for _, r in first.values() if r.status is not Status.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) did not succeed; first: {failed[0]}")
    return sorted(first.values(), key=lambda timed: timed[0])


def measure(options: Options, workers: int, logs: Path) -> dict[str, Any]:
    """One run with `workers` workers on a private stack."""
    with private_stack() as settings, ExitStack() as cleanup:
        admin = make_admin(settings)
        ensure_topics(admin, settings)
        partitions = len(admin.list_topics(RENDER, timeout=10).topics[RENDER].partitions)
        subscriber = cleanup.enter_context(ResultSubscriber(settings))
        producer = make_producer(settings)
        _start_workers(options, settings, workers, logs, cleanup)

        warm = requests(options.warm_up_per_partition * partitions, "warm")
        publish(producer, warm, partitions)
        answered(subscriber, warm, options.result_timeout_s)

        batch = requests(options.per_worker * min(workers, partitions), f"measure {workers}")
        publish(producer, batch, partitions)
        timed = answered(subscriber, batch, options.result_timeout_s)
    (first_at, _), (last_at, _) = timed[0], timed[-1]
    return {
        "workers": workers,
        "partitions": partitions,
        "requests": len(batch),
        "throughput_per_s": round((len(timed) - 1) / (last_at - first_at), 2),
        "busy_workers": len({result.worker_id for _, result in timed}),
    }


def _start_workers(
    options: Options, settings: Settings, workers: int, logs: Path, cleanup: ExitStack
) -> None:
    env = child_env(settings, metrics_host="127.0.0.1")
    started = []
    for n in range(workers):
        port = free_port()
        args = [
            *("worker", "--model", f"tiny=fixed:{options.cost_ms}ms", "--device", "cpu"),
            *("--max-batch", str(options.max_batch), "--metrics-port", str(port)),
            *("--log-level", "warning"),
        ]
        process = cleanup.enter_context(imagegen_child(args, env, logs / f"worker-{n}.log"))
        started.append((process, port))
    for process, port in started:
        wait_ready(process, f"http://127.0.0.1:{port}", options.ready_timeout_s)


def run(options: Options, scratch: Path) -> dict[str, Any]:
    runs = [
        measure(options, workers, scratch / f"workers-{workers}")
        for workers in options.worker_counts
    ]
    one = next(r for r in runs if r["workers"] == 1)["throughput_per_s"]
    for r in runs:
        r["vs_linear"] = round(r["throughput_per_s"] / (r["workers"] * one), 3)
    scaling = [r["vs_linear"] for r in runs if r["workers"] <= r["partitions"]]
    return {
        "options": asdict(options),
        "runs": runs,
        "scaling_efficiency_min": min(scaling),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1, 2, 3 and 6 workers, short runs")
    parser.add_argument("--cost-ms", type=positive, help="the fixed model's cost per batch")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    options = overridden(QUICK if args.quick else DEFAULT, {"cost_ms": args.cost_ms})
    run_alone("scale", lambda scratch: run(options, scratch), args.out)


if __name__ == "__main__":
    main()
