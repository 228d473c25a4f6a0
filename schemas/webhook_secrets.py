"""`WebhookSecretRecord`: the secret a user's webhooks are signed with, on the compacted
`imagegen.webhook-secrets`, keyed by user_id, so that compaction keeps each user's latest.

A secret is `whsec_` and the standard base64 of 32 random bytes, as Standard Webhooks
receivers expect (`imagegen.webhooks.signatures`). Unlike an API key's, the topic holds the
secret itself: signing needs it, not a hash. Whoever reads the topic can forge any user's
webhooks, so only operators and deliverers may.

Rotation keeps the old secret as `previous_secret` for `ROTATION_GRACE`: deliveries meanwhile
carry a signature for each, so a receiver still holding the old one keeps verifying until
it is given the new one.
"""

from __future__ import annotations

import base64
import re
import secrets
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from imagegen.schemas.codec import build
from imagegen.schemas.fields import (
    SCHEMA_VERSION,
    SchemaVersion,
    UserId,
    UtcDatetime,
    utc_now,
)

SECRET_PREFIX: Final = "whsec_"
_SECRET_BYTES = 32  # 44 characters of padded base64
#: A well-formed secret, whole (`fullmatch`).
SECRET_PATTERN: Final = re.compile(r"whsec_[A-Za-z0-9+/]{43}=")
ROTATION_GRACE: Final = timedelta(hours=24)


def _well_formed(value: str) -> str:
    if not SECRET_PATTERN.fullmatch(value):
        # Never echo the value: it may be a secret with one character wrong.
        raise ValueError("must be whsec_ and the standard base64 of 32 bytes (44 characters)")
    return value


# Checked by a validator, for a message that names no part of the value; the schema carries
# the pattern in the form of `schemas.fields`' patterns.
WebhookSecret = Annotated[
    str,
    Field(json_schema_extra={"pattern": rf"^(?:{SECRET_PATTERN.pattern})$(?!\n)"}),
    AfterValidator(_well_formed),
]


class WebhookSecretRecord(BaseModel):
    """Version 1 of the wire contract. `previous_secret` and `previous_expires_at` are set
    together, after a rotation, or not at all."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    user_id: UserId
    # repr=False: a record logged or printed by mistake shows no secret.
    secret: WebhookSecret = Field(repr=False)
    created_at: UtcDatetime
    previous_secret: WebhookSecret | None = Field(default=None, repr=False)
    previous_expires_at: UtcDatetime | None = None

    @model_validator(mode="after")
    def _previous_together(self) -> Self:
        if (self.previous_secret is None) != (self.previous_expires_at is None):
            raise ValueError("previous_secret and previous_expires_at go together, or neither")
        return self

    @classmethod
    def new(cls, **fields: Any) -> Self:
        """A record with a fresh secret and `created_at` filled in unless given;
        `InvalidMessage` names every bad field."""
        fields.setdefault("secret", mint_secret())
        fields.setdefault("created_at", utc_now())
        return build(cls, fields)

    def rotated(self, now: datetime | None = None) -> Self:
        """This user's record with a fresh secret; the current one is kept as the previous,
        signed with too until `ROTATION_GRACE` from `now`. A previous one still in its grace
        is dropped: only the two latest secrets sign."""
        now = now or utc_now()
        return build(
            type(self),
            {
                **dict(self),
                "secret": mint_secret(),
                "created_at": now,
                "previous_secret": self.secret,
                "previous_expires_at": now + ROTATION_GRACE,
            },
        )

    def signing_secrets(self, now: datetime | None = None) -> list[str]:
        """The secrets a delivery at `now` is signed with: the current one first, then the
        previous one while its grace lasts."""
        now = now or utc_now()
        if self.previous_secret is None or self.previous_expires_at is None:
            return [self.secret]
        if now >= self.previous_expires_at:
            return [self.secret]
        return [self.secret, self.previous_secret]

    @property
    def kafka_key(self) -> bytes:
        return self.user_id.encode()


def mint_secret() -> str:
    """A new random secret, `whsec_<base64 of 32 bytes>`."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()
