"""The partition function readers compute, against Kafka's own vectors and against where
both of our producers (confluent-kafka and aiokafka) really put keyed records."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka.admin import NewTopic
from hypothesis import given
from hypothesis import strategies as st

from imagegen.infra.kafka import make_admin, make_producer
from imagegen.infra.partitioning import murmur2, partition_for
from imagegen.infra.settings import Settings
from imagegen.schemas import new_request_id
from tests.helpers import read_topic

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: Java's signed int results.
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

# Prime, and unlike any of the pipeline's topics: a partitioner that only happened to agree
# at six partitions still fails here.
PARTITIONS = 7


@pytest.mark.parametrize(("data", "java_int"), KAFKA_MURMUR2.items())
def test_murmur2_matches_the_java_client(data: bytes, java_int: int) -> None:
    assert murmur2(data) == java_int & 0xFFFFFFFF


def test_a_negative_hash_loses_its_sign_bit_not_its_sign() -> None:
    # Java's toPositive(-973932308) is 1173551340, so "21" goes to partition 0 of 6; an
    # absolute value (973932308) would send it to partition 2.
    assert partition_for(b"21", 6) == 0


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=1000))
def test_partition_for_agrees_with_aiokafka(key: bytes, partitions: int) -> None:
    every = list(range(partitions))
    assert partition_for(key, partitions) == DefaultPartitioner()(key, every, every)


def test_a_topic_without_partitions_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for(b"key", 0)


@pytest.fixture
def topic(settings: Settings) -> str:
    name = f"test.partitioning.{uuid.uuid4().hex}"
    admin = make_admin(settings)  # must outlive the future, or librdkafka cancels it
    admin.create_topics([NewTopic(name, num_partitions=PARTITIONS)])[name].result(10)
    return name


def send_with_confluent(settings: Settings, topic: str, keys: list[bytes]) -> None:
    producer = make_producer(settings)
    for key in keys:
        producer.produce(topic, key=key, value=b"confluent")
    assert producer.flush(10) == 0


async def send_with_aiokafka(settings: Settings, topic: str, keys: list[bytes]) -> None:
    # Configured as faust configures the processor's producer: the default partitioner.
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        sent = [await producer.send(topic, b"aiokafka", key=key) for key in keys]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def test_both_producers_put_each_key_where_readers_look(settings: Settings, topic: str) -> None:
    keys = [new_request_id().encode() for _ in range(40)]
    send_with_confluent(settings, topic, keys)
    asyncio.run(send_with_aiokafka(settings, topic, keys))
    records = read_topic(settings, topic, lambda ms: len(ms) >= 2 * len(keys))
    landed = {(m.value(), m.key(), m.partition()) for m in records}
    expected = {
        (producer, key, partition_for(key, PARTITIONS))
        for producer in (b"confluent", b"aiokafka")
        for key in keys
    }
    assert landed == expected
    assert len({partition for *_, partition in landed}) > 1  # the keys really spread out
