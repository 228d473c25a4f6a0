"""Where the intake keeps its state: a batch's write-behind view of a faust table.

The processor works through records in batches (see `imagegen.processors.app`). Assigning to a faust
table writes the change to its changelog at once, through faust's per-record send
machinery, which costs more than the intake decision itself; and a user's bucket and each
partition's share of the global bucket would be written once per record. Through
`WriteBehind`, each key changed in a batch is written once, when the batch is flushed: to
the table's store, and straight to its changelog partition through the producer. The
changelog record is what faust would write (JSON key and value, in the partition of the
record that made the change, since tables are co-partitioned with their source topic),
so faust's recovery reads it back as its own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, Protocol

from faust.types import ProducerT, TableT


class Store(Protocol):
    """What the intake needs of a table: a dict, a faust table, or a `WriteBehind`."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...

    def __delitem__(self, key: str, /) -> None: ...


# A pending deletion: the key leaves the store, and a tombstone goes to the changelog.
_DELETED = object()


class WriteBehind:
    """Reads see this batch's writes; `flush` writes each changed key once.

    Set `partition` to the partition of the record being decided before deciding it: its
    changes belong to that changelog partition.
    """

    def __init__(self, table: TableT) -> None:
        self._table = table
        self._pending: dict[str, tuple[Any, int]] = {}
        self.partition: int | None = None

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._pending:
            value = self._pending[key][0]
            return default if value is _DELETED else value
        return self._table.get(key, default)

    def stored(self) -> list[tuple[str, Any]]:
        """Every entry of the store as of the last flush (this process's partitions, and
        possibly stale ones of partitions it owned before a rebalance)."""
        return list(self._table.data.items())

    def delete(self, key: str, partition: int) -> None:
        self._pending[key] = (_DELETED, partition)

    def __setitem__(self, key: str, value: Any) -> None:
        self._pending[key] = (value, self._deciding())

    def __delitem__(self, key: str) -> None:
        self.delete(key, self._deciding())

    def _deciding(self) -> int:
        """The changelog partition of the record being decided."""
        if self.partition is None:
            raise RuntimeError("a table changed outside the decision of a record")
        return self.partition

    async def flush(self, producer: ProducerT) -> list[Awaitable[Any]]:
        """Apply this batch's changes and send them to the changelog; return the sends'
        acknowledgements, which must arrive before any record of the batch is acked."""
        topic = self._table.changelog_topic.get_topic_name()
        acknowledgements = []
        for key, (value, partition) in self._pending.items():
            if value is _DELETED:
                self._table.data.pop(key, None)
            else:
                self._table.data[key] = value
            acknowledgement = await producer.send(
                topic,
                _json(key),
                None if value is _DELETED else _json(value),
                partition,
                timestamp=None,
                headers=None,
            )
            acknowledgements.append(acknowledgement)
        self._pending.clear()
        return acknowledgements


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
