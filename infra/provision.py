"""Create the pipeline's topics and bucket wherever the settings point, idempotently, with
the bucket's expiry rules for the gateway's job store."""

from __future__ import annotations

from collections.abc import Callable

from imagegen.infra.kafka import check_broker, make_admin
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.infra.topics import ensure_topics

#: Where the gateway's job store (`imagegen.gateway.job_store`) keeps its documents: one
#: folder per job, and one marker per job under its user, for listing.
JOBS_PREFIX = "jobs/"
USERS_PREFIX = "users/"
#: The job store keeps a job as long as imagegen.results keeps the results it indexes.
JOB_RETENTION_DAYS = 7


def provision(settings: Settings, progress: Callable[[str], None] = print) -> None:
    check_broker(settings)
    created = ensure_topics(make_admin(settings), settings)
    progress(f"created topics {', '.join(created)}" if created else "topics already exist")
    store = ObjectStore(settings)
    if store.ensure_bucket():
        progress(f"created bucket {settings.s3_bucket}")
    else:
        progress(f"bucket {settings.s3_bucket} already exists")
    retention = f"{JOBS_PREFIX} and {USERS_PREFIX} expire after {JOB_RETENTION_DAYS} days"
    if store.ensure_expiry((JOBS_PREFIX, USERS_PREFIX), JOB_RETENTION_DAYS):
        progress(f"set the expiry rules of bucket {settings.s3_bucket}: {retention}")
    else:
        progress(f"expiry rules already set: {retention}")
