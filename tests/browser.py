"""A headless Chromium for tests, through Playwright, or the reason there is none.

Playwright's own browser download cannot reach its host from CI, so the tests drive the
distribution's browser (Debian's `chromium`, which `.ci/run` installs where it can) at
`IMAGEGEN_CHROMIUM` (default /usr/bin/chromium). `missing()` says why a browser test must
skip, or None; `artifacts_dir()` is where tests leave screenshots: IMAGEGEN_TEST_ARTIFACTS,
else tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CHROMIUM = Path(os.environ.get("IMAGEGEN_CHROMIUM", "/usr/bin/chromium"))
# Containers often run as root, where Chromium's sandbox will not start.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]


def missing() -> str | None:
    """Why no browser test can run here, or None when one can."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (it comes with the dev extra: make test installs it)"
    if not os.access(CHROMIUM, os.X_OK):
        return (
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set IMAGEGEN_CHROMIUM); "
            "Playwright's own browser download is not used"
        )
    return None


def artifacts_dir() -> Path:
    path = Path(os.environ.get("IMAGEGEN_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
