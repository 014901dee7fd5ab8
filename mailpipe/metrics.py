"""The mail pipeline's metrics: one object the services call at each step of a mail's life.

The instruments, their attributes and their names in Prometheus and Cloud Monitoring are listed
in docs/observability.md; the names are an interface (dashboards and alerts query them).

Exemplars: the SDK's default filter (``trace_based``) attaches the current trace and span id to a
measurement made inside a *sampled* span, so deferrals, bounces and SMTP step durations are
recorded inside the ``mail deliver`` span. Only OTLP carries exemplars; the Prometheus and Cloud
Monitoring (1.15) exporters drop them, and the logs (``logging.googleapis.com/trace`` on every
deferral and bounce) lead from a spike to its traces instead.

The meter comes from :func:`mailpipe.telemetry.setup_telemetry` (tests: an in-memory reader's).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from mailpipe.attributes import (
    METRIC_FIRST_ATTEMPT,
    METRIC_STUCK_KIND,
    SMTP_ENHANCED_STATUS,
    SMTP_REPLY_CODE,
    SMTP_STEP,
)

_log = logging.getLogger(__name__)

# Delivery latency: milliseconds (a healthy relay) to the ~16 hours Pub/Sub can keep retrying; an
# SMTP step: milliseconds to the client timeout; attempts: up to Pub/Sub's ceiling of 100.
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 21600.0, 57600.0,
)  # fmt: skip
SMTP_STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
ATTEMPT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0)

SMTP_STEPS = frozenset(
    {"connect", "ehlo", "starttls", "auth", "mail from", "rcpt to", "data", "rset", "quit"}
)

# RFC 3463 class.subject.detail; anything else is collapsed so one chatty relay cannot blow up
# the metric's cardinality.
_ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

OldestUndeliveredSource = Callable[[], "float | None"]
StuckSource = Callable[[], "Mapping[str, int] | None"]


def _reply_attributes(reply_code: int | None, enhanced_status: str | None) -> dict[str, int | str]:
    attributes: dict[str, int | str] = {}
    if reply_code is not None:
        attributes[SMTP_REPLY_CODE] = int(reply_code) if 100 <= reply_code <= 599 else 0
    if enhanced_status is not None:
        valid = _ENHANCED_STATUS.match(enhanced_status)
        attributes[SMTP_ENHANCED_STATUS] = enhanced_status if valid else "other"
    return attributes


class MailMetrics:
    """Records the pipeline's metrics through one ``Meter``; cheap and thread-safe, so called
    inline. Outcomes: ``deferred`` once per attempt, the others once per mail."""

    def __init__(self, meter: Meter) -> None:
        self._accepted = meter.create_counter(
            "mailpipe.mails.accepted", unit="{mail}", description="Mails accepted (HTTP 202)."
        )
        self._delivered = meter.create_counter(
            "mailpipe.mails.delivered", unit="{mail}", description="Mails the relay accepted (250)."
        )
        self._deferred = meter.create_counter(
            "mailpipe.mails.deferred",
            unit="{attempt}",
            description="Delivery attempts deferred (4xx, timeout, connection error); retried.",
        )
        self._bounced = meter.create_counter(
            "mailpipe.mails.bounced",
            unit="{mail}",
            description="Mails rejected permanently (5xx); never retried.",
        )
        self._suppressed = meter.create_counter(
            "mailpipe.recipients.suppressed",
            unit="{recipient}",
            description="Recipients left out of a delivery: on the suppression list.",
        )
        self._dead_lettered = meter.create_counter(
            "mailpipe.mails.dead_lettered",
            unit="{mail}",
            description="Mails that exhausted their delivery attempts.",
        )
        self._latency = meter.create_histogram(
            "mailpipe.delivery.latency",
            unit="s",
            description="Time from the HTTP 202 to the relay's 250 after DATA.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._step = meter.create_histogram(
            "mailpipe.smtp.step.duration",
            unit="s",
            description="Duration of one SMTP step (attribute smtp.step).",
            explicit_bucket_boundaries_advisory=SMTP_STEP_BUCKETS,
        )
        self._attempts = meter.create_histogram(
            "mailpipe.delivery.attempts",
            unit="{attempt}",
            description="Delivery attempts a mail took to reach its final outcome.",
            explicit_bucket_boundaries_advisory=ATTEMPT_BUCKETS,
        )
        self._sources: dict[str, Callable[[], Any] | None] = {}
        meter.create_observable_gauge(
            "mailpipe.oldest_undelivered_age",
            callbacks=[
                self._gauge("oldest-undelivered", lambda age: [Observation(max(0.0, float(age)))])
            ],
            unit="s",
            description="Age of the oldest accepted mail not yet delivered or given up on.",
        )
        meter.create_observable_gauge(
            "mailpipe.mails.stuck",
            callbacks=[self._gauge("stuck-records", _stuck_observations)],
            unit="{mail}",
            description="Records `mailpipe reconcile --fix` would settle (expired reservations, "
            "stalled deliveries) and those it marked unconfirmed, by mailpipe.stuck.kind.",
        )

    def accepted(self) -> None:
        """One mail was published and answered 202."""
        self._accepted.add(1)

    def delivered(self, *, latency_seconds: float, attempt: int) -> None:
        """The relay answered 250 after DATA: the counter and the end-to-end latency (attribute
        ``mailpipe.first_attempt``). Call :meth:`delivery_attempts` too, as for every outcome."""
        self._delivered.add(1)
        self._latency.record(max(0.0, latency_seconds), {METRIC_FIRST_ATTEMPT: attempt <= 1})

    def deferred(self, *, reply_code: int | None, enhanced_status: str | None) -> None:
        """One attempt failed transiently (4xx, or no reply at all: pass ``None``)."""
        self._deferred.add(1, _reply_attributes(reply_code, enhanced_status))

    def bounced(self, *, reply_code: int | None, enhanced_status: str | None) -> None:
        """The relay rejected the mail permanently (5xx)."""
        self._bounced.add(1, _reply_attributes(reply_code, enhanced_status))

    def suppressed(self, count: int) -> None:
        """``count`` recipients of an attempt were suppressed (not sent to)."""
        self._suppressed.add(count)

    def dead_lettered(self) -> None:
        """A mail reached the dead-letter subscription."""
        self._dead_lettered.add(1)

    def smtp_step(self, step: str, seconds: float, *, reply_code: int | None) -> None:
        """One SMTP step took ``seconds`` (``step`` as in the span name without ``smtp ``)."""
        attributes: dict[str, int | str] = {SMTP_STEP: step if step in SMTP_STEPS else "other"}
        attributes.update(_reply_attributes(reply_code, None))
        self._step.record(max(0.0, seconds), attributes)

    def delivery_attempts(self, attempt: int) -> None:
        """A mail reached its final outcome (delivered, bounced or dead-lettered) on ``attempt``."""
        self._attempts.record(max(1, attempt))

    # The gauges' sources run on the metric reader's thread at each collection (keep them fast)
    # and return None when there is nothing to report: no point then, not a zero.

    def set_oldest_undelivered_source(self, source: OldestUndeliveredSource | None) -> None:
        """The age in seconds of the oldest undelivered mail, for the lag gauge."""
        self._sources["oldest-undelivered"] = source

    def set_stuck_source(self, source: StuckSource | None) -> None:
        """``{kind: count}`` (:func:`mailpipe.reconcile.stuck_counts`) for the stuck gauge."""
        self._sources["stuck-records"] = source

    def _gauge(
        self, name: str, observations: Callable[[Any], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            source = self._sources.get(name)
            try:
                value = None if source is None else source()
            except Exception:  # a broken source must not break every other metric's export
                _log.exception("%s source failed", name)
                return []
            return [] if value is None else observations(value)

        return callback


def _stuck_observations(counts: Mapping[str, int]) -> list[Observation]:
    return [
        Observation(max(0, int(count)), {METRIC_STUCK_KIND: str(kind)})
        for kind, count in sorted(counts.items())
    ]
