"""What the processor trusts of a request record's headers.

Anyone who may write `imagegen.requests` sets any header they like. Names in the reserved
namespaces belong to the pipeline (`imagegen.`), the DLQ (`dlq.`) and operators (`replay.`),
so they are dropped on arrival, before anything reads them: a forged
`imagegen.admitted_at_ms` never reaches a worker, and a forged `dlq.*` never reaches a dead
letter's context. The one name read first is the replay mark, and only a mark signed with
IMAGEGEN_REPLAY_KEY (`imagegen.infra.replay_marks`) makes the record a replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imagegen.infra.replay_marks import verify
from imagegen.infra.settings import Settings
from imagegen.schemas.headers import REPLAY_HEADER

# Lower case: a name that differs only in case is no less the pipeline's.
RESERVED_PREFIXES = ("imagegen.", "dlq.", "replay.")

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Screened:
    #: The headers outside the reserved namespaces, in their order: the only ones passed on.
    headers: Headers
    #: The dead letter a verified replay mark names; None for an ordinary record.
    replay_of: str | None


def screen(headers: Sequence[tuple[str, bytes]], settings: Settings) -> Screened:
    kept = [(name, value) for name, value in headers if not is_reserved(name)]
    marks = (verify(value, settings) for name, value in headers if name == REPLAY_HEADER)
    return Screened(kept, next((coordinates for coordinates in marks if coordinates), None))


def is_reserved(name: str) -> bool:
    return name.lower().startswith(RESERVED_PREFIXES)
