"""`ApiKeyRecord`: one API key of the HTTP gateway, on the compacted `imagegen.api-keys`, keyed
by key_id, so that compaction keeps each key's latest record: its revocation, once it has one.

A key is the bearer token `igk_<key_id>_<secret>`: `key_id` is 12 random lowercase letters or
digits, public (listings and logs name keys by it); `secret` is 32 random bytes in unpadded
URL-safe base64 (43 characters). The topic holds only the SHA-256 of the whole token: whoever
reads it learns who has keys, never a key. 256 random bits make a plain hash enough; a slow
password hash would only slow down every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from typing import Annotated, Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field

from imagegen.schemas.codec import build
from imagegen.schemas.fields import (
    API_KEY_ID_PATTERN,
    LABEL_PATTERN,
    SCHEMA_VERSION,
    SchemaVersion,
    Sha256,
    UserId,
    UtcDatetime,
    utc_now,
)

TOKEN_PREFIX: Final = "igk_"
KEY_ID_LENGTH: Final = 12
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_BYTES = 32  # 43 characters of unpadded base64
#: A well-formed token, whole (`fullmatch`); group 1 is the key id.
TOKEN_PATTERN: Final = re.compile(r"igk_([a-z0-9]{12})_[A-Za-z0-9_-]{43}")

KeyId = Annotated[str, Field(pattern=API_KEY_ID_PATTERN)]
KeyName = Annotated[str, Field(min_length=1, max_length=100, pattern=LABEL_PATTERN)]


class ApiKeyRecord(BaseModel):
    """Version 1 of the wire contract. A key is live while `revoked_at` is None."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    key_id: KeyId
    user_id: UserId
    name: KeyName | None = None
    key_sha256: Sha256
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None = None

    @classmethod
    def new(cls, **fields: Any) -> Self:
        """A record with `created_at` filled in unless given; `InvalidMessage` names every
        bad field."""
        fields.setdefault("created_at", utc_now())
        return build(cls, fields)

    def revoked(self) -> Self:
        """This record, revoked now."""
        return build(type(self), {**dict(self), "revoked_at": utc_now()})

    @property
    def live(self) -> bool:
        return self.revoked_at is None

    @property
    def kafka_key(self) -> bytes:
        return self.key_id.encode()


def mint_key() -> str:
    """A new random token, `igk_<key_id>_<secret>`."""
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    return f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed token, or None for anything else."""
    match = TOKEN_PATTERN.fullmatch(token)
    return match.group(1) if match else None


def hash_key(token: str) -> str:
    """What the topic stores of a token: the SHA-256 of all of it, in lowercase hex."""
    return hashlib.sha256(token.encode()).hexdigest()
