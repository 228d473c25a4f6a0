"""Rendering with the real tiny pipeline: sizes, formats, seeds, batching and failures."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from imagegen.consumers.models import load_pipeline
from imagegen.consumers.rendering import (
    BatchKey,
    Renderer,
    RenderFailed,
    RenderOutOfMemory,
    RenderStopped,
    batch_key,
    encode_image,
    seed_for,
)
from imagegen.schemas.requests import GenerationRequest

CPU = torch.device("cpu")

# Batching changes how CPU kernels split their sums, so a batched image may differ from the
# same request rendered alone by rounding: at most this many levels (of 255) in any channel.
BATCH_TOLERANCE = 2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> DiffusionPipeline:
    return load_pipeline("tiny", CPU, torch.float32, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def renderer(pipeline: DiffusionPipeline) -> Renderer:
    return Renderer(pipeline, CPU)


def request(**fields: Any) -> GenerationRequest:
    defaults = {"user_id": "alice", "prompt": "a lighthouse at dusk", "width": 64, "height": 64}
    return GenerationRequest.new(**{**defaults, "steps": 2, **fields})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("width", "height", "output_format"),
    [(64, 64, "png"), (72, 64, "jpeg"), (64, 136, "webp")],
)
def test_renders_the_requested_size_and_format(
    renderer: Renderer, width: int, height: int, output_format: str
) -> None:
    (image,) = renderer.render([request(width=width, height=height, output_format=output_format)])
    data, content_type = encode_image(image, output_format)
    decoded = Image.open(io.BytesIO(data))
    assert (decoded.size, decoded.mode) == ((width, height), "RGB")
    assert decoded.format == output_format.upper()
    assert content_type == f"image/{output_format}"


def test_a_batch_renders_each_image_as_it_renders_alone(renderer: Renderer) -> None:
    requests = [
        request(seed=1),
        request(prompt="a fox in the snow", negative_prompt="blurry", seed=2),
        request(prompt="the sea"),  # derived seed
    ]
    batched = renderer.render(requests)
    alone = [renderer.render([one])[0] for one in requests]
    for together, single in zip(batched, alone, strict=True):
        assert np.abs(pixels(together) - pixels(single)).max() <= BATCH_TOLERANCE


def test_the_same_request_renders_the_same_png_every_time(renderer: Renderer) -> None:
    # A retried render then writes the very bytes the first attempt may already have stored.
    unseeded = request()
    (first,), (second,) = renderer.render([unseeded]), renderer.render([unseeded])
    assert encode_image(first, "png") == encode_image(second, "png")


def test_different_seeds_give_different_images(renderer: Renderer) -> None:
    one, other = renderer.render([request(seed=1), request(seed=2)])
    assert np.abs(pixels(one) - pixels(other)).mean() > 10


def test_a_derived_seed_depends_only_on_the_request_id() -> None:
    # Pinned: a changed derivation would re-render old requests as different images.
    assert seed_for(request(request_id="01J9ZK3V8E6QW0Y7M5T2H4N1BC")) == 1928703914
    uuid_id = "0b9f6a52-3c1e-4d7a-9f0e-2a6b8c4d1e7f"
    assert seed_for(request(request_id=uuid_id, prompt="another prompt")) == 3775556840
    assert seed_for(request(seed=0)) == 0
    assert seed_for(request(seed=2**32 - 1)) == 2**32 - 1


def test_batch_key_ignores_what_can_differ_within_a_batch() -> None:
    first = request(prompt="a", negative_prompt="b", seed=1, output_format="png")
    second = request(prompt="c", seed=2, output_format="webp", user_id="bob")
    assert batch_key(first) == batch_key(second) == BatchKey("tiny", 64, 64, 2, 7.5)
    assert batch_key(request(width=72)) != batch_key(first)
    assert batch_key(request(guidance_scale=1.0)) != batch_key(first)


def test_mixed_batch_keys_are_refused(renderer: Renderer) -> None:
    odd_one = request(steps=3)
    with pytest.raises(ValueError, match=f"{odd_one.request_id} differ .* batch_key"):
        renderer.render([request(), odd_one])
    with pytest.raises(ValueError, match="at least one request"):
        renderer.render([])


@pytest.fixture
def failing_unet(pipeline: DiffusionPipeline) -> Iterator[Callable[[Exception], None]]:
    """Make the real UNet raise `error` when called, as a device failing mid-render would."""
    handles = []

    def fail_with(error: Exception) -> None:
        def hook(*_: object) -> None:
            raise error

        handles.append(pipeline.unet.register_forward_pre_hook(hook))

    yield fail_with
    for handle in handles:
        handle.remove()


def test_out_of_memory_is_transient(
    renderer: Renderer, failing_unet: Callable[[Exception], None]
) -> None:
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    failing_unet(oom)
    with pytest.raises(RenderOutOfMemory, match="smaller batches") as caught:
        renderer.render([request(), request()])
    assert caught.value.transient is True
    assert caught.value.__cause__ is oom


def test_other_pipeline_errors_are_permanent_failures(
    renderer: Renderer, failing_unet: Callable[[Exception], None]
) -> None:
    error = RuntimeError("expected scalar type Half but found Float")
    failing_unet(error)
    with pytest.raises(RenderFailed, match="RuntimeError: expected scalar type") as caught:
        renderer.render([request()])
    assert caught.value.transient is False
    assert caught.value.__cause__ is error


def test_the_step_hook_sees_every_step_and_can_stop_the_render(renderer: Renderer) -> None:
    seen: list[tuple[int, int]] = []
    renderer.render([request(steps=3)], lambda step, steps: seen.append((step, steps)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stop_after_two(step: int, steps: int) -> None:
        if step == 2:
            raise RenderStopped(step, steps)

    with pytest.raises(RenderStopped) as stopped:  # as it is: not a RenderFailed
        renderer.render([request(steps=5), request(steps=5)], stop_after_two)
    assert (stopped.value.step, stopped.value.steps) == (2, 5)


def test_jpeg_drops_the_alpha_channel() -> None:
    data, _ = encode_image(Image.new("RGBA", (64, 64), (10, 20, 30, 128)), "jpeg")
    assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_unknown_output_format_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="png, jpeg, webp"):
        encode_image(Image.new("RGB", (64, 64)), "gif")
