"""`imagegen keys create|list|revoke|webhook-secret`: the API keys of the HTTP gateway and
the users' webhook secrets, for operators.

`create` prints the new key alone on stdout, so that a script can capture it
(`KEY=$(imagegen keys create --user alice)`); it is shown this once, and only its hash is kept.
Listings show key ids, never a key or its hash. `webhook-secret` prints a user's webhook
signing secret alone on stdout the same way; unlike a key it can be shown again, since
signing needs the secret itself.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagegen.infra.kafka import check_broker
from imagegen.infra.key_book import KeyBook
from imagegen.infra.settings import load_settings
from imagegen.infra.webhook_secret_book import WebhookSecretBook
from imagegen.producers.api_keys import KeyRegistry, UnknownKey
from imagegen.producers.webhook_secrets import WebhookSecretRegistry
from imagegen.schemas.api_keys import ApiKeyRecord, key_id_of
from imagegen.schemas.fields import API_KEY_ID_PATTERN
from imagegen.schemas.topics import API_KEYS, WEBHOOK_SECRETS

console = Console(soft_wrap=True, highlight=False)
notes = Console(stderr=True, soft_wrap=True, highlight=False)
keys_app = typer.Typer(
    no_args_is_help=True,
    help=f"The HTTP gateway's API keys, on {API_KEYS}, and the users' webhook signing "
    f"secrets, on {WEBHOOK_SECRETS}. Writing those topics takes an operator's Kafka "
    "credentials.",
)


@keys_app.command("create")
def create(
    user: Annotated[str, typer.Option("--user", "-u", help="The user the key acts as.")],
    name: Annotated[
        str | None, typer.Option(help="A label to tell keys apart (at most 100 characters).")
    ] = None,
) -> None:
    """Make a key for a user and print it, alone, on stdout."""
    settings = load_settings()
    check_broker(settings)
    # The user's webhook secret first: the webhooks of the key's first job are signed, and a
    # failure here leaves no key made but never shown.
    with WebhookSecretBook(settings) as book:
        WebhookSecretRegistry(settings).current(user, book)
    token, record = KeyRegistry(settings).create(user, name)
    typer.echo(token)
    notes.print(
        f"API key {record.key_id} of {escape(record.user_id)}: shown this once and kept only "
        "as a hash, so store it now. Send it as `Authorization: Bearer <key>`. The user's "
        "webhooks are signed with their webhook secret: `imagegen keys webhook-secret --user "
        f"{escape(record.user_id)}` prints it."
    )


@keys_app.command("list")
def list_keys(
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the keys, oldest first, revoked ones too: id, user, name, created, revoked."""
    settings = load_settings()
    check_broker(settings)
    with KeyBook(settings) as book:
        records = [r for r in book.records() if user is None or r.user_id == user]
    if as_json:
        for record in records:
            typer.echo(json.dumps(_as_json(record)))
        return
    table = Table("key id", "user", "name", "created", "revoked")
    for record in records:
        table.add_row(
            record.key_id,
            escape(record.user_id),
            escape(record.name or "-"),
            f"{record.created_at:%Y-%m-%d %H:%M:%SZ}",
            "-" if record.revoked_at is None else f"{record.revoked_at:%Y-%m-%d %H:%M:%SZ}",
        )
    console.print(f"{API_KEYS}: {len(records)} key{'' if len(records) == 1 else 's'}")
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key: Annotated[
        str,
        typer.Argument(
            metavar="KEY_ID",
            help="The key id (`imagegen keys list`), or the key itself, if that is what you "
            "found lying around.",
        ),
    ],
) -> None:
    """Revoke a key: every gateway refuses it within about a second."""
    key_id = _key_id(key)
    settings = load_settings()
    check_broker(settings)
    try:
        record = KeyRegistry(settings).revoke(key_id)
    except UnknownKey as exc:
        notes.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(
        f"API key {record.key_id} of {escape(record.user_id)} is revoked "
        f"(since {record.revoked_at:%Y-%m-%d %H:%M:%SZ})"
    )


@keys_app.command("webhook-secret")
def webhook_secret(
    user: Annotated[str, typer.Option("--user", "-u", help="The user whose webhooks it signs.")],
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate",
            help="Make a new secret; the old one keeps signing beside it for 24 hours.",
        ),
    ] = False,
) -> None:
    """Print a user's webhook signing secret, alone, on stdout (made the first time)."""
    settings = load_settings()
    check_broker(settings)
    registry = WebhookSecretRegistry(settings)
    with WebhookSecretBook(settings) as book:
        record = registry.rotate(user, book) if rotate else registry.current(user, book)
    typer.echo(record.secret)
    if rotate and record.previous_expires_at is not None:
        grace = (
            "Deliveries are signed with it and with the previous secret until "
            f"{record.previous_expires_at:%Y-%m-%d %H:%M:%SZ}: give the receiver this one "
            "before then."
        )
    else:
        grace = (
            "`--rotate` makes a new one; the old one keeps being signed with for 24 hours, "
            "so the receiver can switch meanwhile."
        )
    notes.print(
        f"The webhook signing secret of {escape(record.user_id)} (on {WEBHOOK_SECRETS}): "
        "receivers check the `webhook-signature` of each delivery with it "
        f"(`imagegen.webhooks.verify`, Standard Webhooks). {grace}"
    )


def _key_id(text: str) -> str:
    """The key id `text` names: itself, or that of the token it is. Never echoes `text`,
    which may be a key."""
    if API_KEY_ID_PATTERN.search(text):
        return text
    key_id = key_id_of(text)
    if key_id is None:
        raise typer.BadParameter(
            "expected a key id (12 lowercase letters or digits, as `imagegen keys list` shows) "
            "or a key (igk_...)",
            param_hint="KEY_ID",
        )
    return key_id


#: What a listing shows of a record: never the hash.
_LISTED = {"key_id", "user_id", "name", "created_at", "revoked_at"}


def _as_json(record: ApiKeyRecord) -> dict[str, str | None]:
    return record.model_dump(mode="json", include=_LISTED)
