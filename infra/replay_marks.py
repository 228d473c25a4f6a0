"""The `replay.of` mark: which dead letter a replayed record came from, signed by an operator.

Anyone who may write `imagegen.requests` can set any header, so the processor trusts a replay
mark only with a valid signature: an HMAC-SHA256 of the dead letter's coordinates under
`IMAGEGEN_REPLAY_KEY`, which operators and processors share and publishers never see. A mark
is `<coordinates>;<hex signature>`, the coordinates being `<dlq topic>/<partition>/<offset>`.
"""

from __future__ import annotations

import hashlib
import hmac

from imagegen.infra.settings import Settings
from imagegen.schemas.errors import ConfigError

_SEPARATOR = ";"


def _signature(coordinates: str, key: bytes) -> str:
    return hmac.new(key, coordinates.encode(), hashlib.sha256).hexdigest()


def _key(settings: Settings) -> bytes | None:
    if settings.replay_key is None:
        return None
    return settings.replay_key.get_secret_value().encode()


def sign(coordinates: str, settings: Settings) -> bytes:
    """The mark for a replay of the dead letter at `coordinates`."""
    key = _key(settings)
    if key is None:
        raise ConfigError(
            "replaying needs IMAGEGEN_REPLAY_KEY, the key processors check replay marks "
            "with: set the same value here and on every processor"
        )
    return f"{coordinates}{_SEPARATOR}{_signature(coordinates, key)}".encode()


def verify(mark: bytes, settings: Settings) -> str | None:
    """The coordinates a mark names, or None unless it was signed with this key."""
    key = _key(settings)
    if key is None:
        return None
    coordinates, _, signature = mark.decode("utf-8", "replace").rpartition(_SEPARATOR)
    if not coordinates or not hmac.compare_digest(signature, _signature(coordinates, key)):
        return None
    return coordinates
