"""The wheel as a user installs it: one top-level package, and a client without torch.

Builds the wheel, installs it without extras into a fresh venv (dependencies from the package
index), and runs it from a folder outside the checkout, so nothing of the development install
can leak in.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Installing from the package index and building take a while, like the stack tests.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

HEAVY = ("torch", "diffusers", "transformers", "faust")


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, ROOT, cwd=out
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("imagegen_pipeline-*.whl")
    return path


@pytest.fixture(scope="module")
def core_install(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a fresh venv holding the wheel and its core dependencies only."""
    home = tmp_path_factory.mktemp("core")
    venv.create(home / "venv", with_pip=True)
    bin_dir = home / "venv" / "bin"
    installed = _run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, cwd=home)
    assert installed.returncode == 0, installed.stderr
    return bin_dir


def test_the_wheel_holds_one_top_level_package_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"imagegen"}
    for expected in (
        "imagegen/producers/publisher.py",
        "imagegen/cli/app.py",
        "imagegen/schemas/json/generation_request.v1.json",
        "imagegen/infra/docker-compose.yml",
        "imagegen/infra/grafana/dashboards/imagegen.json",
    ):
        assert expected in names


def test_a_core_install_imports_the_publisher_without_the_heavy_stacks(
    core_install: Path,
) -> None:
    script = (
        "import importlib.util, imagegen.producers, imagegen.consumers.results;"
        f"print(*[m for m in {HEAVY!r} if importlib.util.find_spec(m)])"
    )
    imported = _run(core_install / "python", "-c", script, cwd=core_install)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == []


def test_a_core_install_runs_the_client_commands(core_install: Path) -> None:
    for command in ("submit", "results", "fetch", "dlq", "status"):
        shown = _run(core_install / "imagegen", command, "--help", cwd=core_install)
        assert shown.returncode == 0, shown.stderr
        assert "Usage: imagegen" in shown.stdout


@pytest.mark.parametrize("command", ["worker", "processor", "demo"])
def test_a_stage_without_its_extra_names_the_extra(core_install: Path, command: str) -> None:
    refused = _run(core_install / "imagegen", command, cwd=core_install)
    assert refused.returncode == 2
    extras = {"worker": "worker", "processor": "processor", "demo": "processor,worker,embedded"}
    assert f"pip install 'imagegen-pipeline[{extras[command]}]'" in refused.stderr
