"""The demo's edits: one of its generated images, uploaded as its user's input, then edited
(image-to-image) and inpainted (a circle in the middle repainted), for the contact sheet to
show beside it."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw

from imagegen.infra.object_store import ObjectStore
from imagegen.producers.uploads import upload
from imagegen.schemas import GenerationRequest, GenerationResult

EDIT_STRENGTH = 0.6


@dataclass(frozen=True)
class EditOf:
    """An edit request, and the generated image it starts from."""

    request: GenerationRequest
    source: GenerationResult


def edits_of(store: ObjectStore, source: GenerationResult, size: dict[str, int]) -> list[EditOf]:
    """An edit and an inpaint of `source`'s image (a succeeded result), its uploads stored."""
    assert source.object_key is not None  # a succeeded result's
    user_id = source.user_id
    image = upload(store, user_id, store.get(source.object_key))
    mask = upload(store, user_id, _circle_mask(size["width"], size["height"]))
    edit = GenerationRequest.new(
        user_id=user_id,
        prompt="the same, as a watercolour",
        task="edit",
        image=image,
        strength=EDIT_STRENGTH,
        **size,
    )
    inpaint = GenerationRequest.new(
        user_id=user_id, prompt="a full moon", task="inpaint", image=image, mask=mask, **size
    )
    return [EditOf(edit, source), EditOf(inpaint, source)]


def _circle_mask(width: int, height: int) -> bytes:
    """White (repainted) in a circle in the middle, black (kept) around it, as a PNG."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(
        (width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=255
    )
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()
