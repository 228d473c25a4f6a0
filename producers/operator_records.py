"""Publish one operator's record (an API key, a webhook secret) to its compacted topic and
wait for the broker: the command that made it returns only once it is durable."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import BaseModel

from imagegen.infra.metrics import RECORDS_PRODUCED
from imagegen.schemas import encode
from imagegen.schemas.errors import BrokerUnavailable, PublishError


def publish_and_wait(
    producer: Producer,
    topic: str,
    key: bytes,
    record: BaseModel,
    what: str,
    bootstrap: str,
    timeout_s: float,
) -> None:
    """Raises `BrokerUnavailable` (retry later) or `PublishError`; `what` names the record
    in their messages ("the API key record")."""
    outcome: list[KafkaError | None] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        outcome.append(error)

    try:
        producer.produce(topic, key=key, value=encode(record), on_delivery=delivered)
    except (KafkaException, BufferError) as exc:
        raise PublishError(f"the producer refused {what}: {exc}") from exc
    # librdkafka reports every record by message.timeout.ms, so this flush returns then.
    producer.flush(timeout_s + 5.0)
    error = outcome[0] if outcome else KafkaError(KafkaError._MSG_TIMED_OUT)
    if error is None:
        RECORDS_PRODUCED.labels(topic).inc()
        return
    if error.code() == KafkaError._MSG_TIMED_OUT or error.retriable():
        raise BrokerUnavailable(
            f"{what} was not acknowledged by Kafka at {bootstrap} within {timeout_s:g}s "
            f"({error.str()}). Check that the broker is up and IMAGEGEN_KAFKA_BOOTSTRAP "
            "points at it."
        )
    raise PublishError(f"Kafka refused {what}: {error.str()}")
