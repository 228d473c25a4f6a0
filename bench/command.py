"""What the benchmarks share as commands of their own (`python -m bench.render`, ...)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from imagegen.schemas.errors import ImagegenError


def positive(value: str) -> int:
    """An argument type: a whole number of at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def run_alone(name: str, run: Callable[[Path], dict[str, object]], out: Path | None) -> None:
    """Run one benchmark with a scratch folder for its logs and print its JSON (and write it
    to `out`). On failure, exit naming the scratch folder, kept for whoever investigates."""
    scratch = Path(tempfile.mkdtemp(prefix=f"imagegen-bench-{name}-"))
    try:
        report = run(scratch)
    except (RuntimeError, ImagegenError) as error:
        sys.exit(f"{name} benchmark failed: {error}\nlogs: {scratch}")
    shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
