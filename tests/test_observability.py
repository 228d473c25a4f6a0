"""Metrics, structured logs and trace context, in process and through real workers on the
real broker and object store."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from imagegen.infra import tracing
from imagegen.infra.health import Health
from imagegen.infra.kafka import EndOffsets, make_admin, make_consumer, make_producer
from imagegen.infra.logs import configure_logging, log_context, logging_config
from imagegen.infra.metrics import group_lag, observe_gpu_memory, serve
from imagegen.infra.settings import Settings, load_settings
from imagegen.producers import RequestPublisher
from imagegen.schemas import GenerationRequest, GenerationResult, Status, decode, encode
from imagegen.schemas.errors import ConfigError, InvalidMessage
from imagegen.schemas.topics import DLQ, RENDER, REQUESTS, RESULTS, WORKER_GROUPS
from tests.conftest import settings_env
from tests.helpers import free_port, read_topic
from tests.processes import Service

SMALL = {"width": 64, "height": 64, "steps": 2}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# Runs the `imagegen` command line with an OpenTelemetry SDK that writes every finished
# span as a JSON line to the file named by the first argument.
TRACED_LAUNCHER = """\
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

spans = open(sys.argv.pop(1), "w")
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(
    ConsoleSpanExporter(out=spans, formatter=lambda span: span.to_json(indent=None) + "\\n")
))
trace.set_tracer_provider(provider)
from imagegen.cli.app import main
main()
"""

# Runs the `imagegen` command line as if OpenTelemetry were not installed.
UNTRACED_LAUNCHER = """\
import sys

class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoOpenTelemetry())
from imagegen.cli.app import main
main()
"""


# ---- logs ---------------------------------------------------------------------------------


def test_json_lines_carry_the_context_and_the_exception(root_logging, capsys) -> None:
    configure_logging(load_settings(log_format="json", log_level="info"))
    log = logging.getLogger("tests.logs")
    log.debug("below the level")
    with log_context(request_id="r-1", user_id="ann", partition=3, offset=17):
        log.info("rendering %s", "r-1", extra={"stage": "render"})
        try:
            raise ValueError("no such model")
        except ValueError:
            log.exception("failed")
    log.warning('plain "quoted" ünïcode')

    first, second, third = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert first["ts"].endswith("+00:00") and first["level"] == "info"
    assert {key: first[key] for key in ("logger", "message", "request_id", "stage")} == {
        "logger": "tests.logs",
        "message": "rendering r-1",
        "request_id": "r-1",
        "stage": "render",
    }
    assert (first["user_id"], first["partition"], first["offset"]) == ("ann", 3, 17)
    assert second["level"] == "error" and second["request_id"] == "r-1"
    assert "ValueError: no such model" in second["exception"]
    assert third["message"] == 'plain "quoted" ünïcode' and "request_id" not in third


def test_text_lines_are_for_people(root_logging, capsys) -> None:
    configure_logging(load_settings(log_format="text"), "DEBUG")
    with log_context(request_id="r-2"):
        logging.getLogger("tests.logs").debug("hello")
    line = capsys.readouterr().err.strip()
    assert line.endswith("DEBUG tests.logs: hello [request_id=r-2]")


def test_an_unknown_level_or_field_is_refused(root_logging) -> None:
    with pytest.raises(ConfigError, match="'loud' is not one of debug, info"):
        configure_logging(load_settings(), "loud")
    with pytest.raises(TypeError, match="request"):
        log_context(request="r-3").__enter__()


def test_faust_workers_apply_the_logging_config(root_logging, capsys) -> None:
    """mode's worker (under faust.Worker) clears the root's handlers and applies the dict
    as given: faust's own lines come out as JSON too."""
    from mode.utils.logging import setup_logging

    setup_logging(loglevel="info", logging_config=logging_config(load_settings()))
    logging.getLogger("faust.tests").info("started")
    line = json.loads(capsys.readouterr().err)
    assert (line["logger"], line["message"]) == ("faust.tests", "started")


# ---- metrics ------------------------------------------------------------------------------


def test_a_metrics_port_in_use_names_the_setting_to_change(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} .* in use: set THE_SETTING"):
            serve(port, "127.0.0.1", setting="THE_SETTING", health=Health())

        # The worker fails at once, before loading any model.
        env = {**settings_env(load_settings()), "IMAGEGEN_METRICS_HOST": "127.0.0.1"}
        done = subprocess.run(
            [sys.executable, "-m", "imagegen", "worker", "--metrics-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert "--metrics-port (or IMAGEGEN_WORKER_METRICS_PORT)" in done.stderr
    assert serve(0, "127.0.0.1", setting="THE_SETTING", health=Health()) is None


def test_lag_counts_from_the_committed_offsets(settings: Settings) -> None:
    topic = f"test-lag-{uuid.uuid4()}"
    group = f"test-lag-{uuid.uuid4()}"
    admin = make_admin(settings)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result()
    # Multi-record batches, which Tansu's watermarks undercount: its high watermark is one
    # past the first offset of a partition's last batch, not of its last record.
    producer = make_producer(settings, **{"linger.ms": 1000})
    for partition, count in ((0, 5), (1, 3)):
        for i in range(count):
            producer.produce(topic, value=b"%d" % i, partition=partition)
    assert producer.flush(30) == 0

    consumer = make_consumer(settings, group, **{"enable.auto.commit": False})
    ends = EndOffsets(settings)
    try:
        assert group_lag(consumer, ends, [topic]) == {(topic, 0): 5, (topic, 1): 3}
        consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
        # Partition 1 has no committed offset: the group would read it from the beginning.
        assert group_lag(consumer, ends, [topic]) == {(topic, 0): 3, (topic, 1): 3}
        # The same reader sees records that arrive between two reads.
        for i in range(4):
            producer.produce(topic, value=b"more %d" % i, partition=1)
        assert producer.flush(30) == 0
        assert group_lag(consumer, ends, [topic]) == {(topic, 0): 3, (topic, 1): 7}
    finally:
        ends.close()
        consumer.close()


def test_gpu_memory_is_sampled_on_cuda() -> None:
    import torch
    from prometheus_client import REGISTRY

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    held = torch.ones(1024, 1024, device="cuda")  # 4 MiB
    observe_gpu_memory(torch.device("cuda"))
    device = f"cuda:{torch.cuda.current_device()}"
    allocated = REGISTRY.get_sample_value("imagegen_gpu_memory_allocated_bytes", {"device": device})
    reserved = REGISTRY.get_sample_value("imagegen_gpu_memory_reserved_bytes", {"device": device})
    assert reserved >= allocated >= held.numel() * 4


# ---- trace context in process -------------------------------------------------------------


@pytest.fixture(scope="module")
def spans():
    """Spans that this process records, through the OpenTelemetry SDK."""
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_without_opentelemetry_trace_headers_pass_through(monkeypatch) -> None:
    monkeypatch.setattr(tracing, "_otel", None)
    incoming = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1"), ("x", b"y")]
    span = tracing.start_span("hop", incoming)
    assert span.headers == incoming[:2]
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c"
    span.end(ValueError("harmless"))
    assert tracing.trace_headers({"traceparent": TRACEPARENT}) == [
        ("traceparent", TRACEPARENT.encode())
    ]
    assert tracing.trace_headers([("traceparent", b"00-bad")]) == []
    assert tracing.start_span("root").headers == []


def test_a_span_continues_the_incoming_trace(spans) -> None:
    incoming = {"traceparent": TRACEPARENT.encode(), "tracestate": b"v=1"}
    with tracing.traced("hop", incoming, kind="consumer") as span:
        pass
    recorded = next(s for s in spans.get_finished_spans() if s.name == "hop")
    assert recorded.parent.span_id == 0xB7AD6B7169203331
    headers = dict(span.headers)
    assert headers["traceparent"].decode() == _traceparent(recorded)
    assert headers["tracestate"] == b"v=1"


def published_headers(settings: Settings, request_id: str) -> dict[str, str]:
    """The headers of the record on imagegen.requests that carries `request_id`."""
    found: dict[str, str] = {}

    def seen(messages: list) -> bool:
        for message in messages:
            if decode(GenerationRequest, message.value()).request_id == request_id:
                found.update((k, v.decode()) for k, v in message.headers() or [])
                return True
        return False

    read_topic(settings, REQUESTS, seen)
    return found


def test_the_publisher_traces_each_request(settings: Settings, spans) -> None:
    from opentelemetry import trace

    with (
        trace.get_tracer("tests").start_as_current_span("client") as client,
        RequestPublisher(settings) as publisher,
    ):
        request_id = publisher.publish(user_id="ann", prompt="a kite", **SMALL)
    publish = next(
        s
        for s in spans.get_finished_spans()
        if s.name == "imagegen.publish" and s.attributes["imagegen.request_id"] == request_id
    )
    assert publish.parent.span_id == client.get_span_context().span_id
    assert published_headers(settings, request_id)["traceparent"] == _traceparent(publish)


def test_the_publisher_passes_a_given_traceparent_on_without_opentelemetry(
    settings: Settings, monkeypatch
) -> None:
    monkeypatch.setattr(tracing, "_otel", None)
    with RequestPublisher(settings) as publisher:
        request_id = publisher.publish(user_id="ann", prompt="a fox", traceparent=TRACEPARENT)
        with pytest.raises(InvalidMessage, match="traceparent"):
            publisher.publish(user_id="ann", prompt="a fox", traceparent="00-nonsense")
    assert published_headers(settings, request_id) == {"traceparent": TRACEPARENT}


# ---- through real processes ---------------------------------------------------------------


def test_a_traced_request_is_measured_and_logged_from_client_to_result(
    isolated_stack: Settings, tmp_path: Path, spans
) -> None:
    from opentelemetry import trace

    launcher = tmp_path / "traced.py"
    launcher.write_text(TRACED_LAUNCHER)
    worker_spans = tmp_path / "worker-spans.jsonl"
    port = free_port()
    env = {**settings_env(isolated_stack), "IMAGEGEN_METRICS_HOST": "127.0.0.1"}
    services = [
        Service(["processor"], env, tmp_path / "processor.log"),
        Service(
            [str(worker_spans), "worker", "--device", "cpu", "--metrics-port", str(port)],
            env,
            tmp_path / "worker.log",
            launcher,
        ),
    ]
    for service in services:
        service.start()
    try:
        with (
            trace.get_tracer("tests").start_as_current_span("client") as client,
            RequestPublisher(isolated_stack) as publisher,
        ):
            good = [
                publisher.publish(user_id="ann", prompt=f"a kite {i}", **SMALL) for i in range(3)
            ]
            bad = publisher.publish(user_id="ann", prompt="x", model="no-such-model", **SMALL)
        results = {
            decode(GenerationResult, m.value()).request_id: m
            for m in read_topic(isolated_stack, RESULTS, lambda ms: len(ms) >= 4, timeout_s=180)
        }
        # Finished work leaves the in-flight gauge; the lag poller runs beside the worker.
        metrics = scrape_until(
            port,
            lambda m: (
                m.get(("imagegen_in_flight_requests", ())) == 0
                and any(name == "imagegen_consumer_lag" for name, _ in m)
            ),
        )
    finally:
        for service in services:
            service.stop()

    trace_id = f"{client.get_span_context().trace_id:032x}"
    recorded = [json.loads(line) for line in worker_spans.read_text().splitlines()]
    rendered = {s["attributes"]["imagegen.request_id"]: s for s in recorded}
    admitted = {
        decode(GenerationRequest, m.value()).request_id: dict(m.headers())
        for m in read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= 4)
    }
    for request_id in [*good, bad]:
        span = rendered[request_id]
        incoming = admitted[request_id]["traceparent"].decode()
        assert incoming.split("-")[1] == trace_id  # the client's trace, through the processor
        assert span["parent_id"] == "0x" + incoming.split("-")[2]
        outgoing = dict(results[request_id].headers())["traceparent"].decode()
        context = span["context"]
        assert outgoing.split("-")[1:3] == [context["trace_id"][2:], context["span_id"][2:]]
    assert rendered[bad]["status"]["status_code"] == "ERROR"
    (letter,) = read_topic(isolated_stack, DLQ, lambda ms: len(ms) >= 1)
    assert dict(letter.headers())["traceparent"] == admitted[bad]["traceparent"]

    assert metrics[("imagegen_records_consumed_total", (("topic", RENDER),))] == 4
    assert metrics[("imagegen_records_produced_total", (("topic", RESULTS),))] == 4
    assert metrics[("imagegen_records_produced_total", (("topic", DLQ),))] == 1
    assert metrics[("imagegen_dlq_records_total", (("stage", "render"),))] == 1
    assert metrics[("imagegen_render_batch_size_sum", ())] == 3
    assert metrics[("imagegen_render_seconds_count", ())] >= 1
    assert metrics[("imagegen_render_seconds_sum", ())] > 0
    assert metrics[("imagegen_encode_seconds_count", ())] == 3
    assert metrics[("imagegen_upload_seconds_count", ())] == 3
    lags = {labels: v for (name, labels), v in metrics.items() if name == "imagegen_consumer_lag"}
    assert {dict(labels)["group"] for labels in lags} == set(WORKER_GROUPS.values())
    assert all(0 <= lag <= 4 for lag in lags.values())
    assert not any(name.startswith("imagegen_gpu_") for name, _ in metrics)  # no CUDA here

    lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    for request_id in good:
        (done,) = [
            line
            for line in lines
            if line.get("request_id") == request_id and "succeeded" in line["message"]
        ]
        assert done["trace_id"] == trace_id
    (failed,) = [
        line for line in lines if line.get("request_id") == bad and line["level"] == "error"
    ]
    assert failed["stage"] == "render"


def test_without_opentelemetry_the_worker_carries_the_traceparent_on(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    launcher = tmp_path / "untraced.py"
    launcher.write_text(UNTRACED_LAUNCHER)
    requests = [
        GenerationRequest.new(user_id="bo", prompt=f"a fern {i}", **SMALL) for i in range(2)
    ]
    trace_context = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"v=1")]
    producer = make_producer(isolated_stack)
    producer.produce(
        RENDER, key=requests[0].kafka_key, value=encode(requests[0]), headers=trace_context
    )
    producer.produce(RENDER, key=requests[1].kafka_key, value=encode(requests[1]))
    assert producer.flush(30) == 0

    worker = Service(
        ["worker", "--device", "cpu"], settings_env(isolated_stack), tmp_path / "w.log", launcher
    )
    worker.start()
    try:
        results = {
            decode(GenerationResult, m.value()).request_id: m
            for m in read_topic(isolated_stack, RESULTS, lambda ms: len(ms) >= 2, timeout_s=180)
        }
    finally:
        worker.stop()
    traced, untraced = (results[r.request_id] for r in requests)
    assert decode(GenerationResult, traced.value()).status is Status.SUCCEEDED
    assert traced.headers() == trace_context
    assert untraced.headers() is None
    lines = [json.loads(line) for line in (tmp_path / "w.log").read_text().splitlines()]
    about = [line for line in lines if line.get("request_id") == requests[0].request_id]
    assert about and all(line["trace_id"] == TRACEPARENT.split("-")[1] for line in about)


def scrape_until(port: int, ready, timeout_s: float = 60) -> dict:
    """The worker's samples by (name, sorted labels), once `ready(samples)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except urllib.error.URLError as exc:
            # A loaded machine may start the process after the test asked for its metrics.
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            assert time.monotonic() < deadline, f"nothing serves metrics on port {port}"
            time.sleep(0.2)
            continue
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, f"metrics never got ready:\n{text}"
        time.sleep(0.2)  # another process's gauges offer no notification


def _traceparent(span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_the_processor_counts_its_decisions_and_answers_within_the_trace(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **settings_env(isolated_stack),
        "IMAGEGEN_METRICS_HOST": "127.0.0.1",
        "IMAGEGEN_RATE_USER_BURST": "1",
        "IMAGEGEN_RATE_USER_PER_S": "0.001",
    }
    processor = Service(["processor", "--metrics-port", str(port)], env, tmp_path / "p.log")
    processor.start()
    try:
        first = GenerationRequest.new(user_id="cy", prompt="a lamp", idempotency_key="k1")
        with RequestPublisher(isolated_stack) as publisher:
            publisher.publish(first)
            publisher.publish(first)  # a publish retry
            duplicate = publisher.publish(
                user_id="cy", prompt="a lamp", idempotency_key="k1", traceparent=TRACEPARENT
            )
            limited = publisher.publish(user_id="cy", prompt="a desk", traceparent=TRACEPARENT)
        producer = make_producer(isolated_stack)
        producer.produce(REQUESTS, key=b"cy", value=b"\xff not json")
        assert producer.flush(30) == 0
        # Sends are counted once acknowledged, after their whole batch is decided: wait for
        # the last of them (one admission, two answers).
        metrics = scrape_until(
            port,
            lambda m: (
                m.get(("imagegen_records_produced_total", (("topic", RENDER),))) == 1
                and m.get(("imagegen_records_produced_total", (("topic", RESULTS),))) == 2
                and m.get(("imagegen_dlq_records_total", (("stage", "validate"),))) == 1
            ),
        )
    finally:
        processor.stop()

    outcomes = {
        dict(labels)["outcome"]: value
        for (name, labels), value in metrics.items()
        if name == "imagegen_intake_requests_total"
    }
    assert outcomes == {
        "admitted": 1,
        "publish_retry": 1,
        "duplicate": 1,
        "rejected": 1,
        "invalid": 1,
    }
    assert metrics[("imagegen_records_consumed_total", (("topic", REQUESTS),))] == 5

    answers = {
        decode(GenerationResult, m.value()).request_id: m
        for m in read_topic(isolated_stack, RESULTS, lambda ms: len(ms) >= 2)
    }
    # The answer continues the trace the request carried (a child of TRACEPARENT's span
    # where an OpenTelemetry SDK records the publisher's spans).
    published = {
        decode(GenerationRequest, m.value()).request_id: dict(m.headers() or [])
        for m in read_topic(isolated_stack, REQUESTS, lambda ms: len(ms) >= 5)
        if m.value().startswith(b"{")
    }
    for request_id in (duplicate, limited):
        sent = published[request_id]["traceparent"]
        assert sent.decode().split("-")[1] == TRACEPARENT.split("-")[1]
        assert dict(answers[request_id].headers())["traceparent"] == sent

    lines = [json.loads(line) for line in (tmp_path / "p.log").read_text().splitlines()]
    (invalid,) = [line for line in lines if line["message"].startswith("dead-lettered")]
    assert (invalid["stage"], invalid["topic"], invalid["level"]) == (
        "validate",
        REQUESTS,
        "warning",
    )


def test_the_processor_spans_its_decision_within_the_request_trace(
    isolated_stack: Settings, tmp_path: Path
) -> None:
    launcher = tmp_path / "traced.py"
    launcher.write_text(TRACED_LAUNCHER)
    processor_spans = tmp_path / "processor-spans.jsonl"
    processor = Service(
        [str(processor_spans), "processor"],
        settings_env(isolated_stack),
        tmp_path / "p.log",
        launcher,
    )
    processor.start()
    try:
        with RequestPublisher(isolated_stack) as publisher:
            traced = publisher.publish(user_id="di", prompt="a boat", traceparent=TRACEPARENT)
        # Straight to the topic: no publisher (nor its SDK, if a test set one) adds a trace.
        bare = GenerationRequest.new(user_id="di", prompt="a bell")
        producer = make_producer(isolated_stack)
        producer.produce(REQUESTS, key=bare.kafka_key, value=encode(bare))
        assert producer.flush(30) == 0
        admitted = {
            decode(GenerationRequest, m.value()).request_id: dict(m.headers())
            for m in read_topic(isolated_stack, RENDER, lambda ms: len(ms) >= 2)
        }
    finally:
        processor.stop()  # flushes nothing: each span is written as it ends

    recorded = [json.loads(line) for line in processor_spans.read_text().splitlines()]
    spans = {s["attributes"]["imagegen.request_id"]: s for s in recorded}
    assert bare.request_id not in spans  # no trace, no span
    span = spans[traced]
    assert (span["name"], span["attributes"]["imagegen.outcome"]) == ("imagegen.intake", "admitted")
    # The child of the request's trace, and the parent of what the processor produced.
    assert span["context"]["trace_id"][2:] == TRACEPARENT.split("-")[1]
    forwarded = admitted[traced]["traceparent"].decode().split("-")
    assert forwarded[1:3] == [span["context"]["trace_id"][2:], span["context"]["span_id"][2:]]
    assert "traceparent" not in admitted[bare.request_id]
