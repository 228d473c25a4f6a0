"""Start-up benchmark: what the client side costs a process before it does anything.

Times three fresh processes, interleaved, several rounds each, against the bare interpreter
in the same run: `python -c pass`, `python -c "import imagegen.producers"` (a service that
publishes requests), and `imagegen --help` (the CLI, through its console script). Each runs
from a scratch folder, as a user's process would, and the median round counts.

`python -m bench.startup [--rounds N] [--out FILE]` runs it alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.command import positive, run_alone

ROUNDS = 15
ROUNDS_QUICK = 5
COUNT_MODULES = "import sys, imagegen.producers; print(len(sys.modules))"


def _commands() -> dict[str, list[str]]:
    console_script = Path(sys.executable).parent / "imagegen"
    return {
        "bare": [sys.executable, "-c", "pass"],
        "publisher": [sys.executable, "-c", "import imagegen.producers"],
        "cli_help": [str(console_script), "--help"],
    }


def _seconds(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def run(rounds: int, scratch: Path) -> dict[str, object]:
    commands = _commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            times[name].append(_seconds(command, scratch))
    median = {name: statistics.median(values) for name, values in times.items()}
    modules = subprocess.run(
        [sys.executable, "-c", COUNT_MODULES], cwd=scratch, capture_output=True, text=True
    ).stdout.strip()
    figures: dict[str, object] = {"rounds": rounds, "publisher_modules": int(modules)}
    for name, seconds in median.items():
        figures[f"{name}_s"] = round(seconds, 3)
        if name != "bare":
            figures[f"{name}_vs_bare"] = round(seconds / median["bare"], 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive, default=ROUNDS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_alone("startup", lambda scratch: run(args.rounds, scratch), args.out)


if __name__ == "__main__":
    main()
