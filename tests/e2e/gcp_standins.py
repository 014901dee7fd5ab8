"""Run a service as its container does on Cloud Run, with stand-ins for Google's telemetry APIs.

    python -m tests.e2e.gcp_standins publisher|subscriber RECORDING

Cloud Trace and Cloud Monitoring cannot be reached from tests, so this is a fake at that boundary
and nowhere else: the service runs its real entry point (gunicorn, ``build_app`` /
``build_push_app``, ``MAILPIPE_TRACES=gcp`` with the real Google exporters), and only the
exporters' API clients (``TraceServiceClient``, ``MetricServiceClient``) are replaced by the
recorders below. Each API call is appended to RECORDING as one JSON line the moment it is made,
so a test can read what has left the process even while the process is stopped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from mailpipe.config import TelemetryConfig
from mailpipe.serving import serve_wsgi
from mailpipe.telemetry import Telemetry, setup_telemetry
from publisher.config import PublisherConfig
from subscriber.config import SubscriberConfig

PROJECT = "mailpipe-test"


class _Recording:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"pid": os.getpid(), **entry}) + "\n"
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write(line)


class RecordingTraceClient:
    """Stands in for google.cloud.trace_v2.TraceServiceClient: one line per BatchWriteSpans."""

    def __init__(self, recording: _Recording) -> None:
        self._recording = recording

    def batch_write_spans(self, request: Any = None, **_: Any) -> None:
        self._recording.write(
            {
                "api": "BatchWriteSpans",
                "spans": [
                    {"name": span.display_name.value, "trace_id": span.name.split("/")[3]}
                    for span in request.spans
                ],
            }
        )


class RecordingMetricClient:
    """Stands in for google.cloud.monitoring_v3.MetricServiceClient: one line per
    CreateTimeSeries, with each series' metric type, labels, resource and point."""

    def __init__(self, recording: _Recording) -> None:
        self._recording = recording

    def common_project_path(self, project: str) -> str:
        return f"projects/{project}"

    def create_metric_descriptor(self, request: Any = None, **_: Any) -> Any:
        return request.metric_descriptor

    def create_time_series(self, request: Any = None, **_: Any) -> None:
        series = []
        for ts in request.time_series:
            (point,) = ts.points
            value = point.value
            series.append(
                {
                    "type": ts.metric.type,
                    "labels": dict(ts.metric.labels),
                    "resource": {"type": ts.resource.type, **dict(ts.resource.labels)},
                    "int64": value.int64_value,
                }
            )
        self._recording.write({"api": "CreateTimeSeries", "series": series})


def standin_telemetry(config: TelemetryConfig, recording: Path) -> Telemetry:
    """gcp-mode telemetry whose Google API clients are the recorders."""
    target = _Recording(recording)
    return setup_telemetry(
        config,
        project_id=PROJECT,
        cloud_trace_client=RecordingTraceClient(target),
        cloud_monitoring_client=RecordingMetricClient(target),
    )


def main(service: str, recording: Path) -> None:
    # Imported here: each service's image holds only its own package.
    if service == "publisher":
        from publisher.main import build_app

        publisher = PublisherConfig.from_env(os.environ)
        serve_wsgi(
            lambda: build_app(
                publisher, telemetry=standin_telemetry(publisher.telemetry, recording)
            ),
            host=publisher.host,
            port=publisher.port,
        )
    else:
        from subscriber.main import build_push_app

        subscriber = SubscriberConfig.from_env(os.environ, push=True)
        serve_wsgi(
            lambda: build_push_app(
                subscriber, telemetry=standin_telemetry(subscriber.telemetry, recording)
            ),
            host=subscriber.host,
            port=subscriber.port,
        )


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
