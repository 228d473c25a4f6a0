"""`POST /v1/images/edits`: an edit, or an inpaint, as multipart/form-data, the way OpenAI's
edits endpoint takes one: the file parts `image` and (for an inpaint) `mask`, and the
prompt and options as text parts.

The parts become the body of a generation with `task`, `image` and `mask` set, checked
whole by `submissions.parse_body` like a JSON one, before either file is stored; the files
are then stored as the caller's uploads (`producers.uploads`) and the job submitted as
`POST /v1/images/generations` submits it. `size` ("WxH", as OpenAI's) may stand for
`width` and `height`. The body limit of this route (`EDIT_BODY_LIMIT`) holds two inputs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from imagegen.gateway.services import Services, blocking
from imagegen.gateway.submissions import Loc, Submission, invalid, parse_body
from imagegen.producers.uploads import UploadRefused, upload_target
from imagegen.schemas.uploads import MAX_UPLOAD_BYTES

EDITS = "/v1/images/edits"
FILES = ("image", "mask")
#: Two inputs at their largest, and the text parts.
EDIT_BODY_LIMIT = 2 * MAX_UPLOAD_BYTES + 1024 * 1024
# Form parts are text: these are read as the numbers the request contract wants.
_NUMBERS: dict[str, type[int] | type[float]] = {
    "width": int,
    "height": int,
    "steps": int,
    "seed": int,
    "guidance_scale": float,
    "strength": float,
    "ttl_s": float,
}
_SIZE = re.compile(r"([0-9]{1,4})x([0-9]{1,4})")


async def edit_submission(
    request: Request, user_id: str, services: Services, idempotency_key: str | None
) -> Submission:
    """The checked submission a multipart body asks for, its inputs stored; raises the 422
    problem naming every bad part."""
    form = await request.form(max_files=len(FILES), max_fields=32)
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    errors: list[tuple[Loc, str]] = []
    for name, value in form.multi_items():
        if name in fields or name in files:
            errors.append((("body", name), "is given twice"))
        elif isinstance(value, UploadFile):
            if name in FILES:
                files[name] = await value.read()
            else:
                errors.append((("body", name), "is not a file field: only image and mask are"))
        elif name in FILES:
            errors.append((("body", name), "must be a file part"))
        else:
            fields[name] = _number(name, value)
    errors.extend(_size(fields))
    if "image" not in files:
        errors.append((("body", "image"), "is needed: the image to edit, as a file part"))
    targets = _targets(user_id, files, errors)
    if errors:
        raise invalid(errors)
    fields |= {name: key for name, (key, _type) in targets.items()}
    fields["task"] = "inpaint" if "mask" in targets else "edit"
    settings = services.settings
    submission = parse_body(
        json.dumps(fields).encode(),
        user_id,
        idempotency_key,
        settings.default_ttl_s,
        settings.webhook_allow_private,
    )
    for name, (key, content_type) in targets.items():
        await blocking(services.store.put_if_absent, key, files[name], content_type)
    return submission


def _number(name: str, text: str) -> object:
    """The part as the number its field takes; as it is when it is no number, for the
    request contract to name."""
    kind = _NUMBERS.get(name)
    if kind is None:
        return text
    try:
        return kind(text)
    except ValueError:
        return text


def _size(fields: dict[str, Any]) -> list[tuple[Loc, str]]:
    """`size` ("WxH") read into width and height."""
    size = fields.pop("size", None)
    if size is None:
        return []
    if "width" in fields or "height" in fields:
        return [(("body", "size"), "give size or width and height, not both")]
    matched = _SIZE.fullmatch(str(size))
    if matched is None:
        return [(("body", "size"), f"must be WIDTHxHEIGHT, like 512x512 (got {size!r})")]
    fields["width"], fields["height"] = (int(side) for side in matched.groups())
    return []


def _targets(
    user_id: str, files: dict[str, bytes], errors: list[tuple[Loc, str]]
) -> dict[str, tuple[str, str]]:
    """Each file's upload key and content type, or its error."""
    targets = {}
    for name, data in files.items():
        try:
            targets[name] = upload_target(user_id, data)
        except UploadRefused as refused:
            errors.append((("body", name), str(refused)))
    return targets
