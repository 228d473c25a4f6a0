"""Create the pipeline's topics and bucket wherever the settings point, idempotently."""

from __future__ import annotations

from collections.abc import Callable

from imagegen.infra.kafka import check_broker, make_admin
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics


def provision(settings: Settings, progress: Callable[[str], None] = print) -> None:
    check_broker(settings)
    created = ensure_topics(make_admin(settings), settings)
    progress(f"created topics {', '.join(created)}" if created else "topics already exist")
    store = ObjectStore(settings)
    if store.ensure_bucket():
        progress(f"created bucket {settings.s3_bucket}")
    else:
        progress(f"bucket {settings.s3_bucket} already exists")
