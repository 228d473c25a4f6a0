"""What the benchmarks share as commands of their own (`python -m bench.render`, ...)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from imagegen.schemas.errors import ImagegenError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Dataclass = TypeVar("Dataclass", bound="DataclassInstance")


def positive(value: str) -> int:
    """An argument type: a whole number of at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def overridden(options: Dataclass, overrides: Mapping[str, Any]) -> Dataclass:
    """`options` with the fields that `overrides` names, where the command line gave them (an
    option not given parses as None, and keeps the default)."""
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so stacks and child processes are stopped on the way."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


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
