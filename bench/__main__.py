"""`python -m bench` (`make bench`): the start-up, intake, render, end-to-end, overload,
gateway, scale and fleet benchmarks in turn.

Writes every figure, the targets and whether each is met, the date, the commit and the
machine to `bench/results.json`, and generates `docs/benchmarks.md` from the same data.

- `BENCH_QUICK=1` or `--quick`: small counts and short windows, a few minutes in all.
- `BENCH_GPU=1` or `--gpu`: the render benchmark with `sd15-random` at 512x512 on CUDA
  (the others are unchanged); it needs a CUDA GPU.
- `--only render` (or `intake,e2e`, ...): run some of them; the files then hold those only.

A benchmark that fails is recorded with its error and the suite goes on to the next; the
exit status is 1 if any failed. Targets that are not met are figures, not failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import e2e, fleet, gateway, intake, machine, overload, render, report, scale, startup
from bench.command import exit_on_sigterm
from imagegen.consumers.devices import resolve_device
from imagegen.schemas.errors import ConfigError

BENCHMARKS = ("startup", "intake", "render", "e2e", "overload", "gateway", "scale", "fleet")
INTAKE_REQUESTS = 20_000
INTAKE_REQUESTS_QUICK = 5_000


@dataclass(frozen=True)
class Mode:
    quick: bool
    gpu: bool


@dataclass(frozen=True)
class Target:
    benchmark: str
    metric: str  # a key of the benchmark's figures
    at_least: bool  # True: the value must be >= goal; False: <= goal
    goal: float
    label: str

    def text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.goal:g}"

    def evaluate(self, figures: dict[str, Any]) -> dict[str, Any]:
        value = figures.get(self.metric)
        met = isinstance(value, int | float) and (
            value >= self.goal if self.at_least else value <= self.goal
        )
        # A run that lost requests meets no target, whatever its figures.
        met = met and not figures.get("failures")
        return {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "label": self.label,
            "target": self.text(),
            "goal": self.goal,
            "value": value,
            "met": met,
        }


def targets(mode: Mode) -> list[Target]:
    render_goal, render_case = (0.97, "GPU, full size") if mode.gpu else (0.9, "CPU, tiny")
    return [
        Target("intake", "processor_admitted_per_s", True, 5000, "admitted requests/s"),
        Target(
            "render",
            "efficiency_vs_bare_loop",
            True,
            render_goal,
            f"worker / bare loop ({render_case})",
        ),
        Target(
            "render",
            "edit_efficiency_vs_bare_loop",
            True,
            render_goal,
            f"edit worker / bare image-to-image loop ({render_case})",
        ),
        Target("e2e", "overhead_p99_ms", False, 50, "pipeline overhead p99 at 20 req/s (ms)"),
        Target("startup", "publisher_s", False, 1.0, "`import imagegen.producers` (s)"),
        Target("startup", "cli_help_s", False, 1.0, "`imagegen --help` (s)"),
        Target(
            "overload",
            "renders_started_after_deadline",
            False,
            0,
            "renders started after their deadline, at 3x capacity",
        ),
        Target(
            "overload",
            "device_s_canceled_or_expired",
            False,
            0,
            "device-seconds on requests expired or canceled before their render",
        ),
        Target(
            "overload",
            "cancel_latency_p99_vs_target",
            False,
            1.0,
            "mid-render cancel latency p99 / (1 step + 200 ms)",
        ),
        # The gateway authenticates, validates, publishes and waits for the processor's
        # intake decision before its 202, a trip through the broker and back that the bare
        # endpoint (publish, ack, 202) does not take, so it cannot be as fast; but a client
        # should not wait much longer than a few broker round trips for it: 8x the bare
        # endpoint's p99 (about 200 ms where the bare p99 is 25 ms) at 20 req/s.
        Target(
            "gateway",
            "gateway_vs_bare_p99",
            False,
            8,
            "gateway submit p99 / bare endpoint p99 at 20 req/s",
        ),
        # A progress bar or a status page fed by the event stream should look live: 100 ms
        # from the worker's event to the SSE client is below what a person notices.
        Target("gateway", "event_lag_p99_ms", False, 100, "SSE event lag p99 (ms)"),
        Target(
            "scale",
            "scaling_efficiency_min",
            True,
            0.9,
            "throughput of N workers / (N x one worker), N up to the partition count",
        ),
        Target(
            "fleet",
            "requests_lost",
            False,
            0,
            "requests without a success, through a rolling restart of 3 processors and 3 workers",
        ),
    ]


# ---- the benchmarks, through their Python functions -----------------------------------


def run_startup(mode: Mode, scratch: Path) -> dict[str, object]:
    return startup.run(startup.ROUNDS_QUICK if mode.quick else startup.ROUNDS, scratch)


def run_intake(mode: Mode, _scratch: Path) -> dict[str, object]:
    return dict(intake.run(INTAKE_REQUESTS_QUICK if mode.quick else INTAKE_REQUESTS))


def run_render(mode: Mode, scratch: Path) -> dict[str, object]:
    profile = render.GPU if mode.gpu else render.QUICK if mode.quick else render.CPU
    render.quiet_libraries()
    figures: dict[str, Any] = render.run(profile, scratch)
    # At the batch size an operator would pick, the one with the most worker throughput:
    # how close the worker comes there to the bare loop.
    return {
        "efficiency_vs_bare_loop": figures["best_worker"]["ratio"],
        "edit_efficiency_vs_bare_loop": figures["best_edit_worker"]["ratio"],
        **figures,
    }


def run_e2e(mode: Mode, scratch: Path) -> dict[str, object]:
    return e2e.run(e2e.QUICK if mode.quick else e2e.DEFAULT, scratch)


def run_overload(mode: Mode, scratch: Path) -> dict[str, object]:
    return overload.run(overload.QUICK if mode.quick else overload.DEFAULT, scratch)


def run_gateway(mode: Mode, scratch: Path) -> dict[str, object]:
    return gateway.run(gateway.QUICK if mode.quick else gateway.DEFAULT, scratch)


def run_scale(mode: Mode, scratch: Path) -> dict[str, object]:
    return scale.run(scale.QUICK if mode.quick else scale.DEFAULT, scratch)


def run_fleet(mode: Mode, scratch: Path) -> dict[str, object]:
    return fleet.run(fleet.QUICK if mode.quick else fleet.DEFAULT, scratch)


RUNNERS: dict[str, Callable[[Mode, Path], dict[str, object]]] = {
    "startup": run_startup,
    "intake": run_intake,
    "render": run_render,
    "e2e": run_e2e,
    "overload": run_overload,
    "gateway": run_gateway,
    "scale": run_scale,
    "fleet": run_fleet,
}


def run_suite(mode: Mode, names: list[str], scratch: Path) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": machine.git_commit(),
        "mode": {"quick": mode.quick, "gpu": mode.gpu},
        "machine": machine.describe(),
        "runs": runs,
    }
    for name in names:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        logs = scratch / name
        logs.mkdir()
        run: dict[str, Any] = {"load_average_before": machine.load_average()}
        started = time.monotonic()
        try:
            results[name] = RUNNERS[name](mode, logs)
        except Exception as error:
            # One broken benchmark must not cost the others' figures: record it, go on.
            traceback.print_exc()
            run["error"] = f"{type(error).__name__}: {error}"
            results[name] = {}
        run["elapsed_s"] = round(time.monotonic() - started, 1)
        runs[name] = run
        print(f"bench: {name} done in {run['elapsed_s']} s", file=sys.stderr, flush=True)
    results["targets"] = [
        target.evaluate(results[target.benchmark])
        for target in targets(mode)
        if target.benchmark in names
    ]
    return results


# ---- command line ---------------------------------------------------------------------


def selection(value: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(BENCHMARKS)}")
    return [name for name in BENCHMARKS if name in names]  # always in the suite's order


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=flag("BENCH_QUICK"))
    parser.add_argument("--gpu", action="store_true", default=flag("BENCH_GPU"))
    parser.add_argument("--only", type=selection, default=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="the results JSON")
    parser.add_argument("--docs", type=Path, default=report.DOCS, help="the generated Markdown")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    mode = Mode(quick=args.quick, gpu=args.gpu)
    if mode.gpu and "render" in args.only:
        try:
            resolve_device("cuda")
        except ConfigError as error:
            sys.exit(f"--gpu needs a CUDA GPU: {error}")
    exit_on_sigterm()
    scratch = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    results = run_suite(mode, args.only, scratch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(report.markdown(results, args.out), encoding="utf-8")
    print(report.summary(results))
    print(f"wrote {args.out} and {args.docs}")
    failed = [name for name, run in results["runs"].items() if "error" in run]
    if failed:
        # The logs of what failed stay behind for whoever investigates.
        sys.exit(f"failed: {', '.join(failed)}; logs: {scratch}")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
