"""Where a request's image lives in the object store, and writing it exactly once.

The key comes from the request alone, never from the image, so every attempt at a request
aims at the same object, and the conditional put lets only the first one land.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from imagegen.infra.object_store import ObjectStore
from imagegen.schemas import GenerationRequest
from imagegen.schemas.errors import ObjectStoreError

_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def object_key(request: GenerationRequest) -> str:
    """`images/user=<user_id>/<request_id>.<ext>`.

    user_id has no "/" (its pattern forbids it) and request_id is a UUID or ULID, so the
    key has exactly these segments. The `user=` prefix keeps a user id such as ".." from
    ever being a path segment of its own.
    """
    extension = _EXTENSIONS[request.output_format]
    return f"images/user={request.user_id}/{request.request_id}.{extension}"


@dataclass(frozen=True)
class StoredImage:
    key: str
    size_bytes: int
    sha256: str
    content_type: str
    created: bool  # False when an earlier attempt had stored it already


def store_once(store: ObjectStore, key: str, data: bytes, content_type: str) -> StoredImage:
    """Write `data` at `key` unless an object is there; describe what is stored at `key`."""
    if store.put_if_absent(key, data, content_type):
        return StoredImage(key, len(data), hashlib.sha256(data).hexdigest(), content_type, True)
    existing = find(store, key)
    if existing is None:
        raise ObjectStoreError(f"{key} was reported present but cannot be read back")
    return existing


def find(store: ObjectStore, key: str) -> StoredImage | None:
    """The stored image at `key`, or None. Reads it back to hash it: its bytes, not ours,
    are what the result must describe."""
    info = store.stat(key)
    if info is None:
        return None
    data = store.get(key)
    return StoredImage(key, len(data), hashlib.sha256(data).hexdigest(), info.content_type, False)
