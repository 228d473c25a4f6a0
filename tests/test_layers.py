"""The layers point one way, and the client side imports none of the heavy stacks.

Layers, bottom first: `imagegen.schemas`; `imagegen.infra`; `imagegen.producers`,
`imagegen.processors` and `imagegen.consumers`, which do not import one another, and
`imagegen.client`, the HTTP API's client, beside them; `imagegen.gateway`, the HTTP API,
which puts a publisher and followers together; `imagegen.cli` on top. The folders come from
the build's `package-dir`, so a new mapped folder without a layer here fails too. Every
import counts, also one inside a function: a lazy import upward is still a dependency upward.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANKS = {
    "imagegen.schemas": 0,
    "imagegen.infra": 1,
    "imagegen.producers": 2,
    "imagegen.processors": 2,
    "imagegen.consumers": 2,
    "imagegen.client": 2,
    "imagegen.gateway": 3,
    # The deliverer builds the gateway's job document; `imagegen.webhooks.verify`, for
    # receivers, imports nothing but the standard library.
    "imagegen.webhooks": 4,
    "imagegen.cli": 5,
    "imagegen": 6,  # __init__, and __main__ that runs the CLI
}
HEAVY = ("torch", "diffusers", "transformers", "faust", "PIL", "fastapi", "uvicorn")


def _package_folders() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    for name in config["packages"]:
        folders.setdefault(name, ROOT.joinpath(*name.split(".")))
    return folders


def _layer_of(module: str) -> str | None:
    matches = [layer for layer in RANKS if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len, default=None)


def _imports(source: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "." * node.level + (node.module or "")
            else:
                yield node.lineno, node.module or ""


def _violations(folders: dict[str, Path]) -> Iterator[str]:
    top_level_names = {path.name for path in folders.values()} - {"imagegen"}
    for package, folder in folders.items():
        own = _layer_of(package)
        assert own is not None, f"{package} (from pyproject.toml) has no layer in RANKS"
        for source in sorted(folder.glob("*.py")):
            where = source.relative_to(folder.parent)
            for line, module in _imports(source):
                first = module.split(".")[0]
                if module.startswith("."):
                    yield f"{where}:{line}: relative import {module}; import imagegen.* by name"
                elif first in top_level_names:
                    yield f"{where}:{line}: imports {module}; the namespace is imagegen.{module}"
                elif (
                    (target := _layer_of(module)) and target != own and RANKS[target] >= RANKS[own]
                ):
                    yield f"{where}:{line}: {own} imports {module} ({target}), not below it"


def test_no_module_imports_upward_or_sideways() -> None:
    assert list(_violations(_package_folders())) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    upward = tmp_path / "leaky.py"
    upward.write_text("def f():\n    from imagegen.consumers.worker import RenderWorker\n")
    assert list(_imports(upward)) == [(2, "imagegen.consumers.worker")]
    assert list(_violations({"imagegen.schemas": tmp_path})) == [
        f"{tmp_path.name}/leaky.py:2: imagegen.schemas imports imagegen.consumers.worker "
        "(imagegen.consumers), not below it"
    ]


@pytest.mark.parametrize(
    "module",
    [
        "imagegen.producers",
        "imagegen.consumers.results",
        "imagegen.consumers.dlq",
        "imagegen.cli.app",
        "imagegen.client",
    ],
)
def test_the_client_side_imports_no_heavy_stack(module: str) -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, {module}; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert [name for name in loaded if name.split(".")[0] in HEAVY] == []


def test_the_worker_does_not_import_faust() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, imagegen.consumers.worker; print(*sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert [name for name in loaded if name.split(".")[0] == "faust"] == []
