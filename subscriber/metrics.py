"""The subscriber's delivery metrics: one object the delivery path calls at each step of a mail.

The instruments, their attributes and their names in Prometheus and Cloud Monitoring (and why
deferrals, bounces and SMTP steps are recorded inside the ``mail deliver`` span: exemplars) are
in docs/observability.md; the names are an interface (dashboards and alerts query them). The
meter is the service's, from :func:`mailpipe.telemetry.setup_telemetry` (``Telemetry.meter``).
"""

from __future__ import annotations

import re

from opentelemetry.metrics import Meter

from mailpipe.attributes import (
    METRIC_FIRST_ATTEMPT,
    SMTP_ENHANCED_STATUS,
    SMTP_REPLY_CODE,
    SMTP_STEP,
)

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

# The instruments' descriptions, as exported (Cloud Monitoring shows them).
_DELIVERED = "Mails the relay accepted (250)."
_DEFERRED = "Delivery attempts deferred (4xx, timeout, connection error); retried."
_BOUNCED = "Mails rejected permanently (5xx); never retried."
_SANDBOXED = "Sandbox mails the relay accepted at RCPT TO (then RSET, not sent)."
_DEAD_LETTERED = "Mails that exhausted their delivery attempts."
_LATENCY = "Time from the HTTP 202 to the relay's 250 after DATA."
_STEP = "Duration of one SMTP step (attribute smtp.step)."
_ATTEMPTS = "Delivery attempts a mail took to reach its final outcome."

# RFC 3463 class.subject.detail; anything else is collapsed so one chatty relay cannot blow up
# the metric's cardinality.
_ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def _reply_attributes(reply_code: int | None, enhanced_status: str | None) -> dict[str, int | str]:
    attributes: dict[str, int | str] = {}
    if reply_code is not None:
        attributes[SMTP_REPLY_CODE] = int(reply_code) if 100 <= reply_code <= 599 else 0
    if enhanced_status is not None:
        valid = _ENHANCED_STATUS.match(enhanced_status)
        attributes[SMTP_ENHANCED_STATUS] = enhanced_status if valid else "other"
    return attributes


class DeliveryMetrics:
    """Records the delivery metrics through one ``Meter``; cheap and thread-safe, so called
    inline. Outcomes: ``deferred`` once per attempt, the others once per mail."""

    def __init__(self, meter: Meter) -> None:
        counter, histogram = meter.create_counter, meter.create_histogram
        self._delivered = counter("mailpipe.mails.delivered", "{mail}", _DELIVERED)
        self._deferred = counter("mailpipe.mails.deferred", "{attempt}", _DEFERRED)
        self._bounced = counter("mailpipe.mails.bounced", "{mail}", _BOUNCED)
        self._sandboxed = counter("mailpipe.mails.sandboxed", "{mail}", _SANDBOXED)
        self._dead_lettered = counter("mailpipe.mails.dead_lettered", "{mail}", _DEAD_LETTERED)
        self._latency = histogram(
            "mailpipe.delivery.latency",
            "s",
            _LATENCY,
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self._step = histogram(
            "mailpipe.smtp.step.duration",
            "s",
            _STEP,
            explicit_bucket_boundaries_advisory=SMTP_STEP_BUCKETS,
        )
        self._attempts = histogram(
            "mailpipe.delivery.attempts",
            "{attempt}",
            _ATTEMPTS,
            explicit_bucket_boundaries_advisory=ATTEMPT_BUCKETS,
        )

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

    def sandboxed(self) -> None:
        """A sandbox mail ended with RSET after RCPT TO (``sandbox`` in the request)."""
        self._sandboxed.add(1)

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
