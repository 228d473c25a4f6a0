"""Command-line argument types the benchmarks share."""

from __future__ import annotations

import argparse


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)
