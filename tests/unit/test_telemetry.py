"""setup_telemetry: exporter per mode, sampling, the global provider, shutdown, no import-time work.

Google's exporters (gcp mode) are tested in test_telemetry_gcp.py; the Prometheus endpoint in
test_metrics_prometheus.py.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailpipe.config import TelemetryConfig
from mailpipe.telemetry import Telemetry, setup_telemetry
from ops.trace_view import read_spans
from publisher.metrics import PublisherMetrics


def _config(**changes) -> TelemetryConfig:
    return TelemetryConfig(service_name=changes.pop("service_name", "mailpipe-test"), **changes)


def _setup(built_telemetry: list[Telemetry], config: TelemetryConfig, **kwargs) -> Telemetry:
    telemetry = setup_telemetry(config, **kwargs)
    built_telemetry.append(telemetry)
    return telemetry


# --- modes ---------------------------------------------------------------------------------------


def test_none_mode_still_gives_spans_ids(built_telemetry: list[Telemetry]) -> None:
    telemetry = _setup(built_telemetry, _config(traces="none"), set_global=False)

    with telemetry.tracer("t").start_as_current_span("POST /v1/messages") as span:
        context = span.get_span_context()

    assert context.is_valid
    assert context.trace_flags.sampled
    assert span.resource.attributes["service.name"] == "mailpipe-test"


def test_file_mode_writes_spans_the_viewer_sees_without_a_flush(
    built_telemetry: list[Telemetry], tmp_path: Path
) -> None:
    path = tmp_path / "nested" / "traces.jsonl"
    telemetry = _setup(built_telemetry, _config(traces="file", trace_file=path), set_global=False)

    with telemetry.tracer("t").start_as_current_span("mail deliver") as span:
        span.set_attribute("mailpipe.mail_id", "m-1")

    deadline = time.monotonic() + 10
    while not read_spans(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = read_spans(path)
    assert (record.name, record.service) == ("mail deliver", "mailpipe-test")
    assert record.attributes == {"mailpipe.mail_id": "m-1"}


def test_shutdown_flushes_the_file_and_is_idempotent(
    built_telemetry: list[Telemetry], tmp_path: Path
) -> None:
    path = tmp_path / "traces.jsonl"
    telemetry = _setup(built_telemetry, _config(traces="file", trace_file=path), set_global=False)
    for index in range(5):
        with telemetry.tracer("t").start_as_current_span(f"span {index}"):
            pass

    telemetry.shutdown()
    telemetry.shutdown()

    assert sorted(r.name for r in read_spans(path)) == [f"span {i}" for i in range(5)]


def test_resource_attributes_are_added_and_service_name_wins(
    built_telemetry: list[Telemetry],
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = _setup(
        built_telemetry,
        _config(traces="none"),
        span_exporter=exporter,
        set_global=False,
        resource_attributes={"deployment.environment": "test", "service.name": "ignored"},
    )

    with telemetry.tracer("t").start_as_current_span("s"):
        pass

    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["deployment.environment"] == "test"
    assert span.resource.attributes["service.name"] == "mailpipe-test"


class _OtlpCollector(ThreadingHTTPServer):
    """A minimal OTLP/HTTP receiver on loopback: keeps every request body by path."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[bytes]] = {}
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.bodies.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def otlp_collector() -> Iterator[_OtlpCollector]:
    server = _OtlpCollector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_otlp_mode_sends_spans_and_metrics_to_the_collector(
    otlp_collector: _OtlpCollector, built_telemetry: list[Telemetry]
) -> None:
    # Fixture order matters: the telemetry is shut down (its last export) before the collector.
    host, port = otlp_collector.server_address[:2]
    endpoint = f"http://{host}:{port}"
    telemetry = _setup(
        built_telemetry, _config(traces="otlp", otlp_endpoint=endpoint), set_global=False
    )

    with telemetry.tracer("t").start_as_current_span("mail deliver"):
        PublisherMetrics(telemetry.meter).accepted()
    telemetry.force_flush()  # spans only
    assert "/v1/metrics" not in otlp_collector.bodies  # metrics go out on their period...
    telemetry.shutdown()  # ...and at shutdown

    (trace_body,) = otlp_collector.bodies["/v1/traces"]
    request = ExportTraceServiceRequest.FromString(trace_body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "mailpipe-test"
    assert [s.name for ss in resource_spans.scope_spans for s in ss.spans] == ["mail deliver"]
    metric_names = {
        metric.name
        for body in otlp_collector.bodies["/v1/metrics"]
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert "mailpipe.mails.accepted" in metric_names


# --- sampling ------------------------------------------------------------------------------------


def _remote_parent(sampled: bool):
    flags = "01" if sampled else "00"
    return extract({"traceparent": f"00-{'a' * 32}-{'b' * 16}-{flags}"})


@pytest.mark.parametrize(
    ("ratio", "parent", "expected"),
    [
        (0.0, None, False),  # a new trace at ratio 0 is dropped
        (1.0, None, True),
        (0.0, True, True),  # the publisher's sampled decision is kept downstream...
        (1.0, False, False),  # ...and so is its "not sampled"
    ],
)
def test_sampling_is_parent_based_ratio(
    built_telemetry: list[Telemetry], ratio: float, parent: bool | None, expected: bool
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = _setup(
        built_telemetry, _config(sample_ratio=ratio), span_exporter=exporter, set_global=False
    )
    context = None if parent is None else _remote_parent(parent)

    with telemetry.tracer("t").start_as_current_span("mail deliver", context=context) as span:
        assert span.get_span_context().is_valid  # ids exist either way, for logs and responses

    assert span.get_span_context().trace_flags.sampled is expected
    assert len(exporter.get_finished_spans()) == int(expected)


def test_sample_ratio_is_applied_to_new_traces(built_telemetry: list[Telemetry]) -> None:
    telemetry = _setup(built_telemetry, _config(sample_ratio=0.25), set_global=False)
    tracer = telemetry.tracer("t")

    sampled = 0
    for _ in range(2000):
        with tracer.start_as_current_span("s") as span:
            sampled += span.get_span_context().trace_flags.sampled

    assert 350 < sampled < 650  # 500 expected; bounds are > 6 standard deviations wide


# --- the global provider and propagator -----------------------------------------------------------


def test_app_spans_carry_the_app_service_and_library_spans_are_exported_once(
    spans: InMemorySpanExporter,
) -> None:
    telemetry = setup_telemetry(_config(service_name="mailpipe-publisher"), span_exporter=spans)
    try:
        # The second span comes from the *global* provider, as google-cloud-pubsub's do.
        with (
            telemetry.tracer("flask").start_as_current_span("POST /v1/messages"),
            trace.get_tracer("google.cloud.pubsub_v1").start_as_current_span("mail create"),
        ):
            pass
    finally:
        telemetry.shutdown()

    finished = [(s.name, s.resource.attributes["service.name"]) for s in spans.get_finished_spans()]
    assert finished == [
        ("mail create", "mailpipe-publisher"),
        ("POST /v1/messages", "mailpipe-publisher"),
    ]


def test_library_spans_are_routed_to_a_telemetry_with_its_own_exporter(
    spans: InMemorySpanExporter,
) -> None:
    own = InMemorySpanExporter()
    telemetry = setup_telemetry(_config(), span_exporter=own)
    library = trace.get_tracer("google.cloud.pubsub_v1")
    with library.start_as_current_span("while running"):
        pass
    telemetry.shutdown()
    with library.start_as_current_span("after shutdown"):
        pass

    # While it runs, the newest telemetry alone gets them; then the ``spans`` fixture's again.
    assert [s.name for s in own.get_finished_spans()] == ["while running"]
    assert [s.name for s in spans.get_finished_spans()] == ["after shutdown"]


def test_the_pubsub_clients_helper_spans_are_not_recorded(spans: InMemorySpanExporter) -> None:
    telemetry = setup_telemetry(_config(), span_exporter=spans)
    library = trace.get_tracer("google.cloud.pubsub_v1")
    try:
        with library.start_as_current_span("mail create", kind=trace.SpanKind.PRODUCER):
            with library.start_as_current_span("publisher batching") as helper:
                assert not helper.is_recording()
            with library.start_as_current_span("mail process"):  # not a helper: recorded
                pass
    finally:
        telemetry.shutdown()

    assert [s.name for s in spans.get_finished_spans()] == ["mail process", "mail create"]


def test_shutdown_leaves_a_borrowed_exporter_usable(spans: InMemorySpanExporter) -> None:
    setup_telemetry(_config(), span_exporter=spans).shutdown()
    second = setup_telemetry(_config(service_name="second"), span_exporter=spans)
    try:
        with second.tracer("t").start_as_current_span("after the first app"):
            pass
    finally:
        second.shutdown()

    assert [s.name for s in spans.get_finished_spans()] == ["after the first app"]


def test_w3c_trace_context_is_the_global_propagator(spans: InMemorySpanExporter) -> None:
    telemetry = setup_telemetry(_config(), span_exporter=spans)
    try:
        with telemetry.tracer("t").start_as_current_span("mail deliver") as span:
            carrier: dict[str, str] = {}
            inject(carrier)
    finally:
        telemetry.shutdown()

    context = span.get_span_context()
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == (
        "00",
        trace.format_trace_id(context.trace_id),
        trace.format_span_id(context.span_id),
    )
    assert int(flags, 16) & 0x01  # sampled (SDK 1.45 also sets 0x02, "random trace id")


_FRESH_PROCESS = textwrap.dedent(
    """
    from pathlib import Path
    import sys
    from opentelemetry import trace
    from mailpipe.config import TelemetryConfig
    from mailpipe.telemetry import setup_telemetry
    from ops.trace_view import read_spans

    out = Path(sys.argv[1])
    first = setup_telemetry(TelemetryConfig("first", traces="file", trace_file=out / "a.jsonl"))
    second = setup_telemetry(TelemetryConfig("second", traces="file", trace_file=out / "b.jsonl"))
    library = trace.get_tracer("google.cloud.pubsub_v1")
    assert trace.get_tracer_provider() not in (first.tracer_provider, second.tracer_provider)
    with library.start_as_current_span("to second"):
        pass
    second.shutdown()
    with library.start_as_current_span("to first"):
        pass
    first.shutdown()
    with library.start_as_current_span("to nobody"):
        pass
    print(sorted(r.name for r in read_spans(out / "a.jsonl")))
    print(sorted(r.name for r in read_spans(out / "b.jsonl")))
    print(sorted({r.service for r in read_spans(out / "a.jsonl")}))
    """
)


def test_in_one_process_library_spans_go_to_the_newest_running_telemetry(tmp_path: Path) -> None:
    """The global provider can be set once per process, so this runs in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['to first']", "['to second']", "['first']"]


def test_importing_the_telemetry_modules_sets_nothing_up() -> None:
    code = textwrap.dedent(
        """
        import threading
        import mailpipe.telemetry, mailpipe.logs, mailpipe.tracefile
        import publisher.metrics, subscriber.metrics
        import ops.cli.trace, ops.trace_view
        from opentelemetry import metrics, trace
        print(type(trace.get_tracer_provider()).__name__)
        print(type(metrics.get_meter_provider()).__name__)
        print(threading.active_count())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ProxyTracerProvider", "_ProxyMeterProvider", "1"]
