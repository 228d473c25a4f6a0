"""An edit's input image and mask: read from the object store and checked, before any device
time is spent on the request.

Each check that fails raises `InvalidInputImage`, answered `invalid_input_image`: the object
exists, is at most `MAX_UPLOAD_BYTES` (asked of the store before it is read), and its bytes
hash to the sha256 its key names; it decodes as PNG, JPEG or WebP; it is at most
`MAX_INPUT_SIDE` on each side, read from its header before any pixel is decoded, so a
decompression bomb is refused unopened; a mask has no transparent pixels (white means
repaint here, not transparent as in OpenAI's masks) and, once EXIF orientation is applied to
both, the image's size; and the render has a step to run at its strength. The image and mask
are then resized to the request's size, which the output has.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError

from imagegen.infra.object_store import ObjectStore
from imagegen.schemas import GenerationRequest
from imagegen.schemas.errors import ImagegenError
from imagegen.schemas.uploads import MAX_INPUT_SIDE, MAX_UPLOAD_BYTES

_FORMATS = ("PNG", "JPEG", "WEBP")


class InvalidInputImage(ImagegenError):
    """An edit's input image or mask cannot be used; the same request fails the same way."""


@dataclass(frozen=True)
class EditInputs:
    """An edit's inputs, ready for the pipeline: RGB, and an "L" mask, at the request's size."""

    image: Image.Image
    mask: Image.Image | None


def steps_run(request: GenerationRequest) -> int:
    """The denoising steps a render of `request` runs: diffusers' int(steps x strength)."""
    strength = request.edit_strength
    return request.steps if strength is None else int(request.steps * strength)


def load_inputs(
    store: ObjectStore,
    request: GenerationRequest,
    read: Callable[[Callable[[], bytes | None]], bytes | None] = lambda get: get(),
) -> EditInputs:
    """The checked inputs of an edit or inpaint. `read` runs each store read, so that the
    caller can retry it through an outage."""
    if request.image is None:
        raise ValueError(f"{request.request_id} is a {request.task} request, with no image")
    if steps_run(request) < 1:
        raise InvalidInputImage(
            f"strength {request.edit_strength} of {request.steps} steps runs "
            f"int({request.steps} x {request.edit_strength}) = 0 steps: raise the strength or "
            "the steps"
        )
    image = _opened("image", request.image, read(lambda: _bytes(store, request.image)))
    mask = None
    if request.mask is not None:
        mask = _opened("mask", request.mask, read(lambda: _bytes(store, request.mask)))
        _check_mask(mask, image.size)
    size = (request.width, request.height)
    return EditInputs(
        image=image.convert("RGB").resize(size, Image.Resampling.LANCZOS),
        mask=None if mask is None else mask.convert("L").resize(size, Image.Resampling.LANCZOS),
    )


def _bytes(store: ObjectStore, key: str | None) -> bytes | None:
    """The object's bytes, None when it is missing; too large ones are never read."""
    assert key is not None
    info = store.stat(key)
    if info is None:
        return None
    if info.size_bytes > MAX_UPLOAD_BYTES:
        raise InvalidInputImage(
            f"{key} is {info.size_bytes:,} bytes, over the {MAX_UPLOAD_BYTES:,} an input may "
            "have: upload a smaller file"
        )
    return store.get_if_present(key)


def _opened(role: str, key: str, data: bytes | None) -> Image.Image:
    """The decoded image at `key`, with its EXIF orientation applied."""
    if data is None:
        raise InvalidInputImage(
            f"the {role} {key} does not exist: upload it first (`imagegen upload FILE`)"
        )
    if hashlib.sha256(data).hexdigest() != PurePosixPath(key).stem:
        raise InvalidInputImage(
            f"the {role} {key} does not hold the content its name's sha256 says: upload the "
            "file again, under the key `imagegen upload` gives it"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its pixel limit: here any bomb is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
            _check_side(role, key, opened.size)
            opened.load()
            return ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InvalidInputImage(
            f"the {role} {key} claims far more pixels than the {MAX_INPUT_SIDE}x"
            f"{MAX_INPUT_SIDE} an input may have (a decompression bomb): it was not decoded"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInputImage(
            f"the {role} {key} is not a PNG, JPEG or WebP image: upload one of those"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a truncated or corrupt file
        raise InvalidInputImage(f"the {role} {key} cannot be decoded: {exc}") from None


def _check_side(role: str, key: str, size: tuple[int, int]) -> None:
    width, height = size
    if max(width, height) > MAX_INPUT_SIDE:
        raise InvalidInputImage(
            f"the {role} {key} is {width}x{height}, over the {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} "
            "an input may have: scale it down first"
        )


def _check_mask(mask: Image.Image, image_size: tuple[int, int]) -> None:
    if mask.size != image_size:
        raise InvalidInputImage(
            f"the mask is {mask.size[0]}x{mask.size[1]} and the image {image_size[0]}x"
            f"{image_size[1]}: give a mask of the image's size"
        )
    if mask.has_transparency_data:
        lowest, _highest = mask.convert("RGBA").getchannel("A").getextrema()
        if not isinstance(lowest, int) or lowest < 255:
            raise InvalidInputImage(
                "the mask has transparent pixels: here white marks what to repaint and black "
                "what to keep, not transparency as in OpenAI's masks. Convert such a mask "
                'with Pillow: ImageOps.invert(mask.getchannel("A"))'
            )
