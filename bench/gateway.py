"""Gateway benchmark: what the HTTP gateway adds to a submission, and how late its event
stream is.

On one private embedded stack, with one `imagegen processor` and one `imagegen worker` as
child processes (rate limits that admit everything), two HTTP servers run as uvicorn child
processes side by side:
- the gateway (`python -m imagegen.gateway.server`), with an API key minted through
  `KeyRegistry`;
- a bare FastAPI endpoint (`python -m bench.bare_endpoint`) whose `POST
  /v1/images/generations` builds the same `GenerationRequest`, produces it to
  `imagegen.requests` with the project's producer (acks=all), waits for the broker's
  acknowledgement and answers 202: no API key, no wait for the intake, no job store.

A warm-up request must come back through the pipeline first, and each server gets a few
unmeasured requests. Then each one, in turn, is offered `rate_per_s` submissions for
`duration_s`, open loop: submission i starts at t0 + i / rate by the clock, on its own
asyncio task of one `httpx.AsyncClient`, whatever earlier answers do. Submit latency runs
from the start of the POST to its answer. The gateway answers 202 only once the processor's
intake decided (the `admitted` event came back through its event hub) and the job is
stored, so its latency holds a trip through the processor that the bare endpoint's does
not: that is what is measured. Achieved throughput: 202 answers per second, from the first
slot to the last answer. A submission answered otherwise, not at all, or answered by the
gateway only when its intake wait ran out, is a failure.

Then event lag: `event_jobs` jobs of `event_steps` steps, one after the other, each
submitted through the gateway and followed through `GET /v1/images/jobs/{id}/events`
(httpx streaming) until `completed`. The stream's events carry no time of their own, so
the worker's and processor's `JobEvent`s are read from `imagegen.events` afterwards
(`EventSubscriber`) and matched by request id, type and step: lag = the event's arrival
at the client - its `JobEvent.at` (same host, same clock). Only events that happened while
the stream was open count (a stream starts by replaying the job's state). The worker sends
progress at most every 0.5 s, so a render of `event_steps` steps gives several.

Run: `python -m bench.gateway [--quick] [--rate R] [--duration S]` (or `BENCH_QUICK=1`).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from bench.command import exit_on_sigterm, overridden, positive, run_alone
from bench.pipeline import (
    SCHEDULE_LEAD_S,
    Pipeline,
    PipelineOptions,
    add_worker_arguments,
    percentiles,
    running_pipeline,
    worker_overrides,
)
from bench.stack import child_env, free_port
from imagegen.cli.children import NotReady, module_child, wait_ready
from imagegen.consumers.events import EventSubscriber
from imagegen.producers.api_keys import KeyRegistry
from imagegen.schemas import EventType, Status

ROOT = Path(__file__).resolve().parent.parent
GENERATIONS = "/v1/images/generations"
GATEWAY_USER = "bench-gateway"
#: Unmeasured submissions to each server before its window: connections, first calls.
WARM_UP_SUBMITS = 5
#: How long a server may take to answer `GET /readyz` 200 after its start.
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Options(PipelineOptions):
    rate_per_s: float = 20.0
    duration_s: float = 20.0
    # One step, as the end-to-end benchmark: the worker keeps up at this rate with room to
    # spare, so the window measures the servers, not a backlog.
    steps: int = 1
    #: Jobs followed through the event stream, one after the other.
    event_jobs: int = 8
    #: Their steps: a render of a few seconds, for several progress events (one per 0.5 s).
    event_steps: int = 100
    #: How long one submission's answer, or one followed job, may take.
    request_timeout_s: float = 30.0
    event_timeout_s: float = 120.0


DEFAULT = Options()
QUICK = replace(DEFAULT, duration_s=10.0, event_jobs=3)


# ---- the servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the {self.name} exited with {self.process.returncode}; log: {self.log}"
            )


@contextmanager
def server(name: str, module: str, env: Mapping[str, str], log: Path) -> Iterator[Server]:
    """`python -m <module>` listening on a free port of 127.0.0.1 (IMAGEGEN_GATEWAY_HOST and
    _PORT), once `GET /readyz` answers 200; SIGTERM (then SIGKILL) on the way out."""
    port = free_port()
    env = {**env, "IMAGEGEN_GATEWAY_HOST": "127.0.0.1", "IMAGEGEN_GATEWAY_PORT": str(port)}
    with module_child(module, [], env, log, cwd=ROOT) as process:
        running = Server(name, f"http://127.0.0.1:{port}", process, log)
        _wait_ready(running)
        yield running


def _wait_ready(running: Server) -> None:
    try:
        wait_ready(running.process, running.url, READY_TIMEOUT_S)
    except NotReady as exc:
        raise RuntimeError(f"the {running.name}: {exc}; log: {running.log}") from exc


# ---- submissions, open loop ------------------------------------------------------------


@dataclass
class Submit:
    """One submission of a window."""

    scheduled: float  # perf_counter seconds
    lag_ms: float = 0.0  # how late the POST began against the schedule
    latency_ms: float | None = None  # POST start to its answer
    answered_at: float | None = None  # perf_counter seconds
    failure: str | None = None


def request_body(options: Options, steps: int, prompt: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "model": options.model,
        "width": options.width,
        "height": options.height,
        "steps": steps,
    }


async def _submit(http: httpx.AsyncClient, item: Submit, body: bytes) -> None:
    started = time.perf_counter()
    item.lag_ms = (started - item.scheduled) * 1000
    try:
        answer = await http.post(GENERATIONS, content=body)
    except httpx.HTTPError as error:
        item.failure = type(error).__name__
        return
    item.answered_at = time.perf_counter()
    item.latency_ms = (item.answered_at - started) * 1000
    if answer.status_code != 202:
        item.failure = f"HTTP {answer.status_code}"


async def offered_load(url: str, headers: dict[str, str], options: Options) -> list[Submit]:
    """The window: `rate_per_s` submissions for `duration_s`, each at its slot, after
    `WARM_UP_SUBMITS` unmeasured ones one at a time."""
    body = json.dumps(request_body(options, options.steps, "gateway benchmark")).encode()
    async with httpx.AsyncClient(
        base_url=url,
        headers={**headers, "Content-Type": "application/json"},
        timeout=options.request_timeout_s,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    ) as http:
        for _ in range(WARM_UP_SUBMITS):
            warm = Submit(time.perf_counter())
            await _submit(http, warm, body)
            if warm.failure is not None:
                raise RuntimeError(f"a warm-up submission to {url} failed: {warm.failure}")
        t0 = time.perf_counter() + SCHEDULE_LEAD_S
        count = round(options.rate_per_s * options.duration_s)
        items = [Submit(t0 + i / options.rate_per_s) for i in range(count)]
        tasks = []
        for item in items:
            await asyncio.sleep(max(0.0, item.scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(_submit(http, item, body)))
        await asyncio.gather(*tasks)
    return items


def submit_figures(items: list[Submit], undecided_ms: float | None) -> dict[str, Any]:
    """Latency and throughput of a window. `undecided_ms`: a 202 this slow came when the
    gateway's intake wait ran out, without the processor's decision (a failure)."""
    for item in items:
        latency = item.latency_ms
        if undecided_ms is not None and latency is not None and latency >= undecided_ms:
            item.failure = item.failure or "202 without the intake's decision"
    answered = [item for item in items if item.failure is None and item.answered_at is not None]
    causes = Counter(item.failure for item in items if item.failure is not None)
    last = max((i.answered_at for i in answered if i.answered_at is not None), default=None)
    span_s = last - items[0].scheduled if last is not None and items else 0.0
    return {
        "requests": len(items),
        "answered_202": len(answered),
        "failures": causes.total(),
        "failure_causes": dict(causes),
        "achieved_per_s": round(len(answered) / span_s, 2) if span_s > 0 else 0.0,
        "max_schedule_lag_ms": round(max((item.lag_ms for item in items), default=0.0), 1),
        "submit_ms": percentiles([i.latency_ms for i in answered if i.latency_ms is not None]),
    }


# ---- event lag -------------------------------------------------------------------------


@dataclass
class Streamed:
    """One job followed through the event stream."""

    job_id: str
    opened_at: float  # time.time() when the stream's headers arrived
    #: (event, data, time.time() at its arrival), in order.
    events: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)


def follow_job(http: httpx.Client, options: Options, n: int) -> Streamed:
    body = request_body(options, options.event_steps, f"gateway benchmark events {n}")
    answer = http.post(GENERATIONS, json=body)
    if answer.status_code != 202:
        raise RuntimeError(f"an event job's submission was answered {answer.status_code}")
    job_id = answer.json()["id"]
    path = f"/v1/images/jobs/{job_id}/events"
    with http.stream("GET", path, timeout=options.event_timeout_s) as stream:
        streamed = Streamed(job_id, time.time())
        name, data = "", ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data = line.removeprefix("data:").strip()
            elif not line and name:
                streamed.events.append((name, json.loads(data), time.time()))
                if name == "completed":
                    return streamed
                name, data = "", ""
    raise RuntimeError(f"the event stream of {job_id} ended before `completed`")


#: What a stream's event is, as the `JobEvent` it reports: (type, step).
EventKey = tuple[EventType, int | None]


def event_key(name: str, data: dict[str, Any]) -> EventKey | None:
    if name == "progress":
        return EventType.PROGRESS, data["step"]
    if name == "status":
        return (EventType.ADMITTED if data["status"] == "queued" else EventType.STARTED), None
    if name == "completed":
        return EventType.FINISHED, None
    return None


def job_event_times(pipeline: Pipeline, job_ids: list[str]) -> dict[str, dict[EventKey, float]]:
    """Each job's `JobEvent`s as (type, step) -> `at` (epoch seconds), the first of each."""
    times: dict[str, dict[EventKey, float]] = {job_id: {} for job_id in job_ids}
    with EventSubscriber(pipeline.settings, "beginning", job_ids) as events:
        for event in events.until_caught_up():
            step = event.step if event.type is EventType.PROGRESS else None
            times[event.request_id].setdefault((event.type, step), event.at.timestamp())
    return times


def lag_figures(
    streamed: list[Streamed], times: dict[str, dict[EventKey, float]]
) -> dict[str, Any]:
    lags: dict[str, list[float]] = {"progress": [], "started": [], "completed": []}
    received = replayed = unmatched = 0
    for job in streamed:
        for name, data, arrived in job.events:
            received += 1
            key = event_key(name, data)
            at = None if key is None else times[job.job_id].get(key)
            if at is None:
                unmatched += 1
            elif at < job.opened_at:
                replayed += 1  # it happened before the stream opened: the stream's replay
            elif key is not None:
                kind = {EventType.PROGRESS: "progress", EventType.FINISHED: "completed"}
                lags[kind.get(key[0], "started")].append((arrived - at) * 1000)
    status_and_progress = lags["progress"] + lags["started"]
    overall = percentiles(status_and_progress)
    return {
        "jobs": len(streamed),
        "events_received": received,
        "events_timed": sum(len(values) for values in lags.values()),
        "events_replayed": replayed,
        "events_unmatched": unmatched,
        "progress_events_per_job": round(len(lags["progress"]) / len(streamed), 1)
        if streamed
        else None,
        "lag_ms": overall,
        "lag_ms_by_event": {kind: percentiles(values) for kind, values in lags.items()},
    }


# ---- the run ---------------------------------------------------------------------------


def warm_up(pipeline: Pipeline, options: Options) -> float:
    """Seconds until a request published straight to the pipeline came back succeeded."""
    started = time.monotonic()
    request_id = pipeline.publisher.publish(
        user_id=GATEWAY_USER, **request_body(options, options.steps, "warm-up")
    )
    results = pipeline.subscriber.wait_for([request_id], options.warm_up_timeout_s)
    if results[request_id].status is not Status.SUCCEEDED:
        raise RuntimeError(f"the warm-up request ended {results[request_id].status.value}")
    return time.monotonic() - started


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 2)


def run(options: Options, scratch: Path) -> dict[str, object]:
    """The benchmark; the children's logs go to `scratch`."""
    with running_pipeline(options, scratch) as pipeline, ExitStack() as servers:
        warm_up_s = warm_up(pipeline, options)
        token, _record = KeyRegistry(pipeline.settings).create(GATEWAY_USER)
        env = child_env(pipeline.settings)
        gateway = servers.enter_context(
            server("gateway", "imagegen.gateway.server", env, scratch / "gateway.log")
        )
        bare = servers.enter_context(
            server("bare endpoint", "bench.bare_endpoint", env, scratch / "bare.log")
        )
        auth = {"Authorization": f"Bearer {token}"}

        def check_alive() -> None:
            pipeline.check_alive()
            gateway.check_alive()
            bare.check_alive()

        bare_items = asyncio.run(offered_load(bare.url, {}, options))
        check_alive()
        gateway_items = asyncio.run(offered_load(gateway.url, auth, options))
        check_alive()
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=30.0) as http:
            streamed = [follow_job(http, options, n) for n in range(options.event_jobs)]
        check_alive()
        times = job_event_times(pipeline, [job.job_id for job in streamed])
    intake_wait_ms = pipeline.settings.gateway_intake_wait_s * 1000
    return summarise(
        options,
        submit_figures(bare_items, None),
        submit_figures(gateway_items, intake_wait_ms),
        lag_figures(streamed, times),
        warm_up_s,
    )


def summarise(
    options: Options,
    bare: dict[str, Any],
    gateway: dict[str, Any],
    events: dict[str, Any],
    warm_up_s: float,
) -> dict[str, object]:
    causes = Counter({f"bare: {k}": n for k, n in bare["failure_causes"].items()})
    causes.update({f"gateway: {k}": n for k, n in gateway["failure_causes"].items()})
    return {
        "options": asdict(options),
        "warm_up_s": round(warm_up_s, 1),
        "gateway_submit_p50_ms": gateway["submit_ms"].get("p50"),
        "gateway_submit_p99_ms": gateway["submit_ms"].get("p99"),
        "bare_submit_p50_ms": bare["submit_ms"].get("p50"),
        "bare_submit_p99_ms": bare["submit_ms"].get("p99"),
        "gateway_vs_bare_p50": ratio(gateway["submit_ms"].get("p50"), bare["submit_ms"].get("p50")),
        "gateway_vs_bare_p99": ratio(gateway["submit_ms"].get("p99"), bare["submit_ms"].get("p99")),
        "gateway_achieved_per_s": gateway["achieved_per_s"],
        "bare_achieved_per_s": bare["achieved_per_s"],
        "event_lag_p50_ms": events["lag_ms"].get("p50"),
        "event_lag_p99_ms": events["lag_ms"].get("p99"),
        "failures": causes.total(),
        "failure_causes": dict(causes),
        "gateway": gateway,
        "bare": bare,
        "events": events,
    }


# ---- command line ----------------------------------------------------------------------


def options_from(args: argparse.Namespace) -> Options:
    options = QUICK if args.quick else DEFAULT
    overrides = {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "event_jobs": args.event_jobs,
        "event_steps": args.event_steps,
        **worker_overrides(args),
    }
    return overridden(options, overrides)


def parse_args() -> argparse.Namespace:
    quick = os.environ.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", default=quick, help="10 s windows, 3 event jobs"
    )
    parser.add_argument("--rate", type=float, help="submissions per second (default 20)")
    parser.add_argument("--duration", type=float, help="seconds per window (default 20)")
    parser.add_argument("--event-jobs", type=positive, help="jobs followed (default 8)")
    parser.add_argument("--event-steps", type=positive, help="their steps (default 100)")
    add_worker_arguments(parser)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    run_alone("gateway", lambda scratch: run(options_from(args), scratch), args.out)


if __name__ == "__main__":
    main()
