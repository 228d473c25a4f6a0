"""Turning admitted requests into images: which requests batch together, seeds, encoding,
and the hook that watches a render step by step (and may stop it).

One loaded model serves every task. Its image-to-image and inpainting pipelines are made
from the loaded one with diffusers' `from_pipe`, which shares its components (the weights
are held once), the first time a task needs them. A model loaded from an inpainting
checkpoint is an inpainting pipeline already, and serves `inpaint` as it is.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.auto_pipeline import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
)

# From its own module: diffusers' lazy `__init__` type-checks as a placeholder class.
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image, features

from imagegen.consumers.inputs import EditInputs, steps_run
from imagegen.schemas.errors import ConfigError, ImagegenError
from imagegen.schemas.requests import GenerationRequest, Task

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# Lossy formats at a quality where artefacts are hard to see; PNG stays lossless.
_SAVE_OPTIONS: dict[str, dict[str, int]] = {
    "png": {},
    "jpeg": {"quality": 90},
    "webp": {"quality": 90},
}


class RenderOutOfMemory(ImagegenError):
    """The device ran out of memory; the same work can fit later, or in smaller batches."""

    transient = True


class RenderFailed(ImagegenError):
    """The pipeline raised while rendering; the same request fails the same way again."""


class RenderStopped(Exception):
    """Raised by an `OnStep` hook to stop a render after `step` of `steps` denoising steps.

    `Renderer.render` lets it through as it is: it is a decision, not a failure."""

    def __init__(self, step: int, steps: int) -> None:
        super().__init__(f"stopped after {step} of {steps} steps")
        self.step = step
        self.steps = steps


#: Called after each denoising step with (steps done, steps in all); may raise `RenderStopped`.
OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class BatchKey:
    """What requests must have in common to be rendered in one pipeline call."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    task: Task = "generate"
    strength: float | None = None


def batch_key(request: GenerationRequest) -> BatchKey:
    return BatchKey(
        model=request.model,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        task=request.task,
        strength=request.edit_strength,
    )


def seed_for(request: GenerationRequest) -> int:
    """The request's seed or, when it has none, one derived from its id: a re-render matches."""
    if request.seed is not None:
        return request.seed
    digest = hashlib.sha256(request.request_id.encode()).digest()
    return int.from_bytes(digest[:4], "big")


class Renderer:
    """Renders batches of requests with one pipeline on one device."""

    def __init__(self, pipeline: DiffusionPipeline, device: torch.device) -> None:
        self._pipelines: dict[Task, DiffusionPipeline] = {"generate": pipeline}
        if _is_inpainting(pipeline):
            self._pipelines["inpaint"] = pipeline
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    def render(
        self,
        requests: Sequence[GenerationRequest],
        on_step: OnStep | None = None,
        inputs: Sequence[EditInputs] | None = None,
    ) -> list[Image.Image]:
        """One image per request, in order, from a single pipeline call.

        The requests must share a `BatchKey`; an edit or inpaint needs `inputs`, one per
        request. Each has a generator of its own, so its image is the same whether it
        renders alone or beside others. `on_step` runs after every denoising step
        (diffusers' `callback_on_step_end`) with the steps done of the steps the render runs
        (fewer than `steps` for an edit: `steps_run`); the `RenderStopped` it raises ends
        the call there and is raised as it is. Raises `RenderOutOfMemory` (transient) or
        `RenderFailed`.
        """
        if not requests:
            raise ValueError("render needs at least one request")
        key = batch_key(requests[0])
        mismatched = [r.request_id for r in requests if batch_key(r) != key]
        if mismatched:
            raise ValueError(
                f"requests {', '.join(mismatched)} differ from {requests[0].request_id} in model, "
                "task, size, steps, strength or guidance scale; group requests by batch_key() "
                "first"
            )
        generators = [
            torch.Generator(device=self._device).manual_seed(seed_for(r)) for r in requests
        ]
        try:
            with torch.inference_mode():
                # Every pipeline class defines `__call__`; their base class declares none.
                output = self._pipeline(key.task)(  # type: ignore[operator]
                    prompt=[r.prompt for r in requests],
                    # "" is what the pipeline uses for a missing negative prompt.
                    negative_prompt=[r.negative_prompt or "" for r in requests],
                    num_inference_steps=key.steps,
                    guidance_scale=key.guidance_scale,
                    generator=generators,
                    output_type="pil",
                    **_task_arguments(key, inputs, len(requests)),
                    **_step_hook(on_step, steps_run(requests[0])),
                )
        except RenderStopped:
            raise
        except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError is this class
            if self._device.type == "cuda":
                # Hand the failed batch's cached blocks back, so that the next try (a
                # smaller batch, or the same request again) can fit.
                torch.cuda.empty_cache()
            raise RenderOutOfMemory(
                f"out of device memory rendering {len(requests)} image(s) of "
                f"{key.width}x{key.height} with {key.model}; retry later or in smaller batches"
            ) from exc
        except Exception as exc:
            raise RenderFailed(
                f"{key.model} failed to render {len(requests)} image(s) of "
                f"{key.width}x{key.height}: {type(exc).__name__}: {exc}"
            ) from exc
        return list(output.images)

    def _pipeline(self, task: Task) -> DiffusionPipeline:
        if task not in self._pipelines:
            made_from = self._pipelines["generate"]
            auto = AutoPipelineForImage2Image if task == "edit" else AutoPipelineForInpainting
            derived = auto.from_pipe(made_from)
            derived.set_progress_bar_config(disable=True)
            self._pipelines[task] = derived
        return self._pipelines[task]


def _is_inpainting(pipeline: DiffusionPipeline) -> bool:
    # diffusers names every inpainting pipeline class so (StableDiffusionInpaintPipeline,
    # StableDiffusionXLInpaintPipeline, ...), which is how its AutoPipeline tells them too.
    return "Inpaint" in type(pipeline).__name__


def _task_arguments(
    key: BatchKey, inputs: Sequence[EditInputs] | None, count: int
) -> dict[str, Any]:
    """The pipeline arguments of the batch's task, beside the ones every task takes."""
    if key.task == "generate":
        return {"width": key.width, "height": key.height}
    if inputs is None or len(inputs) != count:
        raise ValueError(f"a batch of {count} {key.task} request(s) needs as many inputs")
    arguments: dict[str, Any] = {"image": [i.image for i in inputs], "strength": key.strength}
    if key.task == "inpaint":
        masks = [i.mask for i in inputs]
        if any(mask is None for mask in masks):
            raise ValueError("an inpaint request needs a mask")
        arguments |= {"mask_image": masks, "width": key.width, "height": key.height}
    return arguments


def _step_hook(on_step: OnStep | None, steps: int) -> dict[str, Any]:
    """The pipeline arguments that call `on_step` after each step, in the request's steps."""
    if on_step is None:
        return {}

    def callback(
        pipeline: Any, index: int, _timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        # A second-order scheduler runs about two timesteps per step: count in steps.
        total = getattr(pipeline, "num_timesteps", None) or steps
        on_step(min(steps, -(-(index + 1) * steps // total)), steps)
        return tensors

    return {"callback_on_step_end": callback}


def encode_image(image: Image.Image, output_format: str) -> tuple[bytes, str]:
    """`image` as the bytes of `output_format` (png, jpeg or webp), and their content type."""
    if output_format not in CONTENT_TYPES:
        raise ValueError(f"output format {output_format!r} is not one of png, jpeg, webp")
    if output_format == "webp" and not features.check("webp"):
        raise ConfigError(
            "this Pillow was built without WebP support; install a Pillow wheel from PyPI, "
            "which includes it, or rebuild Pillow against libwebp"
        )
    if output_format == "jpeg" and image.mode != "RGB":
        image = image.convert("RGB")  # JPEG has no alpha channel
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **_SAVE_OPTIONS[output_format])
    return buffer.getvalue(), CONTENT_TYPES[output_format]
