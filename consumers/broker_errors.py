"""Broker errors that waiting does not fix, and what an operator does about each.

A worker rides out a broker that is away: librdkafka reconnects and resends, and the
consumer rejoins its group. Some answers never change by waiting: the broker refuses the
worker's principal, a record is larger than a topic takes, or the client is fenced or in a
fatal state. A worker that met one would hold its partitions and do nothing; it stops
instead, with a message from `what_to_fix`.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from imagegen.schemas.topics import (
    BATCH_WORKER_GROUP,
    DLQ,
    RENDER,
    RENDER_BATCH,
    RESULTS,
    WORKER_GROUP,
)

_AUTHORIZATION = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
_AUTHENTICATION = frozenset(
    {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL}
)
_FENCED = frozenset({KafkaError._FENCED, KafkaError.FENCED_INSTANCE_ID})


def stops_the_worker(error: KafkaError) -> bool:
    """Whether a consumer error is one that waiting does not fix."""
    return error.fatal() or error.code() in _AUTHORIZATION | _AUTHENTICATION | _FENCED


def what_to_fix(error: KafkaError) -> str:
    """`error`, and what to change so that the next worker does not meet it too."""
    code = error.code()
    if code in _AUTHORIZATION:
        advice = (
            f"The broker refused the worker's principal: grant it Read on topics {RENDER} "
            f"and {RENDER_BATCH} and on groups {WORKER_GROUP} and {BATCH_WORKER_GROUP}, "
            f"Write on {RESULTS} and {DLQ}, and Describe on all four topics (check the "
            "ACLs), or set IMAGEGEN_KAFKA_SASL_USERNAME to a principal that has them"
        )
    elif code in _AUTHENTICATION:
        advice = (
            "The broker did not accept the worker's credentials: check "
            "IMAGEGEN_KAFKA_SECURITY_PROTOCOL, IMAGEGEN_KAFKA_SASL_MECHANISM, "
            "IMAGEGEN_KAFKA_SASL_USERNAME and IMAGEGEN_KAFKA_SASL_PASSWORD (and the "
            "IMAGEGEN_KAFKA_SSL_* files)"
        )
    elif code == KafkaError.MSG_SIZE_TOO_LARGE:
        advice = (
            "The record is larger than the topic takes: raise the topic's max.message.bytes "
            "(and the broker's message.max.bytes)"
        )
    elif code == KafkaError._MSG_TIMED_OUT:
        advice = (
            "The broker did not acknowledge it within the producer's message.timeout.ms: "
            "check that the cluster at IMAGEGEN_KAFKA_BOOTSTRAP is up and has the topic's "
            "leaders and in-sync replicas"
        )
    elif code in _FENCED:
        advice = "Another client took over this one's identity: restart the worker"
    else:
        advice = "Restart the worker; if this recurs, look for the error in the broker's logs"
    return f"{error.name()}: {error.str()}. {advice}."
