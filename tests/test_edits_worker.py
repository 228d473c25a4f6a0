"""Edits and inpaints through a real worker process with the `tiny` model, against a real
broker and S3 server: what they render, seeds alone and in a batch, and every kind of bad
input answered `invalid_input_image` while the requests behind it render."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
from PIL import Image

from imagegen.consumers.storage import object_key
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.producers.uploads import upload
from imagegen.schemas import DeadLetter, GenerationRequest, Reason, Stage, Status
from imagegen.schemas.topics import DLQ
from imagegen.schemas.uploads import upload_key
from tests import test_worker
from tests.helpers import read_topic, results_for
from tests.test_rendering import BATCH_TOLERANCE
from tests.test_worker import SMALL, submit

worker_factory = test_worker.worker_factory  # the fixture, shared

TIMEOUT_S = 180


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(width: int = 64, height: int = 64) -> bytes:
    gradient = Image.linear_gradient("L").resize((width, height))
    return png(Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))))


def circle_mask(width: int = 64, height: int = 64) -> bytes:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width * 3 // 4, height * 3 // 4))
    return png(mask)


def bomb_png(side: int = 30_000) -> bytes:
    """A 1-bit PNG whose header claims side x side pixels, all zero: about 100 KB that
    would decode to side^2 pixels."""
    row = b"\x00" + bytes(-(-side // 8))  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def put_raw(stack: Settings, user_id: str, data: bytes, image_format: str = "png") -> str:
    """Store bytes at the upload key their content names, as a client with a presigned PUT
    could, whatever they are."""
    key = upload_key(user_id, hashlib.sha256(data).hexdigest(), image_format)  # type: ignore[arg-type]
    ObjectStore(stack).put(key, data, "image/png")
    return key


def edit(user_id: str, image: str, **fields: object) -> GenerationRequest:
    values = {"prompt": "the same, at night", "task": "edit", "image": image, **SMALL}
    return GenerationRequest.new(user_id=user_id, **{**values, **fields})


def test_an_edit_and_an_inpaint_render_at_the_requested_size_and_say_what_they_used(
    worker_factory, isolated_stack
) -> None:
    store = ObjectStore(isolated_stack)
    image = upload(store, "ann", photo(96, 80))  # another size: resized to the request's
    mask = upload(store, "ann", circle_mask(96, 80))
    edited = edit("ann", image, strength=0.5, steps=4)
    inpainted = GenerationRequest.new(
        user_id="ann",
        prompt="a full moon",
        task="inpaint",
        image=image,
        mask=mask,
        **SMALL,
    )
    worker_factory()
    submit(isolated_stack, [edited, inpainted])
    found = results_for(isolated_stack, {edited.request_id, inpainted.request_id}, TIMEOUT_S)

    (edit_result,) = found[edited.request_id]
    assert edit_result.status is Status.SUCCEEDED, edit_result.detail
    assert (edit_result.task, edit_result.image, edit_result.mask) == ("edit", image, None)
    assert edit_result.strength == 0.5
    (inpaint_result,) = found[inpainted.request_id]
    assert inpaint_result.status is Status.SUCCEEDED, inpaint_result.detail
    assert (inpaint_result.task, inpaint_result.mask, inpaint_result.strength) == (
        "inpaint",
        mask,
        0.8,
    )
    for request in (edited, inpainted):
        stored = Image.open(io.BytesIO(store.get(object_key(request))))
        assert stored.size == (64, 64)


def test_the_same_seed_gives_the_same_edit_alone_and_in_a_batch(
    worker_factory, isolated_stack
) -> None:
    image = upload(ObjectStore(isolated_stack), "bob", photo())
    alone = edit("bob", image, seed=11, strength=1.0)
    submit(isolated_stack, [alone])
    first = worker_factory("--max-batch", "1")
    results_for(isolated_stack, {alone.request_id}, TIMEOUT_S)
    first.stop()
    batch = [edit("bob", image, seed=seed, strength=1.0) for seed in (11, 12, 13)]
    submit(isolated_stack, batch)  # all waiting before the next worker starts
    worker_factory("--max-batch", "4", "--max-wait-ms", "3000")
    found = results_for(isolated_stack, {r.request_id for r in batch}, TIMEOUT_S)

    assert {found[r.request_id][0].batch_size for r in batch} == {3}
    store = ObjectStore(isolated_stack)

    def pixels(request: GenerationRequest) -> np.ndarray:
        data = store.get(object_key(request))
        return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)

    assert np.abs(pixels(alone) - pixels(batch[0])).max() <= BATCH_TOLERANCE
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 1  # a seed of its own each


def test_bad_inputs_are_answered_invalid_input_image_and_the_requests_behind_render(
    worker_factory, isolated_stack
) -> None:
    store = ObjectStore(isolated_stack)
    good_image = upload(store, "cy", photo())
    bad = {
        "does not exist": edit("cy", upload_key("cy", "0" * 64, "png")),
        "is not a PNG, JPEG or WebP image": edit("cy", put_raw(isolated_stack, "cy", b"hello")),
        "decompression bomb": edit("cy", upload(store, "cy", bomb_png())),
        "give a mask of the image's size": GenerationRequest.new(
            user_id="cy",
            prompt="a moon",
            task="inpaint",
            image=good_image,
            mask=upload(store, "cy", circle_mask(32, 32)),
            **SMALL,
        ),
        "raise the strength or the steps": edit("cy", good_image, strength=0.4),  # 2 x 0.4
        "not hold the content its name's sha256 says": edit("cy", _misnamed(store, "cy", photo())),
    }
    behind = edit("cy", good_image)
    worker_factory()
    submit(isolated_stack, [*bad.values(), behind])
    found = results_for(isolated_stack, {r.request_id for r in [*bad.values(), behind]}, TIMEOUT_S)

    for fragment, request in bad.items():
        (result,) = found[request.request_id]
        assert (result.status, result.reason) == (Status.FAILED, Reason.INVALID_INPUT_IMAGE)
        assert fragment in (result.detail or ""), result.detail
        assert result.task == request.task
    assert found[behind.request_id][0].status is Status.SUCCEEDED
    letters = read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= len(bad), TIMEOUT_S)
    stages = {DeadLetter.from_kafka(m.key(), m.value(), m.headers()).stage for m in letters}
    assert stages == {Stage.VALIDATE}


def _misnamed(store: ObjectStore, user_id: str, data: bytes) -> str:
    """`data` stored under the key of other content: a PUT to another file's presigned URL."""
    key = upload_key(user_id, hashlib.sha256(b"other content").hexdigest(), "png")
    store.put(key, data, "image/png")
    return key
