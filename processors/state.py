"""Where the intake keeps its state: a batch's write-behind view of a faust table.

The processor works through records in batches (see `processors.app`). A faust table writes
every assignment to its changelog at once, so a user's bucket and each partition's share of
the global bucket would be written once per record. Through `WriteBehind`, each key changed
in a batch reaches the table, and its changelog, once: when the batch is flushed, before any
of its records is acked.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Protocol

import faust.streams
from faust.types import EventT


class Store(Protocol):
    """What the intake needs of a table: a dict, a faust table, or a `WriteBehind`."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...


class WriteBehind:
    """Reads see this batch's writes; `flush` hands each changed key to the table once."""

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self._table = table
        self._pending: dict[str, tuple[Any, EventT | None]] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._pending:
            return self._pending[key][0]
        return self._table.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self._pending[key] = (value, faust.streams.current_event())

    def flush(self) -> None:
        for key, (value, event) in self._pending.items():
            # The table writes to the changelog partition of the current event: the one
            # that last changed the key, as if it were written then.
            with current_event(event):
                self._table[key] = value
        self._pending.clear()


@contextmanager
def current_event(event: EventT | None) -> Iterator[None]:
    """Make `event` faust's current event in this task. faust sets it only while a stream
    yields one event at a time, not while an agent works through a batch, and tables need
    it to pick the changelog partition."""
    token = faust.streams._current_event.set(weakref.ref(event) if event else None)
    try:
        yield
    finally:
        faust.streams._current_event.reset(token)
