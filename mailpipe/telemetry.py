"""One telemetry set-up for both services: traces, metrics and the W3C propagator.

``setup_telemetry(config)`` builds the tracer and meter providers for ``MAILPIPE_TRACES`` (``gcp``,
``otlp``, ``file``: mailpipe/tracefile.py, or ``none``: spans still get ids) and a Prometheus
endpoint with ``MAILPIPE_METRICS_PORT``; nothing happens at import time. Getting spans and metrics
out of Cloud Run: docs/deploy.md ("CPU and telemetry"), docs/observability.md. Errors, translated
in ``_translate`` (an export never raises: the SDK logs a failed one and drops the batch)::

    TelemetryError
    ├── the Prometheus port cannot be bound (OSError)
    ├── gcp mode without Google credentials or project (google.auth DefaultCredentialsError)
    └── any other exporter construction failure
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.propagate import set_global_textmap
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailpipe.config import TelemetryConfig

_log = logging.getLogger(__name__)

METER_NAME = "mailpipe"


class TelemetryError(RuntimeError):
    """Telemetry could not be set up; the message says which setting to change."""


@dataclass
class Telemetry:
    """The providers one service uses. Build it with :func:`setup_telemetry`."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    meter: Meter  # the services' instruments: publisher/metrics.py, subscriber/metrics.py
    _on_shutdown: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _first_shutdown: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The SDK's get_tracer registers a warnings filter on every call (docs/benchmarks.md).
    _tracers: dict[str, Tracer] = field(default_factory=dict, repr=False)

    def tracer(self, name: str) -> Tracer:
        """A tracer from this service's provider (not the global one)."""
        if (tracer := self._tracers.get(name)) is None:
            tracer = self._tracers.setdefault(name, self.tracer_provider.get_tracer(name))
        return tracer

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Export buffered **spans** now; metrics keep to their period (docs/observability.md)."""
        return self.tracer_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop exporting spans and metrics; stop the Prometheus endpoint. Idempotent."""
        if not self._first_shutdown.acquire(blocking=False):  # never released: once only
            return
        for hook in self._on_shutdown:
            hook()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    config: TelemetryConfig,
    *,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
    set_global: bool = True,
    resource_attributes: Mapping[str, str] | None = None,
    project_id: str | None = None,
    cloud_trace_client: Any = None,
    cloud_monitoring_client: Any = None,
) -> Telemetry:
    """The providers for ``config.traces``. ``span_exporter`` (tests) replaces the mode's exporter:
    fed as each span ends, and left to its owner at shutdown. ``metric_readers`` replace the mode's
    metric exporter. ``project_id`` and the ``*_client`` arguments reach Google's exporters
    (default: ``google.auth.default()``; tests pass recording clients)."""
    resource = build_resource(config, resource_attributes)
    on_shutdown: list[Callable[[], None]] = []
    processor: SpanProcessor | None = None
    try:
        if span_exporter is not None:
            processor = _Borrowed(span_exporter)
        elif (exporter := _span_exporter_for(config, project_id, cloud_trace_client)) is not None:
            # The local viewer polls the file: export every 200 ms there, not every 5 s.
            delay = 200 if config.traces == "file" else None
            processor = BatchSpanProcessor(exporter, schedule_delay_millis=delay)
        readers = list(metric_readers) or _metric_readers_for(
            config, project_id, cloud_monitoring_client
        )
        if config.metrics_port is not None:
            readers.append(_start_prometheus(config.metrics_port, on_shutdown))
    except Exception as exc:
        for stop in on_shutdown:
            stop()
        if processor is not None:
            processor.shutdown()  # its worker thread, its exporter
        raise _translate(exc, config) from exc

    tracer_provider = TracerProvider(resource=resource, sampler=_Sampler(config.sample_ratio))
    if processor is not None:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    telemetry = Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        meter=meter_provider.get_meter(METER_NAME),
        _on_shutdown=on_shutdown,
    )
    if set_global:
        set_global_textmap(TraceContextTextMapPropagator())
        current = trace_api.get_tracer_provider()
        if isinstance(current, trace_api.ProxyTracerProvider):
            trace_api.set_tracer_provider(_NewestTelemetryTracers())
        elif not isinstance(current, _NewestTelemetryTracers):
            _log.warning(
                "the global tracer provider was already set (%s): the Pub/Sub client's spans go "
                "to it, not to mailpipe's exporter",
                type(current).__name__,
            )
        _RUNNING.append(telemetry)
        on_shutdown.insert(0, lambda: _RUNNING.remove(telemetry))
        if not isinstance(metrics_api.get_meter_provider(), MeterProvider):
            metrics_api.set_meter_provider(meter_provider)
    return telemetry


def _translate(exc: Exception, config: TelemetryConfig) -> TelemetryError:
    if isinstance(exc, OSError) and config.metrics_port is not None:
        return TelemetryError(
            f"cannot serve Prometheus metrics on 127.0.0.1:{config.metrics_port} ({exc}); "
            "choose another MAILPIPE_METRICS_PORT or unset it"
        )
    if type(exc).__name__ == "DefaultCredentialsError":  # google.auth, imported lazily
        return TelemetryError(
            "MAILPIPE_TRACES=gcp needs Google credentials and a project (run on GCP, or "
            f"`gcloud auth application-default login` and GOOGLE_CLOUD_PROJECT): {exc}"
        )
    return TelemetryError(f"cannot set up MAILPIPE_TRACES={config.traces}: {exc}")


# --- getting spans out before Cloud Run throttles the CPU -----------------------------------------


class IdleSpanFlush:
    """Exports spans when the last request in flight on this process finishes, before it answers:
    Cloud Run (request-based billing) throttles the CPU from then on. Requests going idle during a
    flush share the next one; a flush is waited for at most ``timeout_seconds`` (a slow backend
    must not hold the answer), then goes on in the background."""

    def __init__(self, flush: Callable[[], object], *, timeout_seconds: float = 2.0) -> None:
        self._flush = flush
        self._timeout = timeout_seconds
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time
        self._in_flight = 0
        self._next_round: threading.Event | None = None  # the flush not yet started

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight; flush on the way out if it was the last one."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                idle = self._in_flight == 0
            if idle:
                self.flush()

    def flush(self) -> bool:
        """Export the queued spans now; True if that finished within the timeout."""
        with self._lock:
            if (done := self._next_round) is None:
                self._next_round = done = threading.Event()
                flusher = threading.Thread(target=self._flush_round, args=(done,), daemon=True)
                try:
                    flusher.start()
                except RuntimeError:  # no thread to be had: the next request that idles retries
                    self._next_round = None
                    _log.warning("could not start a thread to export spans", exc_info=True)
                    return False
        if done.wait(self._timeout):
            return True
        _log.warning(
            "exporting spans took longer than %.1f s; answering without waiting for it",
            self._timeout,
        )
        return False

    def _flush_round(self, this_round: threading.Event) -> None:
        with self._flushing:
            with self._lock:
                self._next_round = None  # it starts now: a request going idle needs the next one
            try:
                self._flush()
            except Exception:  # an exporter failure is logged, never raised into a request
                _log.exception("span flush failed")
            finally:
                this_round.set()


def idle_span_flush(config: TelemetryConfig, telemetry: Telemetry) -> IdleSpanFlush | None:
    """The services' span flush; None in ``file``/``none`` mode (nothing throttles a local run)."""
    return IdleSpanFlush(telemetry.force_flush) if config.traces in ("gcp", "otlp") else None


# --- metrics never written faster than Cloud Monitoring accepts ----------------------------------


class SpacedMetricExporter(MetricExporter):
    """Wraps a metric exporter so two exports (one point per series each) are never closer than
    ``min_spacing_seconds``. One that comes too soon (the final one at shutdown, a ``force_flush``)
    waits up to ``max_delay_seconds``, else is skipped: the data is cumulative, so the previous
    export holds all but its last few seconds."""

    def __init__(
        self,
        exporter: MetricExporter,
        *,
        # Cloud Monitoring takes one point per series every 5-10 s (its exporter's WRITE_INTERVAL).
        min_spacing_seconds: float = 10.0,
        # How long an early export may wait; Cloud Run gives a stopping instance 10 s after SIGTERM.
        max_delay_seconds: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self.exporter = exporter
        self._min_spacing = min_spacing_seconds
        self._max_delay = max_delay_seconds
        self._clock = clock
        self._sleep = sleep
        self._last_export = -math.inf
        self._lock = threading.Lock()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        with self._lock:
            wait = self._last_export + self._min_spacing - self._clock()
            if wait > self._max_delay:
                _log.info(
                    "metric export skipped: the previous one was %.1f s ago and Cloud "
                    "Monitoring accepts one point per series every %.0f s",
                    self._min_spacing - wait,
                    self._min_spacing,
                )
                return MetricExportResult.SUCCESS
            if wait > 0:
                self._sleep(wait)
            self._last_export = self._clock()
            return self.exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.exporter.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


# --- resource ------------------------------------------------------------------------------------


def build_resource(
    config: TelemetryConfig, resource_attributes: Mapping[str, str] | None = None
) -> Resource:
    """``service.name`` (+ extra attributes); in gcp mode merged over the detected GCP resource."""
    base = Resource.create({**(resource_attributes or {}), SERVICE_NAME: config.service_name})
    if config.traces != "gcp":
        return base
    detected = detect_gcp_resource().merge(base)
    # Cloud Monitoring keys a series on service.instance.id (generic_task's task_id): one per
    # process, so two instances never write the same series; Cloud Run's instance id when known.
    attributes = detected.attributes
    instance = attributes.get("faas.instance") or attributes.get(SERVICE_INSTANCE_ID)
    return detected.merge(Resource({SERVICE_INSTANCE_ID: str(instance or uuid.uuid4())}))


def detect_gcp_resource(*, timeout: float = 3.0) -> Resource:
    """The GCP resource (Cloud Run: ``cloud.platform``, ``faas.name``, ``faas.version``...).

    The detector asks the metadata server with unbounded name resolution, and returns an *empty*
    resource when it cannot reach it, even on Cloud Run. So it runs in a daemon thread waited for
    at most ``timeout`` (the SDK's ``get_aggregated_resources`` joins a hung detector), and Cloud
    Run's ``K_*`` variables give the service and revision when it finds nothing (region and
    instance need the metadata server)."""
    from opentelemetry.resourcedetector.gcp_resource_detector import GoogleCloudResourceDetector

    found: list[Resource] = []

    def detect() -> None:
        try:
            found.append(GoogleCloudResourceDetector().detect())
        except Exception:  # any failure of detection means "not detected", never a crash
            _log.warning("GCP resource detection failed", exc_info=True)

    worker = threading.Thread(target=detect, name="mailpipe-gcp-detector", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _log.warning("GCP resource detection took longer than %.1f s; skipped", timeout)
    detected = found[0] if found else Resource.get_empty()
    if detected.attributes or "K_CONFIGURATION" not in os.environ:
        return detected
    attributes = {"cloud.provider": "gcp", "cloud.platform": "gcp_cloud_run"}
    for key, variable in (("faas.name", "K_SERVICE"), ("faas.version", "K_REVISION")):
        if os.environ.get(variable):
            attributes[key] = os.environ[variable]
    return Resource(attributes)


# --- exporters -----------------------------------------------------------------------------------


def _span_exporter_for(
    config: TelemetryConfig, project_id: str | None, client: Any
) -> SpanExporter | None:
    if config.traces == "gcp":
        # Google's exporters (1.15) warn they are deprecated for its OTLP endpoint; they work.
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

        # Resource attributes copied onto every span as labels (Cloud Trace keeps 32 per span).
        labels = r"^(service\.name|cloud\.(platform|region)|faas\.(name|version|instance))$"
        return CloudTraceSpanExporter(project_id=project_id, client=client, resource_regex=labels)
    if config.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=_otlp_url(config.otlp_endpoint, "v1/traces"))
    if config.traces == "file":
        from mailpipe.tracefile import JsonLinesSpanExporter

        if config.trace_file is None:  # TelemetryConfig.read rejects this; guard direct builds
            raise ValueError("MAILPIPE_TRACES=file needs MAILPIPE_TRACE_FILE")
        return JsonLinesSpanExporter(config.trace_file)
    return None


def _metric_readers_for(
    config: TelemetryConfig, project_id: str | None, client: Any
) -> list[MetricReader]:
    if config.traces == "gcp":
        from opentelemetry.exporter.cloud_monitoring import CloudMonitoringMetricsExporter

        exporter: MetricExporter = SpacedMetricExporter(
            CloudMonitoringMetricsExporter(project_id=project_id, client=client)
        )
        # One point per series per minute, as Cloud Monitoring's guidance and examples use.
        return [PeriodicExportingMetricReader(exporter, 60_000)]
    if config.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=_otlp_url(config.otlp_endpoint, "v1/metrics"))
        return [PeriodicExportingMetricReader(exporter)]
    return []


def _otlp_url(base: str | None, path: str) -> str | None:
    """``base``/``path``; None lets the exporter read OTEL_EXPORTER_OTLP_* itself."""
    return f"{base.rstrip('/')}/{path}" if base else None


def _start_prometheus(port: int, on_shutdown: list[Callable[[], None]]) -> MetricReader:
    """A Prometheus reader on its own registry, served on 127.0.0.1:port until shutdown."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    # A registry per Telemetry: the process-wide default would refuse a second reader's metrics.
    registry = CollectorRegistry(auto_describe=True)
    # No otel_scope_* labels: every instrument comes from the one "mailpipe" meter.
    reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    on_shutdown.append(stop)
    return reader


class _Borrowed(SimpleSpanProcessor):
    """Feeds a caller's exporter as each span ends; its owner shuts it down."""

    def shutdown(self) -> None:
        pass


# --- the global provider and the Pub/Sub client's spans ------------------------------------------

# The Pub/Sub client's INTERNAL helper spans: each is current only inside a `with` that just
# stores it (google/cloud/pubsub_v1/open_telemetry), so no span can have one as its parent.
# Not recording them (4 of a mail's 13 spans, 2 more per event) orphans nothing (issue 18).
LIBRARY_HELPER_SPANS = frozenset(
    {
        "publisher flow control",
        "publisher batching",
        "subscriber concurrency control",
        "subscriber scheduler",
    }
)


class _Sampler(sampling.ParentBased):
    """``ParentBased(TraceIdRatioBased(ratio))`` that never records the library's helper spans
    (cheaper than recording and then dropping them: a non-recording span does no work)."""

    def __init__(self, ratio: float) -> None:
        super().__init__(sampling.TraceIdRatioBased(ratio))

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> sampling.SamplingResult:
        if kind is SpanKind.INTERNAL and name in LIBRARY_HELPER_SPANS:
            parent = trace_api.get_current_span(parent_context).get_span_context()
            return sampling.SamplingResult(sampling.Decision.DROP, trace_state=parent.trace_state)
        return super().should_sample(parent_context, trace_id, name, kind, *args, **kwargs)


class _NewestTelemetryTracers(trace_api.TracerProvider):
    """The global tracer provider, through which the Pub/Sub client makes its spans. It is set
    once per process, which may run several Telemetry objects (tests; both apps in one): the
    client's spans go to the provider of the newest one still running (none: not recorded)."""

    def get_tracer(self, name: str, *rest: Any) -> Tracer:
        return _NewestTracer(name)  # the client passes a name only


class _NewestTracer(trace_api.ProxyTracer):
    """A ProxyTracer whose ``_tracer``, asked for each span, is the newest running Telemetry's (a
    caller may keep this tracer while Telemetry objects come and go)."""

    @property
    def _tracer(self) -> Tracer:
        newest = _RUNNING[-1:]  # a copy: another thread may stop a Telemetry meanwhile
        return newest[0].tracer(self._instrumenting_module_name) if newest else self._noop_tracer


_RUNNING: list[Telemetry] = []  # the Telemetry objects built with set_global, oldest first
