"""The upload keys and formats of `imagegen.schemas.uploads`."""

from __future__ import annotations

import pytest

from imagegen.schemas.fields import UPLOAD_KEY_PATTERN
from imagegen.schemas.uploads import foreign_inputs, sniff_format, upload_key

SHA = "3a" * 32


def test_an_upload_key_is_its_users_prefix_and_its_contents_hash() -> None:
    key = upload_key("ann", SHA, "webp")
    assert key == f"uploads/user=ann/{SHA}.webp"
    assert UPLOAD_KEY_PATTERN.search(key)


@pytest.mark.parametrize(("user", "sha"), [("a/b", SHA), ("ann", "XY" * 32), ("", SHA)])
def test_a_key_that_would_leave_its_prefix_is_never_made(user: str, sha: str) -> None:
    with pytest.raises(ValueError, match="not an upload key"):
        upload_key(user, sha, "png")


def test_a_dot_dot_user_stays_one_segment_under_uploads() -> None:
    # "user=.." is a segment of its own, never "..": S3 has no dot segments, and no reader
    # that resolves them finds one here.
    assert upload_key("..", SHA, "png").split("/")[1] == "user=.."


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\r", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "jpeg"),
        (b"RIFF\x24\x00\x00\x00WEBP", "webp"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00", None),
        (b"RIFF\x24\x00\x00\x00WAVE", None),
        (b"", None),
    ],
)
def test_formats_are_told_by_their_magic_bytes(head: bytes, found: str | None) -> None:
    assert sniff_format(head) == found


def test_foreign_inputs_are_the_keys_outside_the_users_prefix() -> None:
    own, other = upload_key("ann", SHA, "png"), upload_key("anne", SHA, "png")
    assert foreign_inputs("ann", [own, other]) == [other]
    assert foreign_inputs("anne", [own, other]) == [own]
