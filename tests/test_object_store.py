"""The object store against the real S3 server: a conditional write never replaces the first,
and the expiry rules leave an operator's own lifecycle rules alone."""

from __future__ import annotations

import uuid

import pytest
import urllib3

from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings, load_settings
from imagegen.schemas.errors import ObjectStoreUnavailable
from tests.helpers import free_port, s3_client


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


def test_expiry_rules_are_set_once_beside_the_operators_own(settings: Settings) -> None:
    own_bucket = settings.model_copy(update={"s3_bucket": f"test-{uuid.uuid4()}"})
    store = ObjectStore(own_bucket)
    store.ensure_bucket()
    operators_rule = {
        "ID": "thumbnails",
        "Status": "Enabled",
        "Filter": {"Prefix": "thumbnails/"},
        "Expiration": {"Days": 30},
    }
    s3 = s3_client(own_bucket)
    s3.put_bucket_lifecycle_configuration(
        Bucket=own_bucket.s3_bucket, LifecycleConfiguration={"Rules": [operators_rule]}
    )

    assert store.ensure_expiry(["jobs/", "users/"], 7) is True
    assert store.ensure_expiry(["jobs/", "users/"], 7) is False
    rules = s3.get_bucket_lifecycle_configuration(Bucket=own_bucket.s3_bucket)["Rules"]
    assert {(r["ID"], r["Filter"]["Prefix"], r["Expiration"]["Days"]) for r in rules} == {
        ("thumbnails", "thumbnails/", 30),
        ("imagegen-expire-jobs", "jobs/", 7),
        ("imagegen-expire-users", "users/", 7),
    }

    assert store.ensure_expiry(["jobs/", "users/"], 3) is True  # a new retention replaces ours
    rules = s3.get_bucket_lifecycle_configuration(Bucket=own_bucket.s3_bucket)["Rules"]
    assert sorted(r["Expiration"]["Days"] for r in rules) == [3, 3, 30]


def test_a_listing_pages_through_keys_in_order(store: ObjectStore) -> None:
    prefix = f"test/{uuid.uuid4()}/"
    keys = [f"{prefix}{i:02d}" for i in range(7)]
    for key in reversed(keys):
        store.put(key, b"", "application/octet-stream")
    assert store.list_keys(prefix, None, 3) == keys[:3]
    assert store.list_keys(prefix, keys[2], 3) == keys[3:6]
    assert store.list_keys(prefix, keys[5], 3) == keys[6:]
    assert store.list_keys(f"test/{uuid.uuid4()}/", None, 3) == []


def test_put_replaces_and_get_if_present_reads(store: ObjectStore) -> None:
    key = f"test/{uuid.uuid4()}.json"
    assert store.get_if_present(key) is None
    store.put(key, b"first", "application/json")
    store.put(key, b"second", "application/json")
    assert store.get_if_present(key) == b"second"
