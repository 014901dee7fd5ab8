"""The services' metrics (publisher/metrics.py, subscriber/metrics.py): what each call records,
read back through an in-memory metric reader."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from publisher.metrics import PublisherMetrics
from subscriber.metrics import DeliveryMetrics
from tests.fixtures.telemetry import metric_points


@pytest.fixture
def publisher_metrics(metric_meter) -> PublisherMetrics:
    return PublisherMetrics(metric_meter)


@pytest.fixture
def delivery_metrics(metric_meter) -> DeliveryMetrics:
    return DeliveryMetrics(metric_meter)


def _sum(points, **attributes) -> float:
    return sum(
        p.value for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())
    )


def test_outcome_counters(
    publisher_metrics: PublisherMetrics,
    delivery_metrics: DeliveryMetrics,
    metric_reader: InMemoryMetricReader,
) -> None:
    publisher_metrics.accepted()
    publisher_metrics.accepted()
    delivery_metrics.delivered(latency_seconds=1.5, attempt=1)
    delivery_metrics.bounced(reply_code=550, enhanced_status="5.1.1")
    delivery_metrics.dead_lettered()

    points = metric_points(metric_reader)

    assert _sum(points["mailpipe.mails.accepted"]) == 2
    assert _sum(points["mailpipe.mails.delivered"]) == 1
    assert _sum(points["mailpipe.mails.dead_lettered"]) == 1
    (bounced,) = points["mailpipe.mails.bounced"]
    assert dict(bounced.attributes) == {
        "smtp.reply.code": 550,
        "smtp.reply.enhanced_status": "5.1.1",
    }


def test_deferred_counts_by_reply_code(
    delivery_metrics: DeliveryMetrics, metric_reader: InMemoryMetricReader
) -> None:
    delivery_metrics.deferred(reply_code=451, enhanced_status="4.3.0")
    delivery_metrics.deferred(reply_code=451, enhanced_status="4.3.0")
    delivery_metrics.deferred(reply_code=421, enhanced_status=None)
    delivery_metrics.deferred(reply_code=None, enhanced_status=None)  # connection refused

    points = metric_points(metric_reader)["mailpipe.mails.deferred"]

    assert _sum(points, **{"smtp.reply.code": 451, "smtp.reply.enhanced_status": "4.3.0"}) == 2
    assert _sum(points, **{"smtp.reply.code": 421}) == 1
    assert [dict(p.attributes) for p in points if p.value == 1 and not p.attributes] == [{}]


def test_unrecognised_enhanced_status_is_collapsed(
    delivery_metrics: DeliveryMetrics, metric_reader: InMemoryMetricReader
) -> None:
    delivery_metrics.deferred(reply_code=451, enhanced_status="try again later, friend")

    (point,) = metric_points(metric_reader)["mailpipe.mails.deferred"]

    assert point.attributes["smtp.reply.enhanced_status"] == "other"


def test_histograms(delivery_metrics: DeliveryMetrics, metric_reader: InMemoryMetricReader) -> None:
    delivery_metrics.delivered(latency_seconds=0.2, attempt=1)
    delivery_metrics.delivered(latency_seconds=700.0, attempt=3)
    delivery_metrics.smtp_step("data", 0.03, reply_code=250)
    delivery_metrics.smtp_step("rcpt to", 0.01, reply_code=250)
    delivery_metrics.delivery_attempts(3)

    points = metric_points(metric_reader)

    latency = {
        p.attributes["mailpipe.first_attempt"]: p for p in points["mailpipe.delivery.latency"]
    }
    assert latency[True].sum == pytest.approx(0.2)
    assert latency[False].sum == pytest.approx(700.0)
    steps = {p.attributes["smtp.step"]: p for p in points["mailpipe.smtp.step.duration"]}
    assert set(steps) == {"data", "rcpt to"}
    assert steps["data"].attributes["smtp.reply.code"] == 250
    assert steps["data"].sum == pytest.approx(0.03)
    (attempts,) = points["mailpipe.delivery.attempts"]
    assert (attempts.count, attempts.sum) == (1, 3)


def test_oldest_undelivered_gauge_reads_the_registered_source(
    publisher_metrics: PublisherMetrics, metric_reader: InMemoryMetricReader
) -> None:
    assert "mailpipe.oldest_undelivered_age" not in metric_points(metric_reader)

    publisher_metrics.set_oldest_undelivered_source(lambda: 42.0)
    (point,) = metric_points(metric_reader)["mailpipe.oldest_undelivered_age"]
    assert point.value == 42.0

    publisher_metrics.set_oldest_undelivered_source(lambda: None)  # nothing pending: no point
    assert "mailpipe.oldest_undelivered_age" not in metric_points(metric_reader)


def test_a_failing_gauge_source_does_not_stop_other_metrics(
    publisher_metrics: PublisherMetrics, metric_reader: InMemoryMetricReader
) -> None:
    def broken() -> float:
        raise RuntimeError("record unavailable")

    publisher_metrics.set_oldest_undelivered_source(broken)
    publisher_metrics.accepted()

    points = metric_points(metric_reader)

    assert _sum(points["mailpipe.mails.accepted"]) == 1
    assert "mailpipe.oldest_undelivered_age" not in points


def test_exemplars_carry_the_trace_of_a_sampled_span(
    publisher_metrics: PublisherMetrics,
    delivery_metrics: DeliveryMetrics,
    metric_reader: InMemoryMetricReader,
) -> None:
    """SDK 1.45's default exemplar filter is trace_based: a measurement made inside a sampled span
    keeps that span's trace id; one made inside an unsampled span or outside any span does not."""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("mail deliver") as span:
        delivery_metrics.deferred(reply_code=451, enhanced_status="4.3.0")
        delivery_metrics.smtp_step("data", 0.02, reply_code=451)
    sampled = span.get_span_context()
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("test").start_as_current_span("x"):
        delivery_metrics.bounced(reply_code=550, enhanced_status="5.1.1")
    publisher_metrics.accepted()

    points = metric_points(metric_reader)

    (deferred,) = points["mailpipe.mails.deferred"]
    assert [(e.trace_id, e.span_id) for e in deferred.exemplars] == [
        (sampled.trace_id, sampled.span_id)
    ]
    (step,) = points["mailpipe.smtp.step.duration"]
    assert {e.trace_id for e in step.exemplars} == {sampled.trace_id}
    (bounced,) = points["mailpipe.mails.bounced"]
    assert bounced.exemplars == []
    (accepted,) = points["mailpipe.mails.accepted"]
    assert accepted.exemplars == []


def test_metric_points_helper_is_empty_before_anything_is_recorded() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    PublisherMetrics(provider.get_meter("t"))
    DeliveryMetrics(provider.get_meter("t"))
    try:
        assert metric_points(reader) == {}
    finally:
        provider.shutdown()


def test_stuck_gauge_reports_each_kind_from_the_registered_source(
    publisher_metrics: PublisherMetrics, metric_reader: InMemoryMetricReader
) -> None:
    assert "mailpipe.mails.stuck" not in metric_points(metric_reader)

    publisher_metrics.set_stuck_source(
        lambda: {"expired_reservation": 2, "stalled_delivery": 0, "unconfirmed": 1}
    )
    points = metric_points(metric_reader)["mailpipe.mails.stuck"]
    assert {p.attributes["mailpipe.stuck.kind"]: p.value for p in points} == {
        "expired_reservation": 2,
        "stalled_delivery": 0,
        "unconfirmed": 1,
    }

    publisher_metrics.set_stuck_source(lambda: None)  # the record cannot tell: no point, no zero
    assert "mailpipe.mails.stuck" not in metric_points(metric_reader)

    def broken() -> dict[str, int]:
        raise RuntimeError("record unavailable")

    publisher_metrics.set_stuck_source(broken)
    publisher_metrics.accepted()
    points = metric_points(metric_reader)
    assert "mailpipe.mails.stuck" not in points
    assert _sum(points["mailpipe.mails.accepted"]) == 1
