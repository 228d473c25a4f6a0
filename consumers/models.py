"""The model registry: which pipelines a render worker serves, and where each one comes from.

A `--model` option is `SOURCE` or `NAME=SOURCE`. A source is a built-in (`tiny`, `sd15-random`,
built in code by `imagegen.consumers.synthetic`; `fixed:<duration>`, a test pattern at a fixed
cost, by `imagegen.consumers.fixed_cost`), a local directory holding a diffusers pipeline, or
a Hugging Face hub id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# From its own module: diffusers' lazy `__init__` type-checks as a placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from pydantic import TypeAdapter, ValidationError

from imagegen.consumers.fixed_cost import PREFIX as FIXED_COST
from imagegen.consumers.fixed_cost import FixedCostPipeline, parse_cost
from imagegen.consumers.synthetic import BUILTIN_MODELS, cached_tiny, sd15_random
from imagegen.schemas.errors import ConfigError, ImagegenError
from imagegen.schemas.fields import ModelName

_SOURCE_HELP = (
    "; pass a directory holding a diffusers pipeline (with model_index.json), the id of a hub "
    f"model that is cached or reachable, or a built-in: {', '.join(BUILTIN_MODELS)}, or "
    f"{FIXED_COST}<duration> (a test pattern at a fixed cost per call, such as fixed:200ms)"
)

_MODEL_NAME = TypeAdapter(ModelName)


class UnknownModel(ImagegenError):
    """A model name this worker does not serve, or a source that holds no loadable pipeline."""


def parse_model_option(value: str) -> tuple[str, str]:
    """Split a `--model` option, `SOURCE` or `NAME=SOURCE`, into (name, source)."""
    name, sep, source = value.partition("=")
    if not sep:
        source = name
    if not source:
        raise ConfigError(f"--model {value!r} has no source after '='; give NAME=SOURCE")
    try:
        _MODEL_NAME.validate_python(name)
    except ValidationError:
        raise ConfigError(
            f"--model {value!r}: {name!r} cannot be a model name, which requests spell with "
            "1-128 letters, digits, '.', '_', '/' or '-', starting with a letter or digit and "
            "without '..' segments; serve it under another name with NAME=SOURCE, for example "
            "sd15=/models/stable-diffusion-v1-5"
        ) from None
    return name, source


def load_pipeline(
    source: str, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> DiffusionPipeline:
    """The pipeline `source` names, on `device` in `dtype`, ready for inference.

    `tiny` is built once into `cache_dir` and loaded from there afterwards. Raises
    `UnknownModel` when `source` is neither a built-in nor a loadable directory or hub id.
    """
    pipeline: DiffusionPipeline
    if source == "sd15-random":
        pipeline = sd15_random(device, dtype)
    elif source.startswith(FIXED_COST):
        pipeline = FixedCostPipeline(parse_cost(source))
    else:
        location = cached_tiny(cache_dir) if source == "tiny" else source
        pipeline = _from_pretrained(location, dtype).to(device)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class ModelRegistry:
    """The pipelines one worker serves, under the names that requests use for them."""

    def __init__(self, pipelines: Mapping[str, DiffusionPipeline]) -> None:
        self._pipelines = dict(pipelines)

    @classmethod
    def load(
        cls, options: Iterable[str], device: torch.device, dtype: torch.dtype, cache_dir: Path
    ) -> ModelRegistry:
        """Load the pipeline of every `--model` option."""
        pipelines: dict[str, DiffusionPipeline] = {}
        for option in options:
            name, source = parse_model_option(option)
            if name in pipelines:
                raise ConfigError(
                    f"--model names {name!r} twice; give each source its own name with NAME=SOURCE"
                )
            pipelines[name] = load_pipeline(source, device, dtype, cache_dir)
        if not pipelines:
            raise ConfigError(f"no --model given; serve at least one, such as {BUILTIN_MODELS[0]}")
        return cls(pipelines)

    @property
    def names(self) -> list[str]:
        return sorted(self._pipelines)

    def get(self, name: str) -> DiffusionPipeline:
        """The pipeline served as `name`; `UnknownModel` when this worker does not serve it."""
        try:
            return self._pipelines[name]
        except KeyError:
            raise UnknownModel(
                f"model {name!r} is not served by this worker, which serves: "
                f"{', '.join(self.names)}"
            ) from None


def _from_pretrained(source: str | Path, dtype: torch.dtype) -> DiffusionPipeline:
    local = Path(source).expanduser()
    # Paths never fall through to the hub: a typo'd directory must not become a download.
    if not local.is_dir() and (local.is_absolute() or str(source).startswith((".", "~"))):
        raise UnknownModel(f"model source {str(source)!r}: no such directory{_SOURCE_HELP}")
    try:
        return DiffusionPipeline.from_pretrained(
            str(local) if local.is_dir() else source, torch_dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise UnknownModel(
            f"model source {str(source)!r} could not be loaded ({exc}){_SOURCE_HELP}"
        ) from exc
