"""The object store (MinIO, or any S3) holding rendered images, and the gateway's job store.

Image writes are conditional: `put_if_absent` sends `If-None-Match: *`, so a retried or
duplicated render can never create a second object or replace the first. minio-py's
`put_object` cannot send that header (it turns unknown headers into `x-amz-meta-*`
metadata), so the write goes through a presigned PUT URL, which minio-py signs with its
public API, sent with urllib3. Documents that a later write should replace (the job store's
latest result) go through `put`.

`ensure_expiry` sets the bucket's lifecycle rules that delete what the job store keeps once
it is older than its retention.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from urllib3.exceptions import HTTPError

from imagegen.infra.settings import Settings
from imagegen.schemas.errors import ObjectStoreError, ObjectStoreUnavailable

_PUT_URL_TTL = timedelta(minutes=5)
#: S3 answers a listing with at most this many keys.
MAX_LIST_KEYS = 1000


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int
    content_type: str
    etag: str
    last_modified: datetime | None


class ObjectStore:
    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.bucket = settings.s3_bucket
        self.endpoint = settings.s3_endpoint
        # No automatic retries: whoever calls decides how to retry (the render worker backs
        # off with jitter), and a dead endpoint fails fast instead of hanging a CLI.
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s),
            retries=False,
            maxsize=16,
        )
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=self._http,
        )

    def ensure_bucket(self) -> bool:
        """Create the bucket unless it exists; return whether it was created."""
        with _errors_translated(self.endpoint, "create bucket"):
            if self._client.bucket_exists(self.bucket):
                return False
            self._client.make_bucket(self.bucket)
            return True

    def put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        """Write `data` at `key` unless an object is there already.

        Returns True when this call created the object, False when one existed (the existing
        object is left untouched).
        """
        with _errors_translated(self.endpoint, f"write {key}"):
            url = self._client.presigned_put_object(self.bucket, key, expires=_PUT_URL_TTL)
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            response = self._http.request(
                "PUT",
                url,
                body=data,
                headers={
                    "If-None-Match": "*",
                    "Content-MD5": md5,
                    "Content-Type": content_type,
                },
            )
        if response.status in (200, 201):
            return True
        if response.status == 412:
            return False
        detail = response.data[:500].decode(errors="replace")
        # 409 is S3's "a concurrent conditional write is in flight": the next try settles it.
        if response.status == 409 or response.status >= 500:
            raise ObjectStoreUnavailable(
                f"object store at {self.endpoint} answered {response.status} writing {key}: "
                f"{detail}"
            )
        raise ObjectStoreError(
            f"object store at {self.endpoint} refused to write {key} "
            f"(HTTP {response.status}): {detail}"
        )

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write `data` at `key`, replacing any object there."""
        with _errors_translated(self.endpoint, f"write {key}"):
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )

    def stat(self, key: str) -> StoredObject | None:
        """The object's metadata, or None when there is no object at `key`."""
        with _errors_translated(self.endpoint, f"look up {key}"):
            try:
                info = self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    return None
                raise
        return StoredObject(
            key=key,
            size_bytes=info.size or 0,
            content_type=info.content_type or "application/octet-stream",
            etag=info.etag or "",
            last_modified=info.last_modified,
        )

    def get(self, key: str) -> bytes:
        with _errors_translated(self.endpoint, f"read {key}"):
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_if_present(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no object at `key`."""
        with _errors_translated(self.endpoint, f"read {key}"):
            try:
                response = self._client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def list_keys(self, prefix: str, start_after: str | None, limit: int) -> list[str]:
        """Up to `limit` (at most `MAX_LIST_KEYS`) keys under `prefix` that sort after
        `start_after`, in key order: one LIST request.

        minio-py's public `list_objects` asks for pages of 1,000 keys whatever the caller
        needs; `_list_objects`, which it wraps, takes the page size, so a page of 21 keys
        costs 21 keys' worth of XML, not 1,000 (minio is pinned below 8 in pyproject.toml).
        Taking no more than one page's keys, the generator never asks for a second page.
        """
        if not 1 <= limit <= MAX_LIST_KEYS:
            raise ValueError(f"limit must be 1 to {MAX_LIST_KEYS} (got {limit})")
        with _errors_translated(self.endpoint, f"list {prefix}"):
            objects = self._client._list_objects(
                self.bucket, prefix=prefix, start_after=start_after, max_keys=limit
            )
            page = itertools.islice(objects, limit)
            return [obj.object_name for obj in page if obj.object_name is not None]

    def presigned_url(self, key: str, expires: timedelta = timedelta(hours=1)) -> str:
        """A URL anyone holding it can GET the object from, until it expires."""
        return self._client.presigned_get_object(self.bucket, key, expires=expires)

    def presigned_put_url(self, key: str, expires: timedelta) -> str:
        """A URL anyone holding it can PUT an object at `key` with, until it expires."""
        return self._client.presigned_put_object(self.bucket, key, expires=expires)

    def check(self) -> None:
        """Raise `ObjectStoreUnavailable` (with what to do) unless the store answers."""
        with _errors_translated(self.endpoint, "reach the object store"):
            self._client.list_buckets()

    def bucket_exists(self) -> bool:
        with _errors_translated(self.endpoint, f"look up bucket {self.bucket}"):
            return self._client.bucket_exists(self.bucket)

    def ensure_expiry(self, prefixes: Sequence[str], days: int) -> bool:
        """Have the bucket delete objects under each of `prefixes` `days` after they were
        written; return whether the lifecycle rules changed.

        One rule per prefix, named `imagegen-expire-<prefix>`. A bucket's lifecycle rules
        are one document: the bucket's other rules (an operator's own) are kept as they are.
        """
        wanted = [
            Rule(
                ENABLED,
                rule_filter=Filter(prefix=prefix),
                rule_id=f"imagegen-expire-{prefix.strip('/')}",
                expiration=Expiration(days=days),
            )
            for prefix in prefixes
        ]
        action = f"set the lifecycle rules of bucket {self.bucket}"
        with _errors_translated(self.endpoint, action):
            current = self._client.get_bucket_lifecycle(self.bucket)
            rules = [] if current is None else current.rules
            if all(rule in rules for rule in wanted):
                return False
            ours = {rule.rule_id for rule in wanted}
            kept = [rule for rule in rules if rule.rule_id not in ours]
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig([*kept, *wanted]))
            return True


@contextmanager
def _errors_translated(endpoint: str, action: str) -> Iterator[None]:
    """Turn minio and urllib3 exceptions into the project's transient and permanent errors."""
    try:
        yield
    except HTTPError as exc:
        raise ObjectStoreUnavailable(
            f"could not {action}: no object store answered at {endpoint} ({exc}). Start the "
            "embedded one with `imagegen stack up`, or point IMAGEGEN_S3_ENDPOINT at your "
            "MinIO or S3."
        ) from exc
    except S3Error as exc:
        transient = exc.response is not None and exc.response.status >= 500
        error = ObjectStoreUnavailable if transient else ObjectStoreError
        raise error(f"could not {action} at {endpoint}: {exc}") from exc
    except MinioException as exc:
        # Something answered that is not S3: a proxy's error page while the store restarts,
        # or another service on the port. Worth retrying, and worth naming the endpoint.
        raise ObjectStoreUnavailable(
            f"could not {action}: the server at {endpoint} did not answer like S3 ({exc}). "
            "Check that IMAGEGEN_S3_ENDPOINT points at your MinIO or S3."
        ) from exc
