"""The gateway's jobs, as documents in the object store beside the images.

No database: every gateway reads and writes the same bucket, and a lifecycle rule
(`infra.provision`) deletes a job 7 days after it was written, when imagegen.results
forgets its results too. Layout:

- `jobs/<shard>/<request_id>/job.json`: the `JobRecord`, written by the gateway once the
  intake decided (first write wins: a replayed submission finds the original);
- `jobs/<shard>/<request_id>/result.json`: the request's latest `GenerationResult`, exactly
  as on the wire, written by the indexer (`gateway.indexer`). The shard, two hex digits of
  the id's SHA-256, spreads the writes: ULIDs begin with the time, and S3 throttles a
  prefix that takes more than about 3,500 PUTs a second;
- `users/user=<user_id>/jobs/<inverted created ms>-<request_id>`: an empty marker per job.
  The inverted time (13 digits, 9999999999999 minus the milliseconds) makes a prefix
  listing newest first, and a page's cursor is its last marker's name after the prefix.

Request ids and cursors come from URLs: anything that is not a request id is answered as a
missing job before it comes near a key, and a cursor that is not one `list_jobs` could
have issued raises `InvalidCursor`. User ids come from API keys; their pattern
([A-Za-z0-9._@-]) holds no "/", so each is one key segment, and the `user=` before it
keeps the ids "." and ".." from being a segment of their own (which S3 clients refuse or
resolve away).

Every call blocks on the object store: the app runs them in threads. Errors are the object
store's: `ObjectStoreUnavailable` (retry later) and `ObjectStoreError`.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from pydantic import BaseModel, ConfigDict

from imagegen.infra.object_store import ObjectStore
from imagegen.infra.provision import JOBS_PREFIX, USERS_PREFIX
from imagegen.schemas import GenerationRequest, GenerationResult, Status, decode, encode
from imagegen.schemas.errors import ImagegenError, ObjectStoreError
from imagegen.schemas.fields import REQUEST_ID_PATTERN, USER_ID_PATTERN, Sha256, UtcDatetime

#: The most jobs one page of `list_jobs` holds.
MAX_PAGE = 100
_JSON = "application/json"
_TIME_DIGITS = 13
_LATEST_MS = 10**_TIME_DIGITS - 1  # the year 2286


class InvalidCursor(ImagegenError, ValueError):
    """A listing cursor that `list_jobs` did not issue: start again without one."""


class JobRecord(BaseModel):
    """A job as the gateway accepted it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    #: The request as it was published.
    request: GenerationRequest
    created_at: UtcDatetime
    #: The sha256 of the canonical submitted body: a replay with the same idempotency key
    #: and another body is a mismatch.
    body_sha256: Sha256


class JobStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def put_job(self, record: JobRecord) -> JobRecord:
        """Store `record`, unless its request id has a job already; return the stored one.

        job.json is written first, then the user's marker: a crash in between leaves a job
        that the next `put_job` of the same request id lists (it writes the marker of the
        job already stored, at the same key).
        """
        key = _job_key(record.request.request_id)
        marker = _marker_key(record)
        if not self._store.put_if_absent(key, encode(record), _JSON):
            stored = self.job(record.request.request_id)
            if stored is None:
                raise ObjectStoreError(
                    f"the object store refused to replace {key} and has nothing there: "
                    f"is something else deleting objects in bucket {self._store.bucket}?"
                )
            record, marker = stored, _marker_key(stored)
        self._store.put(marker, b"", "application/octet-stream")
        return record

    def job(self, request_id: str) -> JobRecord | None:
        """The job, or None when there is none or `request_id` is not a request id.

        Whose job it is, is for the caller to check (`request.user_id`).
        """
        if not _is_id(request_id):
            return None
        data = self._store.get_if_present(_job_key(request_id))
        return None if data is None else decode(JobRecord, data)

    def result(self, request_id: str) -> GenerationResult | None:
        """The job's latest result, or None (none yet, or not a request id)."""
        if not _is_id(request_id):
            return None
        data = self._store.get_if_present(_result_key(request_id))
        return None if data is None else decode(GenerationResult, data)

    def put_result(self, result: GenerationResult) -> None:
        """Store `result` as its request's latest, replacing the one before."""
        self._store.put(_result_key(result.request_id), encode(result), _JSON)

    def list_jobs(
        self, user_id: str, limit: int, cursor: str | None
    ) -> tuple[list[str], str | None]:
        """The request ids of up to `limit` (1 to `MAX_PAGE`) of the user's jobs, newest
        first, after `cursor` when given; and the cursor of the next page, or None when
        this page holds the last job.

        Raises `InvalidCursor` for a cursor that no earlier page returned.
        """
        if not USER_ID_PATTERN.search(user_id):
            raise ValueError(f"not a user id: {user_id!r}")
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE} (got {limit})")
        if cursor is not None and not _is_cursor(cursor):
            raise InvalidCursor(
                f"{cursor!r} is not a cursor of this listing: pass the next_cursor of the "
                "previous page, or none for the first page"
            )
        prefix = _markers_prefix(user_id)
        after = None if cursor is None else prefix + cursor
        # One key more than the page: whether there is a next page, without a LIST for it.
        names = [
            key.removeprefix(prefix) for key in self._store.list_keys(prefix, after, limit + 1)
        ]
        page = names[:limit]
        next_cursor = page[-1] if len(names) > limit else None
        return [name[_TIME_DIGITS + 1 :] for name in page], next_cursor

    def image_url(self, result: GenerationResult, ttl_s: int) -> str:
        """A URL that serves the result's image to whoever holds it, for `ttl_s` seconds."""
        if result.status is not Status.SUCCEEDED or result.object_key is None:
            raise ValueError(f"request {result.request_id} is {result.status}: it has no image")
        if result.bucket != self._store.bucket:
            raise ValueError(
                f"the image of {result.request_id} is in bucket {result.bucket}, and this "
                f"gateway's is {self._store.bucket}: point IMAGEGEN_S3_BUCKET at the bucket "
                "the workers write to"
            )
        return self._store.presigned_url(result.object_key, timedelta(seconds=ttl_s))


def _is_id(request_id: str) -> bool:
    return REQUEST_ID_PATTERN.search(request_id) is not None


def _is_cursor(cursor: str) -> bool:
    inverted_ms, dash, request_id = cursor.partition("-")
    return (
        len(inverted_ms) == _TIME_DIGITS
        and inverted_ms.isascii()
        and inverted_ms.isdigit()
        and dash == "-"
        and _is_id(request_id)
    )


def _job_key(request_id: str) -> str:
    return f"{_job_prefix(request_id)}job.json"


def _result_key(request_id: str) -> str:
    return f"{_job_prefix(request_id)}result.json"


def _job_prefix(request_id: str) -> str:
    shard = hashlib.sha256(request_id.encode()).hexdigest()[:2]
    return f"{JOBS_PREFIX}{shard}/{request_id}/"


def _markers_prefix(user_id: str) -> str:
    return f"{USERS_PREFIX}user={user_id}/jobs/"


def _marker_key(record: JobRecord) -> str:
    created_ms = int(record.created_at.timestamp() * 1000)
    inverted = _LATEST_MS - created_ms
    if not 0 <= inverted <= _LATEST_MS:
        raise ValueError(f"created_at {record.created_at} is outside 1970 to 2286")
    request = record.request
    return f"{_markers_prefix(request.user_id)}{inverted:0{_TIME_DIGITS}d}-{request.request_id}"
