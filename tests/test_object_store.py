"""Conditional writes against the real S3 server: a second write never replaces the first."""

from __future__ import annotations

import uuid

import pytest
import urllib3

from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.schemas.errors import ObjectStoreUnavailable
from tests.helpers import free_port


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings)


def test_second_conditional_write_is_refused_and_first_object_stays(store: ObjectStore) -> None:
    key = f"test/{uuid.uuid4()}.png"
    assert store.put_if_absent(key, b"first render", "image/png") is True
    assert store.put_if_absent(key, b"second render", "image/png") is False
    assert store.get(key) == b"first render"
    stored = store.stat(key)
    assert stored is not None
    assert (stored.size_bytes, stored.content_type) == (len(b"first render"), "image/png")


def test_stat_of_a_missing_object_is_none(store: ObjectStore) -> None:
    assert store.stat(f"test/{uuid.uuid4()}.png") is None


def test_presigned_url_serves_the_object(store: ObjectStore) -> None:
    key = f"test/{uuid.uuid4()}.webp"
    store.put_if_absent(key, b"pixels", "image/webp")
    response = urllib3.request("GET", store.presigned_url(key))
    assert (response.status, response.data) == (200, b"pixels")


def test_ensure_bucket_is_idempotent(store: ObjectStore) -> None:
    assert store.ensure_bucket() is False  # the session fixture created it


def test_an_unreachable_store_is_transient_and_says_what_to_do() -> None:
    store = ObjectStore(load_settings(s3_endpoint=f"127.0.0.1:{free_port()}"), timeout_s=1)
    with pytest.raises(ObjectStoreUnavailable, match="IMAGEGEN_S3_ENDPOINT") as caught:
        store.put_if_absent("k", b"v", "image/png")
    assert caught.value.transient
