"""Intake benchmark: admitted requests per second of one processor process, side by side
with the same broker's raw consume-then-produce passthrough (confluent-kafka).

Both read the same preloaded backlog of requests from `imagegen.requests`:
- passthrough: one confluent-kafka consumer and idempotent producer copy every record to a
  scratch topic; the clock runs from the first record read to the last delivery report.
- processor: `imagegen processor` validates, dedupes, rate-limits (with limits high enough
  to admit everything) and admits each record; the clock runs between the first and the
  last admission time it stamps on `imagegen.render`, so start-up and group join are
  excluded.

Run: `python -m bench.intake [--requests N]`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from confluent_kafka.admin import NewTopic

from bench.stack import child_env, private_stack
from imagegen.cli.children import imagegen_child
from imagegen.infra.kafka import make_admin, make_consumer, make_producer
from imagegen.infra.settings import Settings
from imagegen.schemas import GenerationRequest, encode
from imagegen.schemas.headers import ADMITTED_AT_HEADER
from imagegen.schemas.topics import RENDER, REQUESTS

PASSTHROUGH_TOPIC = "bench.passthrough"
# Limits that admit everything, so the figure is the processor's own cost.
NO_LIMITS = {
    "rate_user_per_s": "1000000",
    "rate_user_burst": "1000000",
    "rate_global_per_s": "1000000",
    "rate_global_burst": "1000000",
}


def preload(settings: Settings, count: int) -> None:
    producer = make_producer(settings, **{"linger.ms": 20})
    for i in range(count):
        request = GenerationRequest.new(user_id=f"user-{i % 1000}", prompt=f"bench {i}")
        while True:
            try:
                producer.produce(REQUESTS, key=request.kafka_key, value=encode(request))
                break
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain it
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("preloading the requests did not finish in 60 s")


def passthrough(settings: Settings, count: int) -> float:
    """Records per second of a bare consume-then-produce copy of the backlog."""
    admin = make_admin(settings)
    partitions = len(admin.list_topics(REQUESTS, timeout=10).topics[REQUESTS].partitions)
    admin.create_topics([NewTopic(PASSTHROUGH_TOPIC, partitions, 1)])[PASSTHROUGH_TOPIC].result()
    consumer = make_consumer(settings, group_id="bench-passthrough")
    consumer.assign([TopicPartition(REQUESTS, p, OFFSET_BEGINNING) for p in range(partitions)])
    producer = make_producer(settings)
    delivered = 0

    def on_delivery(error: object, _message: object) -> None:
        nonlocal delivered
        if error is not None:
            raise RuntimeError(f"passthrough delivery failed: {error}")
        delivered += 1

    read = 0
    started: float | None = None
    while read < count:
        for message in consumer.consume(500, timeout=1.0):
            if message.error() is not None:
                continue
            started = started or time.perf_counter()
            producer.produce(
                PASSTHROUGH_TOPIC, key=message.key(), value=message.value(), on_delivery=on_delivery
            )
            producer.poll(0)
            read += 1
    producer.flush(60)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    if delivered != count:
        raise RuntimeError(f"passthrough delivered {delivered} of {count} records")
    return count / elapsed


def processor(settings: Settings, count: int, log: Path) -> float:
    """Admitted requests per second of one `imagegen processor` on the same backlog."""
    args = ["processor", "--log-level", "warning"]
    with imagegen_child(args, child_env(settings, **NO_LIMITS), log) as process:
        stamps = _admission_times(settings, count, process)
    return (count - 1) / ((max(stamps) - min(stamps)) / 1000)


def _admission_times(settings: Settings, count: int, process: subprocess.Popen) -> list[int]:
    consumer = make_consumer(settings, group_id="bench-render-reader")
    partitions = consumer.list_topics(RENDER, timeout=10).topics[RENDER].partitions
    consumer.assign([TopicPartition(RENDER, p, OFFSET_BEGINNING) for p in partitions])
    stamps: list[int] = []
    last_progress = time.monotonic()
    try:
        while len(stamps) < count:
            if process.poll() is not None:
                raise RuntimeError(f"the processor exited with {process.returncode}")
            if time.monotonic() - last_progress > 120:
                raise RuntimeError(f"no admissions for 120 s after {len(stamps)} of {count}")
            for message in consumer.consume(500, timeout=1.0):
                if message.error() is None:
                    stamps.append(int(dict(message.headers())[ADMITTED_AT_HEADER]))
                    last_progress = time.monotonic()
    finally:
        consumer.close()
    return stamps


def run(count: int) -> dict[str, float | int]:
    with private_stack() as settings, tempfile.TemporaryDirectory() as scratch:
        preload(settings, count)
        raw = passthrough(settings, count)
        admitted = processor(settings, count, Path(scratch) / "processor.log")
    return {
        "requests": count,
        "passthrough_records_per_s": round(raw, 1),
        "processor_admitted_per_s": round(admitted, 1),
        "ratio_vs_passthrough": round(admitted / raw, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    print(json.dumps(run(args.requests), indent=2))


if __name__ == "__main__":
    main()
