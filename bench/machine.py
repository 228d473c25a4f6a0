"""What the benchmarks ran on and at which commit: figures mean little without it."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import confluent_kafka
import torch

PACKAGES = ("torch", "diffusers", "transformers", "confluent-kafka", "faust-streaming")
ROOT = Path(__file__).resolve().parent.parent


def describe() -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "librdkafka": confluent_kafka.libversion()[0],
        "torch_threads": torch.get_num_threads(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: how busy the machine was besides the benchmark."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> dict[str, object] | None:
    try:
        commit = _git("rev-parse", "HEAD")
        # No index refresh: others may be working in this checkout. The benchmarks' own
        # outputs are left out: earlier figures there change nothing that is measured.
        changed = _git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!bench/results.json",
            ":!docs/benchmarks.md",
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(changed)}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=ROOT,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu() -> dict[str, object] | None:
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return {
        "name": properties.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
