"""`imagegen upload FILE --user U`: store an edit's input image or mask, print its key.

The key goes alone to stdout (`KEY=$(imagegen upload photo.png --user alice)`); notes go to
stderr. The key is named by the content, so uploading the same file again is harmless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.producers.uploads import upload as store_upload
from imagegen.schemas.uploads import MAX_UPLOAD_BYTES

notes = Console(stderr=True, soft_wrap=True, highlight=False)


def upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A PNG, JPEG or WebP file.")
    ],
    user: Annotated[str, typer.Option("--user", "-u", help="Whose upload it is.")],
) -> None:
    """Store an input image or mask under uploads/user=<U>/ and print its object key."""
    key = upload_file(load_settings(), user, file)
    typer.echo(key)
    notes.print(
        f"stored {escape(str(file))} as {escape(key)}: name it as `image` or `mask` of "
        f"{escape(user)}'s edits"
    )


def upload_file(settings: Settings, user_id: str, file: Path) -> str:
    """`file` stored as an upload of `user_id`; its key. Refuses files over the limit
    before reading them."""
    size = file.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise typer.BadParameter(
            f"{file} is {size:,} bytes, over the {MAX_UPLOAD_BYTES:,} an input may have",
            param_hint="FILE",
        )
    return store_upload(ObjectStore(settings), user_id, file.read_bytes())
