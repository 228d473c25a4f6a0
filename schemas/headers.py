"""Kafka header names the stages set and read, beside the values the schemas describe."""

#: W3C trace context, propagated on every record (`imagegen.infra.tracing`).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

#: Set by the processor on each admitted render record: when it was admitted, in epoch ms.
#: The worker measures queueing time from it.
ADMITTED_AT_HEADER = "imagegen.admitted_at_ms"

#: Set on a record republished from the DLQ: the `topic/partition/offset` of its dead letter.
#: The processor lets such a record through dedupe once.
REPLAY_HEADER = "replay.of"
