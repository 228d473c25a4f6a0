"""Uploading edit inputs against the real object store: `producers.uploads.upload`,
`imagegen upload` and `imagegen submit --edit` as a user runs them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.producers.uploads import UploadRefused, upload
from imagegen.schemas.uploads import MAX_UPLOAD_BYTES
from tests.helpers import imagegen
from tests.test_edits_worker import circle_mask, photo


def test_an_upload_is_named_by_its_content_and_uploading_again_keeps_one_object(
    settings: Settings,
) -> None:
    store = ObjectStore(settings)
    data = photo()
    key = upload(store, "uploader-1", data)
    assert key == f"uploads/user=uploader-1/{hashlib.sha256(data).hexdigest()}.png"
    assert upload(store, "uploader-1", data) == key
    assert store.list_keys("uploads/user=uploader-1/", None, 10) == [key]
    assert store.get(key) == data
    assert store.stat(key).content_type == "image/png"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"GIF89a" + bytes(100), "not a PNG, JPEG or WebP image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_BYTES), "over the 20,971,520"),
    ],
)
def test_what_cannot_be_an_input_is_refused_and_nothing_stored(
    settings: Settings, data: bytes, problem: str
) -> None:
    store = ObjectStore(settings)
    with pytest.raises(UploadRefused, match=problem):
        upload(store, "uploader-2", data)
    assert store.list_keys("uploads/user=uploader-2/", None, 10) == []


def test_imagegen_upload_prints_the_key_alone(settings: Settings, tmp_path: Path) -> None:
    file = tmp_path / "photo.png"
    file.write_bytes(photo())
    shown = imagegen(settings, "upload", str(file), "--user", "uploader-3")
    assert shown.returncode == 0, shown.stderr
    key = shown.stdout.strip()
    assert key.startswith("uploads/user=uploader-3/") and key.endswith(".png")
    assert ObjectStore(settings).get(key) == file.read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    refused = imagegen(settings, "upload", str(text), "--user", "uploader-3")
    assert refused.returncode == 2
    assert "not a PNG, JPEG or WebP image" in refused.stderr


def test_submit_edit_uploads_its_files_and_publishes_an_inpaint(
    settings: Settings, tmp_path: Path
) -> None:
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    image.write_bytes(photo())
    mask.write_bytes(circle_mask())
    args = ["submit", "a moon", "--user", "uploader-4", "--edit", str(image)]
    shown = imagegen(settings, *args, "--mask", str(mask), "--strength", "0.6", "--json")
    assert shown.returncode == 0, shown.stderr
    request = json.loads(shown.stdout)
    assert (request["task"], request["strength"]) == ("inpaint", 0.6)
    store = ObjectStore(settings)
    assert store.get(request["image"]) == image.read_bytes()
    assert store.get(request["mask"]) == mask.read_bytes()
    edit_only = imagegen(settings, *args, "--json")
    assert json.loads(edit_only.stdout)["task"] == "edit"


@pytest.mark.parametrize("option", [["--mask", "mask.png"], ["--strength", "0.5"]])
def test_mask_or_strength_without_edit_is_a_usage_error(
    settings: Settings, tmp_path: Path, option: list[str]
) -> None:
    (tmp_path / "mask.png").write_bytes(circle_mask())
    if option[0] == "--mask":
        option = ["--mask", str(tmp_path / "mask.png")]
    refused = imagegen(settings, "submit", "a moon", "--user", "uploader-5", *option)
    assert refused.returncode == 2
    assert "needs --edit" in refused.stderr
