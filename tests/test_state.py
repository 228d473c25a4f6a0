"""The intake's write-behind state: reads see the batch's writes, a flush writes each key once."""

from __future__ import annotations

import asyncio

import pytest

from imagegen.processors.state import WriteBehind

CHANGELOG = "imagegen-processor-dedupe-changelog"


class Topic:
    def get_topic_name(self):
        return CHANGELOG


class Table:
    """The part of a faust table that `WriteBehind` uses: `get`, its store, its changelog."""

    def __init__(self, data=None):
        self.data = dict(data or {})
        self.changelog_topic = Topic()

    def get(self, key, default=None):
        return self.data.get(key, default)


class Producer:
    def __init__(self):
        self.sent = []

    async def send(self, topic, key, value, partition, *, timestamp, headers):
        self.sent.append((topic, key, value, partition, timestamp, headers))
        return f"ack-{len(self.sent)}"


def flush(state, producer=None):
    return asyncio.run(state.flush(producer or Producer()))


def sent_records(producer):
    return [(key, value, partition) for _, key, value, partition, _, _ in producer.sent]


def test_reads_fall_through_to_the_table():
    state = WriteBehind(Table({"user:a": [1, 2]}))

    assert state.get("user:a") == [1, 2]
    assert state.get("user:b") is None
    assert state.get("user:b", "default") == "default"


def test_reads_see_pending_writes_before_the_flush():
    table = Table({"user:a": [1]})
    state = WriteBehind(table)
    state.partition = 0

    state["user:a"] = [2]
    state["user:b"] = [3]

    assert state.get("user:a") == [2]
    assert state.get("user:b", "default") == [3]
    assert table.data == {"user:a": [1]}


def test_a_pending_none_is_a_value_not_a_missing_key():
    state = WriteBehind(Table({"user:a": [1]}))
    state.partition = 0

    state["user:a"] = None

    assert state.get("user:a", "default") is None


def test_a_write_outside_a_record_decision_is_refused():
    state = WriteBehind(Table())

    with pytest.raises(RuntimeError):
        state["user:a"] = [1]

    assert state.get("user:a") is None


def test_flush_applies_the_writes_to_the_table_store():
    table = Table({"user:a": [1], "user:c": [9]})
    state = WriteBehind(table)
    state.partition = 0
    state["user:a"] = [2]
    state["user:b"] = [3]

    flush(state)

    assert table.data == {"user:a": [2], "user:b": [3], "user:c": [9]}


def test_flush_sends_each_changed_key_once_with_its_last_value():
    state = WriteBehind(Table())
    producer = Producer()
    state.partition = 0
    state["user:a"] = [1]
    state["user:b"] = [2]
    state["user:a"] = [3]

    flush(state, producer)

    assert sent_records(producer) == [(b'"user:a"', b"[3]", 0), (b'"user:b"', b"[2]", 0)]


def test_flush_sends_to_the_changelog_as_faust_would():
    state = WriteBehind(Table())
    producer = Producer()
    state.partition = 4
    state["req:1"] = {"offset": 17, "at": 1.5}

    flush(state, producer)

    assert producer.sent == [
        (CHANGELOG, b'"req:1"', b'{"offset":17,"at":1.5}', 4, None, None),
    ]


def test_each_change_goes_to_the_partition_of_the_record_that_made_it():
    state = WriteBehind(Table())
    producer = Producer()
    state.partition = 1
    state["user:a"] = [1]
    state.partition = 2
    state["user:b"] = [2]
    state.partition = 3
    state["user:a"] = [3]

    flush(state, producer)

    assert sent_records(producer) == [(b'"user:a"', b"[3]", 3), (b'"user:b"', b"[2]", 2)]


def test_flush_returns_the_acknowledgements_of_its_sends_in_order():
    state = WriteBehind(Table())
    state.partition = 0
    state["a"] = 1
    state["b"] = 2

    assert flush(state) == ["ack-1", "ack-2"]


def test_a_second_flush_sends_nothing():
    table = Table()
    state = WriteBehind(table)
    state.partition = 0
    state["user:a"] = [1]
    flush(state)
    producer = Producer()

    assert flush(state, producer) == []
    assert producer.sent == []
    assert table.data == {"user:a": [1]}


def test_writes_after_a_flush_are_sent_in_the_next_one():
    state = WriteBehind(Table())
    state.partition = 0
    state["user:a"] = [1]
    flush(state)
    producer = Producer()
    state["user:b"] = [2]

    flush(state, producer)

    assert sent_records(producer) == [(b'"user:b"', b"[2]", 0)]


def test_a_deleted_key_reads_as_missing_before_the_flush():
    table = Table({"user:a": [1]})
    state = WriteBehind(table)

    state.delete("user:a", 5)

    assert state.get("user:a") is None
    assert state.get("user:a", "default") == "default"
    assert table.data == {"user:a": [1]}


def test_flushing_a_deletion_removes_the_key_and_sends_a_tombstone():
    table = Table({"user:a": [1], "user:b": [2]})
    state = WriteBehind(table)
    producer = Producer()

    state.delete("user:a", 5)
    flush(state, producer)

    assert table.data == {"user:b": [2]}
    assert sent_records(producer) == [(b'"user:a"', None, 5)]
    assert state.get("user:a") is None


def test_deleting_a_key_the_store_lacks_still_sends_a_tombstone():
    table = Table()
    state = WriteBehind(table)
    producer = Producer()

    state.delete("user:gone", 2)
    flush(state, producer)

    assert table.data == {}
    assert sent_records(producer) == [(b'"user:gone"', None, 2)]


def test_a_deletion_needs_no_record_partition():
    state = WriteBehind(Table({"user:a": [1]}))

    state.delete("user:a", 3)

    assert state.partition is None
    assert state.get("user:a") is None


def test_a_write_after_a_deletion_wins():
    table = Table({"user:a": [1]})
    state = WriteBehind(table)
    producer = Producer()
    state.delete("user:a", 1)
    state.partition = 2
    state["user:a"] = [5]

    assert state.get("user:a") == [5]
    flush(state, producer)

    assert table.data == {"user:a": [5]}
    assert sent_records(producer) == [(b'"user:a"', b"[5]", 2)]


def test_a_deletion_after_a_write_wins():
    table = Table()
    state = WriteBehind(table)
    producer = Producer()
    state.partition = 2
    state["user:a"] = [5]
    state.delete("user:a", 2)

    assert state.get("user:a") is None
    flush(state, producer)

    assert table.data == {}
    assert sent_records(producer) == [(b'"user:a"', None, 2)]


def test_stored_lists_the_table_entries_as_of_the_last_flush():
    state = WriteBehind(Table({"user:a": [1], "user:b": [2]}))
    state.partition = 0
    state["user:c"] = [3]
    state.delete("user:a", 0)

    assert sorted(state.stored()) == [("user:a", [1]), ("user:b", [2])]

    flush(state)

    assert sorted(state.stored()) == [("user:b", [2]), ("user:c", [3])]


def test_stored_is_a_snapshot_unaffected_by_later_flushes():
    state = WriteBehind(Table({"user:a": [1]}))
    entries = state.stored()
    state.delete("user:a", 0)

    flush(state)

    assert entries == [("user:a", [1])]


def test_del_tombstones_the_key_in_the_partition_of_the_record_deciding():
    table = Table({"user:a": [1]})
    state = WriteBehind(table)
    producer = Producer()
    state.partition = 5

    del state["user:a"]

    assert state.get("user:a") is None
    flush(state, producer)
    assert sent_records(producer) == [(b'"user:a"', None, 5)]
    assert table.data == {}


def test_a_del_outside_a_record_decision_is_refused():
    state = WriteBehind(Table({"user:a": [1]}))

    with pytest.raises(RuntimeError):
        del state["user:a"]

    assert state.get("user:a") == [1]
