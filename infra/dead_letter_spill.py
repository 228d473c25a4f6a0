"""Dead letters too large to send: their original goes to the object store, under `dlq/`.

A letter holds the failed record's key, value and headers plus its context, so a record near
the broker's size limit makes a letter over it. Such a letter (over `MAX_LETTER_BYTES`) has
its original packed into one object (`imagegen.schemas.dead_letters.pack_original`), and
the letter sent names that object in `dlq.original.object` instead. The context left is a
few dozen KiB at most, so the spilled letter always fits.

The object's name is the SHA-256 of its bytes: writing it again (a stage that dead-letters
the same record after a restart, or the same record sent twice) writes nothing new, and a
read checks the bytes against the name.
"""

from __future__ import annotations

import hashlib
import re

from imagegen.infra.object_store import ObjectStore
from imagegen.schemas import DeadLetter
from imagegen.schemas.dead_letters import pack_original
from imagegen.schemas.errors import InvalidMessage

#: The largest letter sent as it is. The producers refuse records over `message.max.bytes`
#: (librdkafka's default, and faust's `producer_max_request_size`, 1,000,000 bytes), and
#: the record and batch framing add a little: the margin covers that. A broker configured
#: for smaller records needs this lowered.
MAX_LETTER_BYTES = 900_000
PREFIX = "dlq/"
CONTENT_TYPE = "application/json"
_NAME = re.compile(re.escape(PREFIX) + r"[0-9a-f]{64}\.json")


def fits(letter: DeadLetter) -> bool:
    """Whether the letter can be sent as it is."""
    return letter.size_bytes() <= MAX_LETTER_BYTES


def spill(letter: DeadLetter, store: ObjectStore) -> DeadLetter:
    """Write the letter's original to the object store; return the letter naming it.

    Blocks on the object store; raises `ObjectStoreUnavailable` or `ObjectStoreError`
    when the write fails, and then nothing is lost: the caller has not sent the letter.
    """
    packed = pack_original(letter)
    key = _name(packed)
    store.put_if_absent(key, packed, CONTENT_TYPE)  # an existing object holds these bytes
    return letter.spilled(key)


def restore(letter: DeadLetter, store: ObjectStore) -> DeadLetter:
    """A spilled letter with its original read back; any other letter as it is.

    Raises `ObjectStoreError` when the object is gone, `InvalidMessage` when it is not the
    original that the letter names."""
    key = letter.original_object
    if key is None:
        return letter
    # The name is checked before anything is read: a letter names no object outside dlq/.
    if not _NAME.fullmatch(key):
        problem = f"{key!r} is not the name of a spilled original ({PREFIX}<sha256>.json)"
        raise InvalidMessage(problem, [("dlq.original.object", problem)])
    packed = store.get(key)
    if _name(packed) != key:
        problem = f"object {key} does not hold the bytes its name is the SHA-256 of"
        raise InvalidMessage(problem, [("dlq.original.object", problem)])
    return letter.restored(packed)


def _name(packed: bytes) -> str:
    return f"{PREFIX}{hashlib.sha256(packed).hexdigest()}.json"
