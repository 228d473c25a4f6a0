"""The built-in model `fixed:<duration>` (`fixed:200ms`, `fixed:1.5s`): a pipeline that takes
exactly that long per call, whatever the batch, and draws a test pattern.

It exists for the scale benchmark (`bench/scale.py`): with the render's cost known and
spent asleep, several workers on one small host measure the pipeline around the model (the
broker, the store, rebalances), not the host's CPU. Serve it under the name requests use:
`imagegen worker --model tiny=fixed:200ms`. It generates only; an edit fails as a model
that cannot edit does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from imagegen.schemas.errors import ConfigError

PREFIX = "fixed:"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")
# Long enough for any benchmark, short enough that a typo (fixed:200s) is caught.
_LONGEST_S = 60.0

StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def parse_cost(source: str) -> float:
    """The seconds per call of `fixed:<duration>`; `ConfigError` saying the form otherwise."""
    matched = _DURATION.fullmatch(source.removeprefix(PREFIX))
    seconds = None
    if matched:
        seconds = float(matched[1]) / (1000 if matched[2] == "ms" else 1)
    if seconds is None or not 0 < seconds <= _LONGEST_S:
        raise ConfigError(
            f"model source {source!r}: write a fixed cost as fixed:<number>ms or "
            f"fixed:<number>s, above 0 and at most {_LONGEST_S:g}s, such as fixed:200ms"
        )
    return seconds


class FixedCostPipeline(DiffusionPipeline):
    """Sleeps its cost through the call's steps (calling the step callback after each, as
    diffusers does), then returns one pattern per prompt, coloured by its generator."""

    def __init__(self, cost_s: float) -> None:
        super().__init__()
        self.register_to_config(cost_s=cost_s)
        self.cost_s = cost_s

    def __call__(
        self,
        prompt: Sequence[str],
        num_inference_steps: int,
        generator: Sequence[torch.Generator],
        width: int,
        height: int,
        callback_on_step_end: StepCallback | None = None,
        **_: Any,  # the guidance, negative prompt and output type change nothing here
    ) -> ImagePipelineOutput:
        started = time.monotonic()
        for step in range(num_inference_steps):
            # Sleep to the step's share of the cost, so that the call takes the cost in all.
            remaining = started + self.cost_s * (step + 1) / num_inference_steps
            time.sleep(max(0.0, remaining - time.monotonic()))
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, None, {})
        return ImagePipelineOutput(images=[_pattern(g, width, height) for g in generator])


def _pattern(generator: torch.Generator, width: int, height: int) -> Image.Image:
    """Vertical bars in colours drawn from `generator`: the same seed, the same image."""
    colours = torch.randint(0, 256, (8, 3), generator=generator, device=generator.device)
    bars = colours.repeat_interleave(-(-width // 8), dim=0)[:width]
    pixels = bars.unsqueeze(0).expand(height, width, 3).to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")
