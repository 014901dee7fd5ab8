"""Telemetry that survives Cloud Run: the services as processes, paused the way Cloud Run
throttles them.

With request-based billing Cloud Run throttles an instance's CPU as soon as it has no request in
flight: whatever the process has not exported by the time its answer is sent waits for the next
request, or is lost. So each test stops the service's whole process group (SIGSTOP) the moment
the answer arrives, reads what the telemetry backends have received, and lets it go on
(SIGCONT). The batch span processor's timer is set far beyond the test
(``OTEL_BSP_SCHEDULE_DELAY``), so a span that arrived was sent by the request's own flush.

Cloud Trace and Cloud Monitoring are the one fake here (they cannot be reached from tests): the
services run their real entry points in gcp mode with the real Google exporters, whose API
clients are replaced by recorders (tests/e2e/gcp_standins.py) that write each API call to a file
as it happens.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from emulator import RunningEmulator
from emulator.pipeline import ServiceProcess, start_service
from emulator.process import free_port
from emulator.smtp import LocalSmtpServer
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.topology import Topology

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MAILPIPE_", "OTEL_", "K_")) and key != "PUBSUB_EMULATOR_HOST"
    }
    env.update(
        PYTHONPATH=str(REPO),
        PORT=str(port),
        GOOGLE_CLOUD_PROJECT="mailpipe-test",
        MAILPIPE_TRACES="gcp",
        MAILPIPE_RECORD=f"sqlite:///{tmp_path / 'record.sqlite3'}",
        # Only the request's own flush may export spans during the test.
        OTEL_BSP_SCHEDULE_DELAY="600000",
        # What Cloud Run sets; the metadata server is unreachable (a closed loopback port as
        # proxy: the resource detector's request is refused at once, nothing leaves the machine).
        K_SERVICE="mailpipe-test-service",
        K_REVISION="mailpipe-test-service-00001-abc",
        K_CONFIGURATION="mailpipe-test-service",
        HTTP_PROXY=f"http://127.0.0.1:{_closed_port()}",
    )
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        env.pop(name, None)
    return env


class Recording:
    """The API calls the stand-in Google clients received (tests/e2e/gcp_standins.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def calls(self, api: str) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [entry for entry in map(json.loads, lines) if entry["api"] == api]

    def spans(self) -> list[dict[str, Any]]:
        return [span for call in self.calls("BatchWriteSpans") for span in call["spans"]]

    def series(self) -> list[dict[str, Any]]:
        return [series for call in self.calls("CreateTimeSeries") for series in call["series"]]


@contextmanager
def cloud_run_instance(
    service: str, env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[ServiceProcess, Recording]]:
    recording = Recording(tmp_path / f"{service}-google-apis.jsonl")
    process = start_service(
        service,
        ["tests.e2e.gcp_standins", service, str(recording.path)],
        env=env,
        log_dir=tmp_path / "logs",
        health_url=f"http://127.0.0.1:{env['PORT']}/healthz",
    )
    try:
        process.wait_healthy(60)
        yield process, recording
    finally:
        process.signal(signal.SIGCONT)
        process.stop()


@contextmanager
def throttled_after_answer(process: ServiceProcess) -> Iterator[None]:
    """The instance's CPU taken away (as Cloud Run does once no request is in flight)."""
    process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.signal(signal.SIGCONT)


def _distinct(series: list[dict[str, Any]]) -> Counter[str]:
    return Counter(
        json.dumps([s["type"], s["labels"], s["resource"]], sort_keys=True) for s in series
    )


def _push_envelope(subject: str) -> dict[str, Any]:
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["b@example.org"], "subject": subject, "text": "t"}
        )
    )
    data, attributes = mail.to_pubsub()
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": subject,
        },
        "subscription": "projects/mailpipe-test/subscriptions/mailpipe-delivery",
    }


def test_subscriber_pushes_export_their_spans_before_answering_and_metrics_only_at_shutdown(
    tmp_path: Path, smtp_server: LocalSmtpServer
) -> None:
    port = free_port()
    env = _service_env(tmp_path, port)
    env.update(
        PUBSUB_EMULATOR_HOST="127.0.0.1:1",  # local mode: no token (push auth is tested apart)
        MAILPIPE_SMTP_TLS="none",
        MAILPIPE_SMTP_PORT=str(smtp_server.port),
    )
    with cloud_run_instance("subscriber", env, tmp_path) as (process, recording):
        for number in range(1, REQUESTS + 1):
            envelope = _push_envelope(f"push {number}")
            answer = httpx.post(f"http://127.0.0.1:{port}/", json=envelope, timeout=30)
            with throttled_after_answer(process):
                assert answer.status_code == 204, answer.text
                # One Cloud Trace write per push, holding all of its spans...
                assert len(recording.calls("BatchWriteSpans")) == number
                names = Counter(span["name"] for span in recording.spans())
                assert names["mail deliver"] == number and names["smtp data"] == number
                # ...and no Cloud Monitoring write at all: metrics keep their 60 s period.
                assert recording.calls("CreateTimeSeries") == []
        assert len(smtp_server.wait_for(REQUESTS)) == REQUESTS

        assert process.stop() == 0  # SIGTERM, as Cloud Run stops an instance

    series = recording.series()
    assert series, "the metrics go out once at shutdown"
    assert max(_distinct(series).values()) == 1, "one point per time series"
    (delivered,) = [s for s in series if s["type"].endswith("/mailpipe.mails.delivered")]
    assert delivered["int64"] == REQUESTS
    assert delivered["resource"]["type"] == "generic_task"  # a series of this instance only


def test_publisher_root_span_is_exported_before_the_202_leaves(
    tmp_path: Path,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
) -> None:
    """The request's own root span (Flask's, ended at Flask's teardown) and the Pub/Sub client's
    create span are in Cloud Trace by the time the client has its 202."""
    port = free_port()
    env = _service_env(tmp_path, port)
    env.update(
        PUBSUB_EMULATOR_HOST=pubsub_emulator.host,
        GOOGLE_CLOUD_PROJECT=pubsub_project,
        MAILPIPE_TOPIC=mail_topology.mail_topic.name,
    )
    mail = {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
    with cloud_run_instance("publisher", env, tmp_path) as (process, recording):
        for _ in range(REQUESTS):
            writes_before = len(recording.calls("BatchWriteSpans"))  # the health checks' spans
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/messages", json=mail, timeout=30)
            with throttled_after_answer(process):
                assert answer.status_code == 202, answer.text
                trace_id = answer.json()["trace_id"]
                in_trace = {s["name"] for s in recording.spans() if s["trace_id"] == trace_id}
                assert "POST /v1/messages" in in_trace
                assert f"{mail_topology.mail_topic.name} create" in in_trace
                assert len(recording.calls("BatchWriteSpans")) == writes_before + 1
                assert recording.calls("CreateTimeSeries") == []

        assert process.stop() == 0

    (accepted,) = [s for s in recording.series() if s["type"].endswith("/mailpipe.mails.accepted")]
    assert accepted["int64"] == REQUESTS
    assert max(_distinct(recording.series()).values()) == 1
