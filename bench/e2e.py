"""End-to-end benchmark: latency from publish to result at a steady request rate.

One `imagegen processor` and one `imagegen worker` run as child processes on a private
embedded stack, with rate limits that admit everything. Warm-up requests, one per user, must
come back first, so process start-up, model loading and the first consumer-group joins stay
out of the figures. Then requests from several users are published open loop: request i
starts at t0 + i / rate by the wall clock, whether or not earlier ones have been answered,
from a small thread pool so that one slow acknowledgement does not delay the next publish.

For every request:
- end-to-end: from the start of `RequestPublisher.publish` to the result's arrival at a
  `ResultSubscriber` (created before the first publish, read in polls of at most
  `RESULT_POLL_S`, so the reader itself adds at most that);
- render: the result's `timings.render_ms`, the forward pass of its whole batch (every
  request of a batch waits for all of it);
- overhead: end-to-end minus render, what the pipeline adds around the model.

The full run measures `windows` windows in turn and reports the one with the median
overhead p99. A request without a succeeded result is a failure, counted and named by
cause, in any window. The worker runs with `imagegen worker`'s defaults for batching
(`--max-batch 4 --max-wait-ms 10`), since that is what a deployment gets; a batching wait
would be part of the overhead, but at 20 requests/s, fewer than one per 10 ms, the worker
takes none.

Run: `python -m bench.e2e [--quick] [--rate R] [--duration S]`. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import Any

from bench.command import exit_on_sigterm, overridden, positive, run_alone
from bench.pipeline import (
    RESULT_POLL_S,
    OpenLoop,
    Pipeline,
    PipelineOptions,
    add_worker_arguments,
    percentiles,
    running_pipeline,
    schedule_start,
    worker_overrides,
)
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationResult, Status, new_request_id
from imagegen.schemas.errors import ImagegenError


@dataclass(frozen=True)
class Options(PipelineOptions):
    rate_per_s: float = 20.0
    duration_s: float = 60.0
    # One step keeps the render short enough that the worker, sharing a small CPU with
    # the broker, the store and the processor, keeps up at 20 requests/s with room to
    # spare: queueing behind a saturated model would swamp the pipeline's own overhead.
    steps: int = 1
    #: How long after the last publish the results still outstanding are awaited.
    drain_timeout_s: float = 60.0
    #: Windows measured in turn on the same pipeline, each `duration_s` long; the figures
    #: are the window with the median overhead p99, with every window's beside them. A
    #: shared CPU's speed drifts (measured: the same render 1.5x slower minutes apart), and
    #: a model that renders slower is busier, so requests queue behind it.
    windows: int = 3


DEFAULT = Options()
QUICK = replace(DEFAULT, duration_s=15.0, windows=1)


@dataclass
class Sent:
    """One request of the measured window, as the publishing side saw it."""

    request_id: str
    user_id: str
    scheduled: float  # perf_counter seconds
    started_wall: float = 0.0  # time.time() when publish began
    lag_ms: float = 0.0  # how late publish began against the schedule
    publish_ms: float | None = None  # until the broker acknowledged it
    error: str | None = None


@dataclass(frozen=True)
class Received:
    result: GenerationResult
    at_wall: float


# ---- publishing and collecting ---------------------------------------------------------


def request_fields(options: Options, user_id: str, prompt: str) -> dict[str, object]:
    return {
        "user_id": user_id,
        "prompt": prompt,
        "model": options.model,
        "width": options.width,
        "height": options.height,
        "steps": options.steps,
    }


def collect(
    pipeline: Pipeline, wanted: list[str], until: Callable[[], bool]
) -> dict[str, Received]:
    """Results for `wanted` as they arrive, each timed on arrival, until all are in or
    `until()` says to stop waiting; the children must stay up all along."""
    received: dict[str, Received] = {}

    def record(result: GenerationResult) -> None:
        received.setdefault(result.request_id, Received(result, time.time()))

    while len(received) < len(wanted) and not until():
        pipeline.poll_results([i for i in wanted if i not in received], record)
    return received


def warm_up(pipeline: Pipeline, options: Options) -> float:
    """Seconds until one request per user has come back succeeded."""
    started = time.monotonic()
    deadline = started + options.warm_up_timeout_s
    ids = [
        pipeline.publisher.publish(**request_fields(options, f"e2e-user-{u}", f"warm-up {u}"))
        for u in range(options.users)
    ]
    received = collect(pipeline, ids, lambda: time.monotonic() > deadline)
    if len(received) < len(ids):
        raise RuntimeError(
            f"{len(ids) - len(received)} warm-up request(s) had no result within "
            f"{options.warm_up_timeout_s:g} s"
        )
    bad = [r.result for r in received.values() if r.result.status is not Status.SUCCEEDED]
    if bad:
        raise RuntimeError(f"a warm-up request did not succeed: {bad[0].reason} {bad[0].detail}")
    return time.monotonic() - started


def publish(publisher: RequestPublisher, options: Options, item: Sent) -> None:
    """Publish `item`, recording how late against its slot it began and how long it took."""
    item.lag_ms = (time.perf_counter() - item.scheduled) * 1000
    item.started_wall = time.time()
    started = time.perf_counter()
    fields = request_fields(options, item.user_id, f"e2e {item.request_id}")
    try:
        publisher.publish(request_id=item.request_id, **fields)
    except ImagegenError as error:
        item.error = f"{type(error).__name__}: {error}"
        return
    item.publish_ms = (time.perf_counter() - started) * 1000


def schedule(options: Options) -> list[Sent]:
    count = round(options.rate_per_s * options.duration_s)
    t0 = schedule_start()
    return [
        Sent(new_request_id(), f"e2e-user-{i % options.users}", t0 + i / options.rate_per_s)
        for i in range(count)
    ]


# ---- figures ---------------------------------------------------------------------------


def summarise(
    options: Options, sent: list[Sent], received: dict[str, Received], warm_up_s: float
) -> dict[str, object]:
    failures: Counter[str] = Counter()
    rows = []
    for item in sent:
        got = received.get(item.request_id)
        if item.error is not None:
            failures["publish error"] += 1
        elif got is None:
            failures["no result"] += 1
        elif got.result.status is not Status.SUCCEEDED:
            reason = got.result.reason.value if got.result.reason else "no reason"
            failures[f"{got.result.status.value}: {reason}"] += 1
        else:
            rows.append((item, got))
    figures = [latency_row(item, got) for item, got in rows]
    published = [item for item in sent if item.error is None]
    starts = sorted(item.started_wall for item in published)
    span_s = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    render_busy_s = sum(
        got.result.timings.render_ms / (got.result.batch_size or 1) / 1000
        for _, got in rows
        if got.result.timings and got.result.timings.render_ms is not None
    )

    def column(name: str) -> list[float]:
        return [f[name] for f in figures if f.get(name) is not None]

    overhead = percentiles(column("overhead"))
    return {
        "options": asdict(options),
        "result_poll_ms": RESULT_POLL_S * 1000,
        "warm_up_s": round(warm_up_s, 1),
        "requests": len(sent),
        "succeeded": len(rows),
        "failures": sum(failures.values()),
        "failure_causes": dict(failures),
        "achieved_rate_per_s": round((len(starts) - 1) / span_s, 2) if span_s else 0.0,
        "max_schedule_lag_ms": round(max((item.lag_ms for item in sent), default=0.0), 1),
        "e2e_ms": percentiles(column("e2e")),
        "render_ms": percentiles(column("render")),
        "overhead_ms": overhead,
        "overhead_p99_ms": overhead.get("p99"),
        # Where the overhead goes, from the timings each result carries (worker clock,
        # same host): publish call, publish to admission (approximate: it also holds the
        # wait for an encode thread), admission to render start (fetch, store lookup,
        # batching wait, waiting for the model), encode + upload, result to the reader.
        "breakdown_ms": {name: percentiles(column(name)) for name in BREAKDOWN},
        "mean_batch_size": round(fmean(r.result.batch_size or 1 for _, r in rows), 2)
        if rows
        else None,
        # The share of the window the model was busy: well below 1 means the overhead is
        # the pipeline's, not queueing for a saturated model.
        "render_utilisation": round(render_busy_s / span_s, 3) if span_s else None,
    }


BREAKDOWN = ("publish", "to_admission", "worker_queue", "encode_upload", "result_delivery")


def latency_row(item: Sent, got: Received) -> dict[str, float | None]:
    result = got.result
    timings = result.timings
    e2e = (got.at_wall - item.started_wall) * 1000
    row: dict[str, float | None] = {"e2e": e2e, "publish": item.publish_ms}
    if timings is None or timings.render_ms is None:
        return row  # an image an earlier attempt stored: published again without rendering
    row["render"] = timings.render_ms
    row["overhead"] = e2e - timings.render_ms
    finish = (timings.encode_ms or 0.0) + (timings.upload_ms or 0.0)
    row["encode_upload"] = finish
    row["worker_queue"] = timings.queue_ms
    if timings.total_ms is not None:
        # total_ms runs from the request's submitted_at (stamped inside publish) to the
        # result's creation; what the worker's own timings do not cover came before.
        before = (timings.queue_ms or 0.0) + timings.render_ms + finish
        row["to_admission"] = timings.total_ms - before
    row["result_delivery"] = (got.at_wall - result.completed_at.timestamp()) * 1000
    return row


# ---- the run ---------------------------------------------------------------------------


def run(options: Options, scratch: Path) -> dict[str, object]:
    """The benchmark; the children's logs go to `scratch`."""
    with running_pipeline(options, scratch) as pipeline:
        warm_up_s = warm_up(pipeline, options)
        send = partial(publish, pipeline.publisher, options)
        windows = []
        for _ in range(options.windows):
            sent = schedule(options)
            with OpenLoop(sent, send, options.drain_timeout_s, "e2e") as loop:
                wanted = [item.request_id for item in sent]
                received = collect(pipeline, wanted, loop.done_draining)
            windows.append(summarise(options, sent, received, warm_up_s))
    return median_window(windows)


def median_window(windows: list[dict[str, Any]]) -> dict[str, object]:
    """The window with the median overhead p99, whole, with every window's headline figures.
    Its failures are every window's, so that a loss in any window fails the run."""

    def p99(window: dict[str, Any]) -> float:
        value = window["overhead_p99_ms"]
        return math.inf if value is None else value  # None: no request to time

    ranked = sorted(windows, key=p99)  # of an even count, the upper middle one
    causes = sum((Counter(w["failure_causes"]) for w in windows), Counter[str]())
    # The render p50 beside each: a window where the model ran slower ran on a slower CPU.
    headlines = ("overhead_p99_ms", "render_utilisation", "failures")
    return {
        **ranked[len(ranked) // 2],
        "failures": causes.total(),
        "failure_causes": dict(causes),
        "windows": [
            {
                **{name: w[name] for name in headlines},
                "render_p50_ms": w["render_ms"].get("p50"),
            }
            for w in windows
        ],
    }


def options_from(args: argparse.Namespace) -> Options:
    options = QUICK if args.quick else DEFAULT
    overrides = {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "users": args.users,
        "steps": args.steps,
        "windows": args.windows,
        **worker_overrides(args),
    }
    return overridden(options, overrides)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 15 s window instead of 60 s")
    parser.add_argument("--rate", type=float, help="requests per second (default 20)")
    parser.add_argument("--duration", type=float, help="seconds of publishing (default 60)")
    parser.add_argument("--users", type=int, help="users the requests come from (default 10)")
    parser.add_argument("--steps", type=int, help="denoising steps per image (default 1)")
    add_worker_arguments(parser)
    parser.add_argument("--windows", type=positive, help="measured in turn (default 3, quick 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    run_alone("e2e", lambda scratch: run(options_from(args), scratch), args.out)


if __name__ == "__main__":
    main()
