"""gcp mode: Cloud Trace and Cloud Monitoring exporters, with Cloud Run's resource attributes.

Cloud Trace, Cloud Monitoring and the metadata server are unreachable here, so the fakes sit at
their client boundaries: the exporters get recording stand-ins for ``TraceServiceClient`` and
``MetricServiceClient`` (the exporters' own ``client=`` parameter), and the resource detector's
HTTP requests go through ``HTTP_PROXY`` to a server on 127.0.0.1 that either answers as the
metadata server would, or is closed (the metadata server is unreachable).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter
from opentelemetry.resourcedetector.gcp_resource_detector import _metadata

from mailpipe.config import TelemetryConfig
from mailpipe.telemetry import Telemetry, detect_gcp_resource, setup_telemetry
from publisher.metrics import PublisherMetrics
from subscriber.metrics import DeliveryMetrics
from tests.fixtures.http import QuietJsonHandler

# Both Google exporters warn that they are deprecated in favour of Google's OTLP endpoint
# (telemetry.googleapis.com); mailpipe keeps them for now, see mailpipe/telemetry.py.
pytestmark = [
    pytest.mark.filterwarnings("ignore:CloudTraceSpanExporter is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:CloudMonitoringMetricsExporter is deprecated:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore:Deprecated since version 1.4.0:DeprecationWarning"),
]

PROJECT = "mailpipe-test"
CLOUD_RUN_ENV = {
    "K_SERVICE": "mailpipe-subscriber",
    "K_REVISION": "mailpipe-subscriber-00042-abc",
    "K_CONFIGURATION": "mailpipe-subscriber",
}


class RecordingTraceClient:
    """Stands in for google.cloud.trace_v2.TraceServiceClient (Cloud Trace is unreachable)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def batch_write_spans(self, request: Any) -> None:
        self.requests.append(request)


class RecordingMetricClient:
    """Stands in for google.cloud.monitoring_v3.MetricServiceClient (unreachable here)."""

    def __init__(self) -> None:
        self.time_series: list[Any] = []

    def common_project_path(self, project: str) -> str:
        return f"projects/{project}"

    def create_metric_descriptor(self, request: Any) -> Any:
        return request.metric_descriptor

    def create_time_series(self, request: Any) -> None:
        self.time_series.extend(request.time_series)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _MetadataServer(ThreadingHTTPServer):
    """Answers the detector's proxied requests as the metadata server on Cloud Run does."""

    METADATA = {
        "instance": {
            "id": "00bf4bf02d4e0c1b",
            "region": "projects/123456789/regions/europe-west1",
            "zone": "projects/123456789/zones/europe-west1-1",
        },
        "project": {"projectId": PROJECT},
    }

    def __init__(self) -> None:
        class Handler(QuietJsonHandler):
            def do_GET(self) -> None:
                # Through a proxy the request line holds the absolute URL.
                ok = self.path.startswith("http://metadata.google.internal/computeMetadata/v1/")
                if not ok or self.headers.get("Metadata-Flavor") != "Google":
                    self.send_error(403)
                    return
                self.send_json(_MetadataServer.METADATA)

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def cloud_run_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in CLOUD_RUN_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    # The detector caches the metadata server's answers for the process's life.
    _metadata.is_available.cache_clear()
    _metadata.get_metadata.cache_clear()
    yield
    _metadata.is_available.cache_clear()
    _metadata.get_metadata.cache_clear()


@pytest.fixture
def metadata_unreachable(cloud_run_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed loopback port as proxy: the detector's request is refused at once, and nothing
    # leaves the machine (not even a DNS query for metadata.google.internal).
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_free_port()}")


@pytest.fixture
def metadata_server(cloud_run_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server = _MetadataServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()
    thread.join(5)


def _labels(span: Any) -> dict[str, str]:
    return {key: value.string_value.value for key, value in span.attributes.attribute_map.items()}


def _gcp_telemetry(
    built_telemetry: list[Telemetry],
) -> tuple[Telemetry, RecordingTraceClient, RecordingMetricClient]:
    trace_client, metric_client = RecordingTraceClient(), RecordingMetricClient()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="mailpipe-subscriber", traces="gcp"),
        set_global=False,
        project_id=PROJECT,
        cloud_trace_client=trace_client,
        cloud_monitoring_client=metric_client,
    )
    built_telemetry.append(telemetry)
    return telemetry, trace_client, metric_client


def test_gcp_mode_exports_to_cloud_trace_with_cloud_run_attributes(
    built_telemetry: list[Telemetry], metadata_server: None
) -> None:
    telemetry, trace_client, _ = _gcp_telemetry(built_telemetry)

    with telemetry.tracer("t").start_as_current_span("mail deliver") as span:
        span.set_attribute("mailpipe.mail_id", "m-1")
    telemetry.force_flush()

    (request,) = trace_client.requests
    assert request.name == f"projects/{PROJECT}"
    (exported,) = request.spans
    assert exported.display_name.value == "mail deliver"
    labels = _labels(exported)
    assert labels["mailpipe.mail_id"] == "m-1"
    assert labels["service.name"] == "mailpipe-subscriber"
    assert labels["cloud.platform"] == "gcp_cloud_run"
    assert labels["faas.name"] == "mailpipe-subscriber"
    assert labels["faas.version"] == "mailpipe-subscriber-00042-abc"
    assert labels["cloud.region"] == "europe-west1"
    assert labels["faas.instance"] == "00bf4bf02d4e0c1b"


def test_gcp_mode_selects_the_cloud_trace_exporter(
    built_telemetry: list[Telemetry], metadata_unreachable: None
) -> None:
    telemetry, _, _ = _gcp_telemetry(built_telemetry)

    processors = telemetry.tracer_provider._active_span_processor._span_processors
    exporters = [p.span_exporter for p in processors]

    assert [type(e) for e in exporters] == [CloudTraceSpanExporter]


def test_without_the_metadata_server_cloud_run_attributes_come_from_its_env_vars(
    built_telemetry: list[Telemetry], metadata_unreachable: None
) -> None:
    telemetry, trace_client, _ = _gcp_telemetry(built_telemetry)

    with telemetry.tracer("t").start_as_current_span("mail deliver"):
        pass
    telemetry.force_flush()

    labels = _labels(trace_client.requests[0].spans[0])
    assert labels["cloud.platform"] == "gcp_cloud_run"
    assert labels["faas.name"] == "mailpipe-subscriber"
    assert labels["faas.version"] == "mailpipe-subscriber-00042-abc"
    assert "cloud.region" not in labels  # only the metadata server knows it


def test_gcp_mode_exports_metrics_to_cloud_monitoring(
    built_telemetry: list[Telemetry], metadata_unreachable: None
) -> None:
    telemetry, _, metric_client = _gcp_telemetry(built_telemetry)

    DeliveryMetrics(telemetry.meter).bounced(reply_code=550, enhanced_status="5.1.1")
    telemetry.force_flush()
    assert metric_client.time_series == []  # a flush is for spans; metrics keep their period
    telemetry.shutdown()  # SIGTERM on Cloud Run: the last export

    bounced = [
        series
        for series in metric_client.time_series
        if series.metric.type == "workload.googleapis.com/mailpipe.mails.bounced"
    ]
    assert len(bounced) == 1
    assert bounced[0].metric.labels["smtp_reply_code"] == "550"  # dots become underscores
    assert bounced[0].points[0].value.int64_value == 1


def test_detection_is_bounded_when_the_metadata_server_hangs(
    cloud_run_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listening socket that never answers: the detector's request hangs until its own timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{silent.getsockname()[1]}")

        resource = detect_gcp_resource(timeout=0.2)

    assert resource.attributes["faas.name"] == "mailpipe-subscriber"


def test_outside_cloud_run_nothing_is_detected(
    metadata_unreachable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("K_CONFIGURATION")

    assert dict(detect_gcp_resource(timeout=5).attributes) == {}


def test_gcp_metrics_export_once_a_minute_and_once_at_shutdown(
    built_telemetry: list[Telemetry], metadata_server: None
) -> None:
    """Cloud Monitoring refuses a point written to a series sooner than its sampling period after
    the previous one, so nothing but the reader's period and the shutdown may export metrics."""
    telemetry, trace_client, metric_client = _gcp_telemetry(built_telemetry)
    (reader,) = telemetry.meter_provider._metric_readers
    metrics = DeliveryMetrics(telemetry.meter)

    for _ in range(20):  # twenty requests, each flushing its spans
        with telemetry.tracer("t").start_as_current_span("mail deliver"):
            metrics.delivered(latency_seconds=0.5, attempt=1)
        telemetry.force_flush()

    assert reader._export_interval_millis >= 60_000  # the exporter's guidance: once a minute
    assert len(trace_client.requests) == 20
    assert metric_client.time_series == []
    telemetry.shutdown()
    series = [
        (ts.metric.type, tuple(sorted(ts.metric.labels.items())), ts.resource.type)
        for ts in metric_client.time_series
    ]
    assert len(series) == len(set(series)), "one point per series per export"
    delivered = [ts for ts in metric_client.time_series if ts.metric.type.endswith("delivered")]
    assert delivered[0].points[0].value.int64_value == 20
    # Each instance writes its own series: Cloud Run's instance id becomes the task id.
    assert delivered[0].resource.type == "generic_task"
    assert delivered[0].resource.labels["task_id"] == "00bf4bf02d4e0c1b"


def test_without_the_instance_id_each_process_still_writes_its_own_series(
    built_telemetry: list[Telemetry], metadata_unreachable: None
) -> None:
    telemetry, _, metric_client = _gcp_telemetry(built_telemetry)
    PublisherMetrics(telemetry.meter).accepted()
    telemetry.shutdown()

    (series,) = metric_client.time_series
    assert series.resource.type == "generic_task"  # not generic_node, shared by every instance
    assert re.fullmatch(r"[0-9a-f-]{32,36}", series.resource.labels["task_id"])
