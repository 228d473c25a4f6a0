"""`POST /v1/uploads`: a presigned PUT for an edit's input, for files too large to send
through the gateway, or sent straight from a browser.

The caller names the file by its sha256, format and size; the answer is a URL that PUTs it
at `uploads/user=<the key's user>/<sha256>.<format>` for `IMAGEGEN_GATEWAY_URL_TTL_S`. The
store cannot check a presigned PUT's content, so the worker does when it reads the object:
bytes whose sha256 is not the key's, or that are not such an image, fail the edit
(`invalid_input_image`), and they can only ever be the caller's own.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen.gateway.services import Services, blocking
from imagegen.schemas.fields import Sha256, utc_now
from imagegen.schemas.uploads import CONTENT_TYPES, MAX_UPLOAD_BYTES, ImageFormat, upload_key


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: Sha256 = Field(description="Of the file's bytes, 64 lowercase hex digits.")
    format: ImageFormat
    size_bytes: int = Field(ge=1, le=MAX_UPLOAD_BYTES)


class UploadTicket(BaseModel):
    key: str = Field(description="Name it as `image` or `mask` of an edit.")
    url: str
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str]
    expires_at: datetime


async def ticket(services: Services, user_id: str, body: UploadBody) -> UploadTicket:
    key = upload_key(user_id, body.sha256, body.format)
    ttl = timedelta(seconds=services.settings.gateway_url_ttl_s)
    url = await blocking(services.store.presigned_put_url, key, ttl)
    return UploadTicket(
        key=key,
        url=url,
        headers={"Content-Type": CONTENT_TYPES[body.format]},
        expires_at=utc_now() + ttl,
    )
