"""`.ci/validate_manifests.py` on the repository's Kubernetes manifests, and on broken copies
of them: each kind of mistake it exists to catch makes it fail, naming the resource."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
VALIDATOR = ROOT / ".ci" / "validate_manifests.py"


def validate(k8s_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(VALIDATOR), str(k8s_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_manifests_build_and_validate() -> None:
    checked = validate(K8S)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for build in ("base", "overlays/dev", "overlays/gpu"):
        assert f"{build}: 13 resources checked" in checked.stdout


@pytest.mark.parametrize(
    ("file", "old", "new", "named"),
    [
        (
            "base/worker-scaledobject.yaml",
            "lagThreshold:",
            "lagThreshhold:",
            "ScaledObject/imagegen-worker",
        ),
        (
            "base/processor.yaml",
            "  selector:\n    matchLabels:\n      app.kubernetes.io/name: imagegen-processor\n",
            "",
            "Deployment/imagegen-processor",
        ),
        ("base/gateway.yaml", "containerPort: 8080", "containerPort: http", "imagegen-gateway"),
        ("base/worker.yaml", "terminationGracePeriodSeconds", "terminationGraceSeconds", "worker"),
        ("overlays/gpu/kustomization.yaml", "name: imagegen-worker", "name: imagegen-wrker", "gpu"),
    ],
)
def test_a_broken_manifest_fails_naming_it(
    tmp_path: Path, file: str, old: str, new: str, named: str
) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    path = copy / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    checked = validate(copy)
    assert checked.returncode == 1, checked.stdout
    failing = [line for line in checked.stdout.splitlines() if "checked" not in line]
    assert any(named in line for line in failing), checked.stdout
