"""W3C trace context across Kafka: a `traceparent` header (and `tracestate`, when there is
one) travels from the publisher through the processor and the worker to the result.

With the OpenTelemetry API importable (the `tracing` extra), each hop starts a span as the
child of the context in its incoming headers and puts the new span's context on the
records it produces. The API records nothing on its own: a process that wants its spans
exported configures an SDK (for instance by running under `opentelemetry-instrument`);
with one, a record without trace context starts a new trace. Without an SDK the API's
spans are non-recording: the incoming context passes on unchanged, and a record without
one gets none. Without the API at all, the incoming trace headers are copied forward
unchanged. So the header travels either way.

The headers are always W3C trace context, whatever propagators the process configured for
other transports: they are part of the wire contract.

- `trace_headers(incoming)`: the trace headers of a record, to put on the records produced
  for it, with no span of its own.
- `start_span(name, incoming)` / `traced(name, incoming)`: a span and the headers that
  carry it onward.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from imagegen.schemas.headers import TRACEPARENT, TRACESTATE

try:
    from opentelemetry import trace as _otel
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # the tracing extra is not installed: pass trace context through
    # mypy has no type for "this module or None"; each use checks that the API is there.
    _otel = None  # type: ignore[assignment]
    _propagator = None


Headers = list[tuple[str, bytes]]
#: Kafka headers as confluent-kafka (a list of pairs) or faust (a mapping) hand them over.
HeaderSource = Mapping[str, bytes | str | None] | Iterable[tuple[str, bytes | str | None]]
SpanKind = Literal["producer", "consumer", "internal"]
AttributeValue = str | int | float | bool

# Version 00 exactly, with a non-zero trace id and span id: what every hop writes.
_TRACEPARENT_FORMAT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def is_traceparent(value: str) -> bool:
    """Whether `value` is a valid W3C `traceparent` (version 00)."""
    return _TRACEPARENT_FORMAT.fullmatch(value) is not None


def trace_headers(incoming: HeaderSource | None) -> Headers:
    """The `traceparent` and `tracestate` headers among `incoming`, unchanged, to put on
    the records produced for that record; none when its `traceparent` is missing or
    invalid (a `tracestate` means nothing without it)."""
    carrier = _carrier(incoming)
    if not is_traceparent(carrier.get(TRACEPARENT, "")):
        return []
    return [(name, carrier[name].encode()) for name in (TRACEPARENT, TRACESTATE) if name in carrier]


class Span:
    """A started span, or its stand-in without OpenTelemetry, and the headers that carry
    its context onward. `end` may be called more than once; the first call counts."""

    def __init__(self, headers: Headers, otel_span: Any = None) -> None:
        self.headers = headers
        self._span = otel_span
        self._ended = False

    @property
    def trace_id(self) -> str | None:
        """The trace id in hex, for logs; None outside any trace."""
        for name, value in self.headers:
            if name == TRACEPARENT:
                return value.decode().split("-")[1]
        return None

    def set_attribute(self, name: str, value: AttributeValue) -> None:
        if self._span is not None:
            self._span.set_attribute(name, value)

    def end(self, error: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._span is None:
            return
        if error is not None:
            self._span.record_exception(error)
            self._span.set_status(_otel.Status(_otel.StatusCode.ERROR, type(error).__name__))
        self._span.end()


def start_span(
    name: str,
    incoming: HeaderSource | None = None,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Span:
    """Start span `name` as the child of the trace context in `incoming` (a record's
    headers; a record without one starts a new trace), or of the caller's current span
    when `incoming` is None. End it with `Span.end`."""
    if _otel is None or _propagator is None:
        return Span(trace_headers(incoming))
    parent = None if incoming is None else _propagator.extract(_carrier(incoming))
    span = _otel.get_tracer(__name__).start_span(
        name,
        context=parent,
        kind=getattr(_otel.SpanKind, kind.upper()),
        attributes=dict(attributes or {}),
    )
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=_otel.set_span_in_context(span))
    return Span([(key, value.encode()) for key, value in carrier.items()], span)


@contextmanager
def traced(
    name: str,
    incoming: HeaderSource | None = None,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[Span]:
    """`start_span` for a block: the span ends with it, marked failed if the block raised."""
    span = start_span(name, incoming, kind=kind, attributes=attributes)
    try:
        yield span
    except BaseException as error:
        span.end(error)
        raise
    span.end()


def _carrier(incoming: HeaderSource | None) -> dict[str, str]:
    """The trace headers of `incoming` as text; undecodable values are left out."""
    pairs = incoming.items() if isinstance(incoming, Mapping) else incoming or []
    carrier: dict[str, str] = {}
    for name, value in pairs:
        if name not in (TRACEPARENT, TRACESTATE) or value is None:
            continue
        try:
            carrier[name] = value.decode("ascii") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            continue
    return carrier
