"""The checks of `imagegen.consumers.inputs` alone, on a store held in memory (the real
store is in tests/test_edits_worker.py): orientation, masks, sizes, and what is never read."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import UTC, datetime
from typing import cast

import pytest
from PIL import Image

from imagegen.consumers.inputs import EditInputs, InvalidInputImage, load_inputs, steps_run
from imagegen.infra.object_store import ObjectStore, StoredObject
from imagegen.schemas import GenerationRequest
from imagegen.schemas.uploads import MAX_UPLOAD_BYTES, upload_key


class MemoryStore:
    """The two reads `load_inputs` makes, on a dict; counts the object reads."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}  # what stat says, when not the bytes' length
        self.reads = 0

    def add(self, data: bytes, image_format: str = "png") -> str:
        key = upload_key("ann", hashlib.sha256(data).hexdigest(), image_format)  # type: ignore[arg-type]
        self.objects[key] = data
        return key

    def stat(self, key: str) -> StoredObject | None:
        if key not in self.objects:
            return None
        size = self.sizes.get(key, len(self.objects[key]))
        return StoredObject(key, size, "image/png", "etag", datetime.now(UTC))

    def get_if_present(self, key: str) -> bytes | None:
        self.reads += 1
        return self.objects.get(key)


def encoded(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def edit(image: str, mask: str | None = None, **fields: object) -> GenerationRequest:
    task = {"task": "inpaint", "mask": mask} if mask else {"task": "edit"}
    values = {"width": 64, "height": 64, "steps": 4, **task, **fields}
    return GenerationRequest.new(user_id="ann", prompt="a boat", image=image, **values)


def loaded(store: MemoryStore, request: GenerationRequest) -> EditInputs:
    return load_inputs(cast(ObjectStore, store), request)


def test_exif_orientation_is_applied_before_the_mask_is_compared() -> None:
    store = MemoryStore()
    wide = Image.new("RGB", (64, 32), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view: a 64x32 JPEG shown 32x64
    image = store.add(encoded(wide, "JPEG", exif=exif), "jpeg")
    upright_mask = store.add(encoded(Image.new("L", (32, 64), 255)))
    inputs = loaded(store, edit(image, upright_mask))
    assert inputs.image.size == inputs.mask.size == (64, 64)  # resized to the request's
    assert (inputs.image.mode, inputs.mask.mode) == ("RGB", "L")
    sideways_mask = store.add(encoded(Image.new("L", (64, 32), 255)))
    with pytest.raises(InvalidInputImage, match="the mask is 64x32 and the image 32x64"):
        loaded(store, edit(image, sideways_mask))


def test_a_mask_with_transparency_is_refused_saying_how_to_convert_it() -> None:
    store = MemoryStore()
    image = store.add(encoded(Image.new("RGB", (64, 64))))
    openai_style = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    openai_style.paste((0, 0, 0, 0), (16, 16, 48, 48))
    mask = store.add(encoded(openai_style))
    with pytest.raises(InvalidInputImage, match=re.escape('ImageOps.invert(mask.getchannel("A"))')):
        loaded(store, edit(image, mask))
    opaque = store.add(encoded(Image.new("RGBA", (64, 64), (255, 255, 255, 255))))
    assert loaded(store, edit(image, opaque)).mask is not None


def test_an_object_over_the_limit_is_refused_without_being_read() -> None:
    store = MemoryStore()
    image = store.add(encoded(Image.new("RGB", (64, 64))))
    store.sizes[image] = MAX_UPLOAD_BYTES + 1
    with pytest.raises(InvalidInputImage, match="upload a smaller file"):
        loaded(store, edit(image))
    assert store.reads == 0


def test_an_image_over_2048_a_side_is_refused_from_its_header() -> None:
    store = MemoryStore()
    image = store.add(encoded(Image.new("1", (2056, 8))))
    with pytest.raises(InvalidInputImage, match="is 2056x8, over the 2048x2048"):
        loaded(store, edit(image))


def test_a_gif_is_not_an_input() -> None:
    store = MemoryStore()
    image = store.add(encoded(Image.new("RGB", (8, 8)), "GIF"))
    with pytest.raises(InvalidInputImage, match="not a PNG, JPEG or WebP image"):
        loaded(store, edit(image))


def test_a_truncated_file_is_named() -> None:
    store = MemoryStore()
    whole = encoded(Image.effect_noise((64, 64), 50).convert("RGB"))
    image = store.add(whole[: len(whole) // 2])
    with pytest.raises(InvalidInputImage, match="cannot be decoded"):
        loaded(store, edit(image))


@pytest.mark.parametrize(
    ("steps", "strength", "run"), [(4, None, 3), (4, 0.25, 1), (10, 1.0, 10), (3, 0.3, 0)]
)
def test_an_edit_runs_steps_times_strength(steps: int, strength: float | None, run: int) -> None:
    fields = {} if strength is None else {"strength": strength}
    assert steps_run(edit(upload_key("ann", "0" * 64, "png"), steps=steps, **fields)) == run


def test_a_generation_runs_all_its_steps() -> None:
    assert steps_run(GenerationRequest.new(user_id="ann", prompt="a", steps=7)) == 7
