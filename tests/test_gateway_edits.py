"""Edits through the gateway, against a real gateway, processor and `tiny` worker on the
embedded stack: the multipart edits route as OpenAI's takes one, presigned uploads, and the
JSON route naming uploads, the caller's own only."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import httpx
import pytest

from imagegen.client import Client
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.schemas.uploads import upload_key
from tests import test_gateway
from tests.conftest import _embedded_stack as embedded_stack
from tests.gateway_process import GatewayProcess, api_key
from tests.test_edits_worker import circle_mask, photo
from tests.test_gateway import WAIT_S, _eventually, assert_problem, user

gateway_process = test_gateway.gateway_process  # the fixture, shared

SMALL = {"steps": "2", "size": "64x64"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A stack of this module's own: on the session's, the worker would first render what
    earlier modules left in imagegen.render."""
    if (
        os.environ.get("IMAGEGEN_TEST_STACK") == "docker"
        or "IMAGEGEN_KAFKA_BOOTSTRAP" in os.environ
    ):
        pytest.skip("needs the embedded stack to start a private broker")
    yield from embedded_stack(tmp_path_factory.mktemp("edits-stack"))


def live_key(settings: Settings, gateway: GatewayProcess, user_id: str) -> str:
    """A new key of `user_id`, once the gateway's key book knows it."""
    token = api_key(settings, user_id)
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}) as http:
        assert _eventually(lambda: http.get("/v1/images/jobs").status_code == 200)
    return token


def uploads_of(settings: Settings, user_id: str) -> list[str]:
    return ObjectStore(settings).list_keys(f"uploads/user={user_id}/", None, 100)


def test_a_multipart_edit_and_inpaint_render_and_store_their_inputs_as_uploads(
    gateway_process: GatewayProcess, settings: Settings
) -> None:
    someone = user()
    key = live_key(settings, gateway_process, someone)
    files = {"image": ("photo.png", photo(), "image/png")}
    with httpx.Client(base_url=gateway_process.url, timeout=WAIT_S) as http:
        headers = {"Authorization": f"Bearer {key}"}
        edit = http.post(
            "/v1/images/edits",
            headers=headers,
            data={"prompt": "the same, at night", "strength": "0.5", **SMALL},
            files=files,
        )
        inpaint = http.post(
            "/v1/images/edits",
            headers=headers,
            data={"prompt": "a full moon", **SMALL},
            files={**files, "mask": ("mask.png", circle_mask(), "image/png")},
        )
    assert edit.status_code == 202, edit.text
    assert inpaint.status_code == 202, inpaint.text
    asked = edit.json()["request"]
    assert (asked["task"], asked["strength"], asked["width"]) == ("edit", 0.5, 64)
    assert asked["image"] == upload_key(someone, hashlib.sha256(photo()).hexdigest(), "png")
    assert inpaint.json()["request"]["task"] == "inpaint"
    assert len(uploads_of(settings, someone)) == 2  # the photo once, and the mask

    with Client(gateway_process.url, api_key=key, timeout_s=WAIT_S) as client:
        for job_id in (edit.json()["id"], inpaint.json()["id"]):
            assert client.wait(job_id, timeout_s=WAIT_S).status == "succeeded"
            assert client.download(job_id).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("data", "files", "field", "problem"),
    [
        ({"prompt": "a"}, {}, "image", "is needed"),
        ({"prompt": "a"}, {"image": ("a.txt", b"plain text", "text/plain")}, "image", "not a PNG"),
        (
            {"prompt": "a", "size": "64x64", "width": "64"},
            {"image": ("p.png", photo(), "image/png")},
            "size",
            "not both",
        ),
        ({"prompt": "a", "size": "big"}, {"image": ("p.png", photo(), "image/png")}, "size", ""),
        ({"prompt": "a", "n": "2"}, {"image": ("p.png", photo(), "image/png")}, "n", ""),
        ({"prompt": "a", "steps": "many"}, {"image": ("p.png", photo(), "image/png")}, "steps", ""),
        ({}, {"image": ("p.png", photo(), "image/png")}, "prompt", ""),
    ],
)
def test_a_bad_multipart_edit_is_422_naming_the_part_and_stores_nothing(
    gateway_process: GatewayProcess,
    settings: Settings,
    data: dict[str, str],
    files: dict,
    field: str,
    problem: str,
) -> None:
    someone = user()
    with httpx.Client(base_url=gateway_process.url, timeout=WAIT_S) as http:
        answer = http.post(
            "/v1/images/edits",
            headers={"Authorization": f"Bearer {live_key(settings, gateway_process, someone)}"},
            data=data,
            files=files,
        )
    body = assert_problem(answer, 422, "invalid-request")
    named = [error for error in body["errors"] if error["loc"][-1] == field]
    assert named and problem in named[0]["msg"], body
    assert uploads_of(settings, someone) == []


def test_a_presigned_upload_then_a_json_edit_of_it_and_never_of_anothers(
    gateway_process: GatewayProcess, settings: Settings
) -> None:
    someone, other = user(), user()
    data = photo()
    with httpx.Client(base_url=gateway_process.url, timeout=WAIT_S) as http:
        token = live_key(settings, gateway_process, someone)
        headers = {"Authorization": f"Bearer {token}"}
        ticket = http.post(
            "/v1/uploads",
            headers=headers,
            json={"sha256": hashlib.sha256(data).hexdigest(), "format": "png", "size_bytes": 9},
        )
        assert ticket.status_code == 201, ticket.text
        put = httpx.put(ticket.json()["url"], content=data, headers=ticket.json()["headers"])
        assert put.status_code == 200, put.text
        image = ticket.json()["key"]
        assert uploads_of(settings, someone) == [image]

        theirs = upload_key(other, hashlib.sha256(data).hexdigest(), "png")
        foreign = http.post(
            "/v1/images/generations",
            headers=headers,
            json={"prompt": "a", "task": "edit", "image": theirs, "steps": 2},
        )
        body = assert_problem(foreign, 422, "invalid-request")
        assert body["errors"][0]["loc"] == ["body", "image"]
        assert f"uploads/user={someone}/" in body["errors"][0]["msg"]

        too_large = http.post(
            "/v1/uploads",
            headers=headers,
            json={"sha256": "0" * 64, "format": "png", "size_bytes": 21 * 1024 * 1024},
        )
        assert too_large.status_code == 422

        own = http.post(
            "/v1/images/generations",
            headers={**headers, "Prefer": f"wait={int(min(WAIT_S, 60))}"},
            json={
                "prompt": "a",
                "task": "edit",
                "image": image,
                "steps": 2,
                "width": 64,
                "height": 64,
            },
        )
    assert own.status_code in (200, 202), own.text
    with Client(gateway_process.url, api_key=token) as client:
        assert client.wait(own.json()["id"], timeout_s=WAIT_S).status == "succeeded"


def test_the_same_multipart_edit_with_an_idempotency_key_is_one_job_and_one_upload(
    gateway_process: GatewayProcess, settings: Settings
) -> None:
    someone = user()
    with httpx.Client(base_url=gateway_process.url, timeout=WAIT_S) as http:
        headers = {
            "Authorization": f"Bearer {live_key(settings, gateway_process, someone)}",
            "Idempotency-Key": "e1",
        }

        def send() -> httpx.Response:
            return http.post(
                "/v1/images/edits",
                headers=headers,
                data={"prompt": "a", **SMALL},
                files={"image": ("p.png", photo(), "image/png")},
            )

        first, again = send(), send()
    assert first.status_code == 202, first.text
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert len(uploads_of(settings, someone)) == 1
