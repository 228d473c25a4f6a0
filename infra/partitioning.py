"""Which partition a keyed record lands on: Kafka's default partitioner for keyed records.

Readers compute a key's partition so as to read that partition alone: `imagegen fetch` reads
the one partition of `imagegen.results` that a request id hashes to. That works only while
every producer partitions keyed records by this function. The Java client does by default,
and so do aiokafka (the processor, through faust) and librdkafka with
`partitioner=murmur2_random` (set in `infra.kafka.make_producer`).

It also assumes the partition count never changes: adding partitions moves keys, and a
reader would then look for older records in the wrong place.
"""

from __future__ import annotations

import struct

_SEED = 0x9747B28C
_MULTIPLIER = 0x5BD1E995
_WORD = 0xFFFFFFFF  # Java's int arithmetic wraps at 32 bits


def murmur2(data: bytes) -> int:
    """The 32-bit MurmurHash2 of `data` as Kafka's `Utils.murmur2` computes it, read as an
    unsigned number (Java returns the same bits as a signed int)."""
    length = len(data)
    whole_words = length - length % 4
    hashed = (_SEED ^ length) & _WORD
    for (word,) in struct.iter_unpack("<I", data[:whole_words]):
        word = (word * _MULTIPLIER) & _WORD
        word ^= word >> 24
        word = (word * _MULTIPLIER) & _WORD
        hashed = ((hashed * _MULTIPLIER) & _WORD) ^ word
    tail = data[whole_words:]
    if tail:
        hashed ^= int.from_bytes(tail, "little")
        hashed = (hashed * _MULTIPLIER) & _WORD
    hashed ^= hashed >> 13
    hashed = (hashed * _MULTIPLIER) & _WORD
    return hashed ^ (hashed >> 15)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of a topic with `partitions` partitions that a record keyed `key` goes to."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition (got {partitions})")
    # Java's Utils.toPositive: clear the sign bit rather than take an absolute value.
    return (murmur2(key) & 0x7FFFFFFF) % partitions
