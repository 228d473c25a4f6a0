"""Input images for editing: where an upload's object lives, and what one may be.

An upload's key is `uploads/user=<user_id>/<sha256>.<format>`, from its owner and content,
so uploading the same file again names the same object. A request may name only its own
user's uploads (`foreign_inputs`); the processor refuses any other. The limits here are
checked where a file is uploaded and again, on the bytes themselves, by the worker.
"""

from __future__ import annotations

from typing import Final, Literal

from imagegen.schemas.fields import UPLOAD_KEY_PATTERN

ImageFormat = Literal["png", "jpeg", "webp"]
UPLOADS_PREFIX: Final = "uploads/"
#: The largest upload, in bytes.
MAX_UPLOAD_BYTES: Final = 20 * 1024 * 1024
#: The widest and tallest input image, in pixels.
MAX_INPUT_SIDE: Final = 2048
CONTENT_TYPES: Final[dict[ImageFormat, str]] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


def user_prefix(user_id: str) -> str:
    return f"{UPLOADS_PREFIX}user={user_id}/"


def upload_key(user_id: str, sha256: str, image_format: ImageFormat) -> str:
    """The object key of `user_id`'s upload whose content has this sha256 (lowercase hex)."""
    key = f"{user_prefix(user_id)}{sha256}.{image_format}"
    if not UPLOAD_KEY_PATTERN.search(key):
        raise ValueError(f"not an upload key: {key!r} (a bad user id or sha256)")
    return key


def sniff_format(head: bytes) -> ImageFormat | None:
    """The image format that a file's first 12 bytes announce, or None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def foreign_inputs(user_id: str, keys: list[str]) -> list[str]:
    """The keys that are not under `user_id`'s own uploads."""
    own = user_prefix(user_id)
    return [key for key in keys if not key.startswith(own)]
