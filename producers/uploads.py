"""Uploading an edit's input image or mask: `upload` stores a file under its user's
`uploads/` prefix, named by the sha256 of its content, so the same file uploaded again is
the same object (`imagegen.schemas.uploads`)."""

from __future__ import annotations

import hashlib

from imagegen.infra.object_store import ObjectStore
from imagegen.schemas.errors import ImagegenError
from imagegen.schemas.uploads import CONTENT_TYPES, MAX_UPLOAD_BYTES, sniff_format, upload_key


class UploadRefused(ImagegenError):
    """A file that cannot be an edit's input: not PNG, JPEG or WebP, or too large."""


def upload(store: ObjectStore, user_id: str, data: bytes) -> str:
    """Store `data` as an upload of `user_id` unless it is there already; its object key.

    The worker checks the image itself (that it decodes, its size); this refuses only what
    can be told without decoding it. `UploadRefused` says which rule it broke.
    """
    key, content_type = upload_target(user_id, data)
    # A conditional put: a second upload of the same content leaves the first object.
    store.put_if_absent(key, data, content_type)
    return key


def upload_target(user_id: str, data: bytes) -> tuple[str, str]:
    """The key and content type `upload` stores `data` at; `UploadRefused` as it says."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadRefused(
            f"the file is {len(data):,} bytes, over the {MAX_UPLOAD_BYTES:,} an input may "
            "have: scale it down or save it as JPEG or WebP"
        )
    image_format = sniff_format(data[:12])
    if image_format is None:
        raise UploadRefused("the file is not a PNG, JPEG or WebP image: convert it to one")
    try:
        key = upload_key(user_id, hashlib.sha256(data).hexdigest(), image_format)
    except ValueError:
        raise UploadRefused(
            f"{user_id!r} is not a user id: 1-128 letters, digits, '.', '_', '@' or '-'"
        ) from None
    return key, CONTENT_TYPES[image_format]
