"""The local Prometheus endpoint: metrics recorded through Telemetry, scraped over real HTTP."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator

import pytest

from mailpipe.config import TelemetryConfig
from mailpipe.telemetry import Telemetry, TelemetryError, setup_telemetry
from publisher.metrics import PublisherMetrics
from subscriber.metrics import DeliveryMetrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served() -> Iterator[tuple[Telemetry, int]]:
    """A Telemetry serving Prometheus on a free loopback port, and that port."""
    port = _free_port()
    config = TelemetryConfig(service_name="mailpipe-subscriber", metrics_port=port)
    telemetry = setup_telemetry(config, set_global=False)
    yield telemetry, port
    telemetry.shutdown()


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` from the text exposition format, as Prometheus would read it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            pairs = re.findall(r'(\w+)="([^"]*)"', labels)
            samples[(name, frozenset(pairs))] = float(value)
    return samples


def _value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_are_scraped_from_the_prometheus_endpoint(
    served: tuple[Telemetry, int],
) -> None:
    telemetry, port = served
    published, delivery = PublisherMetrics(telemetry.meter), DeliveryMetrics(telemetry.meter)
    published.accepted()
    published.accepted()
    delivery.delivered(latency_seconds=0.3, attempt=1)
    delivery.deferred(reply_code=451, enhanced_status="4.3.0")
    delivery.bounced(reply_code=550, enhanced_status="5.1.1")
    delivery.dead_lettered()
    delivery.smtp_step("data", 0.02, reply_code=250)
    delivery.delivery_attempts(2)
    published.set_oldest_undelivered_source(lambda: 12.5)

    samples = _scrape(port)

    assert _value(samples, "mailpipe_mails_accepted_total") == 2
    assert _value(samples, "mailpipe_mails_delivered_total") == 1
    reply_451 = {"smtp_reply_code": "451", "smtp_reply_enhanced_status": "4.3.0"}
    assert _value(samples, "mailpipe_mails_deferred_total", **reply_451) == 1
    reply_550 = {"smtp_reply_code": "550", "smtp_reply_enhanced_status": "5.1.1"}
    assert _value(samples, "mailpipe_mails_bounced_total", **reply_550) == 1
    assert _value(samples, "mailpipe_mails_dead_lettered_total") == 1
    first = {"mailpipe_first_attempt": "true"}
    assert _value(samples, "mailpipe_delivery_latency_seconds_count", **first) == 1
    assert _value(samples, "mailpipe_delivery_latency_seconds_bucket", le="0.25", **first) == 0
    assert _value(samples, "mailpipe_delivery_latency_seconds_bucket", le="0.5", **first) == 1
    step = {"smtp_step": "data", "smtp_reply_code": "250"}
    assert _value(samples, "mailpipe_smtp_step_duration_seconds_count", **step) == 1
    assert _value(samples, "mailpipe_delivery_attempts_sum") == 2
    assert _value(samples, "mailpipe_oldest_undelivered_age_seconds") == 12.5


def test_the_endpoint_listens_on_loopback_only_and_stops_at_shutdown() -> None:
    port = _free_port()
    telemetry = setup_telemetry(
        TelemetryConfig(service_name="mailpipe-publisher", metrics_port=port), set_global=False
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        telemetry.shutdown()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_port_in_use_is_reported_with_the_variable_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = TelemetryConfig(service_name="mailpipe-publisher", metrics_port=port)

        with pytest.raises(TelemetryError, match="MAILPIPE_METRICS_PORT") as raised:
            setup_telemetry(config, set_global=False)

    assert str(port) in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)
