"""Run mypy over the `imagegen` namespace, as the wheel lays it out.

The build maps the top-level folders into the namespace (pyproject.toml,
[tool.setuptools.package-dir]), and mypy follows neither that mapping nor the import hook of
an editable install. So this lays the namespace out as links under build/typecheck/, which
mypy reads (`mypy_path` in pyproject.toml); its messages name files through those links.
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def lay_out() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shutil.rmtree(TREE, ignore_errors=True)
    (TREE / "imagegen").mkdir(parents=True)
    for source in (ROOT / "imagegen").iterdir():
        if source.name != "__pycache__":
            (TREE / "imagegen" / source.name).symlink_to(source)
    for package, folder in config["package-dir"].items():
        (TREE / package.replace(".", "/")).symlink_to(ROOT / folder)


if __name__ == "__main__":
    lay_out()
    sys.exit(subprocess.call([sys.executable, "-m", "mypy", *sys.argv[1:]], cwd=ROOT))
