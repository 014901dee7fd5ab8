"""When telemetry leaves the process: spans when the process goes idle, metrics never faster than
Cloud Monitoring accepts per series.

The processes themselves, paused the way Cloud Run throttles them, are in
tests/e2e/test_cloud_run_telemetry.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import Counter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)

from mailpipe.config import TelemetryConfig
from mailpipe.telemetry import IdleSpanFlush, SpacedMetricExporter, idle_span_flush, setup_telemetry

# --- spans: the request that leaves the process idle flushes ------------------------------------


class CountingFlush:
    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> bool:
        self.release.wait(10)
        self.calls += 1
        return True


def test_each_request_alone_on_the_process_flushes_before_it_returns() -> None:
    flush = CountingFlush()
    gate = IdleSpanFlush(flush)

    for expected in (1, 2, 3):
        with gate.request():
            assert flush.calls == expected - 1  # not during the request...
        assert flush.calls == expected  # ...but before it answers


def test_requests_in_flight_together_flush_once_when_the_last_one_leaves() -> None:
    """The CPU stays allocated while any request is in flight: only the last one flushes."""
    flush = CountingFlush()
    gate = IdleSpanFlush(flush)
    inside = threading.Barrier(9)
    leave = threading.Event()

    def request() -> None:
        with gate.request():
            inside.wait(10)
            leave.wait(10)

    workers = [threading.Thread(target=request) for _ in range(8)]
    for worker in workers:
        worker.start()
    inside.wait(10)  # all eight are in flight
    assert flush.calls == 0
    leave.set()
    for worker in workers:
        worker.join(10)

    assert flush.calls == 1


def test_a_hanging_exporter_does_not_hold_the_answer() -> None:
    flush = CountingFlush()
    flush.release.clear()  # the backend does not answer
    gate = IdleSpanFlush(flush, timeout_seconds=0.05)

    with gate.request():
        pass  # returns although the flush has not finished

    assert flush.calls == 0
    flush.release.set()
    assert gate.flush()  # the stuck flush finishes, the next one runs
    assert flush.calls >= 1


def test_a_failing_flush_is_logged_and_the_next_request_flushes_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Cloud Trace unavailable")

    gate = IdleSpanFlush(flaky)
    with gate.request():
        pass
    with gate.request():
        pass

    assert len(calls) == 2
    assert "span flush failed" in caplog.text


@pytest.mark.parametrize(("mode", "flushes"), [("gcp", True), ("otlp", True), ("file", False)])
def test_only_exporters_that_leave_the_machine_get_a_request_flush(
    mode: str, flushes: bool, tmp_path: Any
) -> None:
    config = TelemetryConfig(
        service_name="t",
        traces=mode,
        trace_file=tmp_path / "t.jsonl",  # type: ignore[arg-type]
    )
    telemetry = setup_telemetry(TelemetryConfig(service_name="t", traces="none"), set_global=False)
    try:
        assert (idle_span_flush(config, telemetry) is not None) is flushes
    finally:
        telemetry.shutdown()


# --- metrics: never two writes of a series closer than Cloud Monitoring accepts ------------------


class RecordingExporter(MetricExporter):
    """Stands in for CloudMonitoringMetricsExporter (Cloud Monitoring is unreachable here)."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={Counter: AggregationTemporality.CUMULATIVE})
        self.exports: list[float] = []
        self.now = 0.0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(self.now)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@pytest.fixture
def spaced() -> Iterator[tuple[SpacedMetricExporter, RecordingExporter, list[float]]]:
    inner = RecordingExporter()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        inner.now += seconds

    exporter = SpacedMetricExporter(
        inner,
        min_spacing_seconds=10.0,
        max_delay_seconds=4.0,
        clock=lambda: inner.now,
        sleep=sleep,
    )
    yield exporter, inner, slept


def _data() -> MetricsData:
    return MetricsData(resource_metrics=[])


def test_exports_a_period_apart_go_straight_through(spaced: Any) -> None:
    exporter, inner, slept = spaced
    for now in (0.0, 60.0, 120.0):
        inner.now = now
        exporter.export(_data())

    assert inner.exports == [0.0, 60.0, 120.0]
    assert slept == []


def test_an_export_right_after_another_waits_for_the_spacing_or_is_skipped(spaced: Any) -> None:
    exporter, inner, slept = spaced
    exporter.export(_data())  # a periodic export at t=0

    inner.now = 7.0  # SIGTERM 7 s later: the final export waits 3 s
    exporter.export(_data())
    assert inner.exports == [0.0, 10.0]
    assert slept == [3.0]

    inner.now = 11.0  # 1 s after the last write: waiting 9 s is too long, skipped
    assert exporter.export(_data()) is MetricExportResult.SUCCESS
    assert inner.exports == [0.0, 10.0]


def test_the_wrapper_keeps_the_exporters_temporality() -> None:
    inner = RecordingExporter()
    assert SpacedMetricExporter(inner)._preferred_temporality == inner._preferred_temporality
