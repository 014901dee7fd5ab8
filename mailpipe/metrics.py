"""The mail pipeline's metrics: one object the services call at each step of a mail's life.

Instruments (names are an interface: dashboards and alerts query them)::

    mailpipe.mails.accepted          counter    POST /v1/messages answered 202
    mailpipe.mails.delivered         counter    SMTP 250 after DATA
    mailpipe.mails.deferred          counter    4xx / timeout / connection error; smtp.reply.code,
                                                smtp.reply.enhanced_status when the server replied
    mailpipe.mails.bounced           counter    5xx; same attributes
    mailpipe.mails.dead_lettered     counter    read back from the dead-letter subscription
    mailpipe.delivery.latency        histogram  s, request accepted → SMTP 250
    mailpipe.smtp.step.duration      histogram  s, one per SMTP step (attribute smtp.step)
    mailpipe.delivery.attempts       histogram  attempts a mail took to reach its final outcome
    mailpipe.oldest_undelivered_age  gauge      s, age of the oldest mail not yet delivered
    mailpipe.mails.stuck             gauge      records reconcile would settle, by
                                                mailpipe.stuck.kind: expired_reservation,
                                                stalled_delivery; and unconfirmed (settled,
                                                outcome unknown; see mailpipe/reconcile.py)

In Prometheus they read ``mailpipe_mails_deferred_total``,
``mailpipe_delivery_latency_seconds_bucket`` and so on (dots become underscores, counters get
``_total``, the unit ``s`` becomes ``_seconds``).

Exemplars: the OpenTelemetry SDK's default exemplar filter (``trace_based``) attaches the current
trace id and span id to a measurement made inside a *sampled* span, so record deferrals, bounces
and SMTP step durations inside the ``mail deliver`` span. Only the OTLP exporter carries exemplars
on: the Prometheus exporter (text format) and the Cloud Monitoring exporter
(opentelemetry-exporter-gcp-monitoring 1.15) drop them. There, follow a spike to its traces
through the logs, which carry ``logging.googleapis.com/trace`` on every deferral and bounce.

Nothing here creates a meter provider: :func:`mailpipe.telemetry.setup_telemetry` builds one and
hands its meter to :class:`MailMetrics`; tests pass a meter from a provider with an in-memory
reader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

_log = logging.getLogger(__name__)

# Attribute keys (shared with the spans, see docs/observability.md).
ATTR_REPLY_CODE = "smtp.reply.code"
ATTR_ENHANCED_STATUS = "smtp.reply.enhanced_status"
ATTR_SMTP_STEP = "smtp.step"
ATTR_FIRST_ATTEMPT = "mailpipe.first_attempt"
ATTR_STUCK_KIND = "mailpipe.stuck.kind"

# Bucket boundaries. Delivery latency spans milliseconds (a healthy relay) to the ~16 hours Pub/Sub
# can keep retrying; an SMTP step is milliseconds to the client timeout; attempts stop at 100
# (Pub/Sub's max_delivery_attempts ceiling).
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

# RFC 3463 class.subject.detail; anything else a server sends is collapsed so one chatty relay
# cannot blow up the metric's cardinality.
_ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

OldestUndeliveredSource = Callable[[], "float | None"]
StuckSource = Callable[[], "Mapping[str, int] | None"]


def _reply_attributes(reply_code: int | None, enhanced_status: str | None) -> dict[str, int | str]:
    attributes: dict[str, int | str] = {}
    if reply_code is not None:
        attributes[ATTR_REPLY_CODE] = int(reply_code) if 100 <= reply_code <= 599 else 0
    if enhanced_status is not None:
        attributes[ATTR_ENHANCED_STATUS] = (
            enhanced_status if _ENHANCED_STATUS.match(enhanced_status) else "other"
        )
    return attributes


class MailMetrics:
    """Records the pipeline's metrics through one OpenTelemetry ``Meter``.

    Every method is cheap and thread-safe (the SDK's instruments are), so the services call them
    inline. Call the outcome methods once per attempt (``deferred``) or once per mail (the others).
    """

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
        self._oldest_source: OldestUndeliveredSource | None = None
        meter.create_observable_gauge(
            "mailpipe.oldest_undelivered_age",
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest accepted mail not yet delivered or given up on.",
        )
        self._stuck_source: StuckSource | None = None
        meter.create_observable_gauge(
            "mailpipe.mails.stuck",
            callbacks=[self._observe_stuck],
            unit="{mail}",
            description="Records `mailpipe reconcile --fix` would settle (expired reservations, "
            "stalled deliveries) and those it marked unconfirmed, by mailpipe.stuck.kind.",
        )

    # --- outcomes -------------------------------------------------------------------------------

    def accepted(self) -> None:
        """One mail was published and answered 202."""
        self._accepted.add(1)

    def delivered(self, *, latency_seconds: float, attempt: int) -> None:
        """The relay answered 250 after DATA.

        Records the counter and the end-to-end latency (attribute ``mailpipe.first_attempt`` tells
        first-try deliveries from retried ones). It does *not* record
        ``mailpipe.delivery.attempts``: call :meth:`delivery_attempts` once for every final
        outcome, delivered included.
        """
        self._delivered.add(1)
        self._latency.record(max(0.0, latency_seconds), {ATTR_FIRST_ATTEMPT: attempt <= 1})

    def deferred(self, *, reply_code: int | None, enhanced_status: str | None) -> None:
        """One attempt failed transiently (4xx, or no reply at all: pass ``None``)."""
        self._deferred.add(1, _reply_attributes(reply_code, enhanced_status))

    def bounced(self, *, reply_code: int | None, enhanced_status: str | None) -> None:
        """The relay rejected the mail permanently (5xx)."""
        self._bounced.add(1, _reply_attributes(reply_code, enhanced_status))

    def dead_lettered(self) -> None:
        """A mail reached the dead-letter subscription."""
        self._dead_lettered.add(1)

    # --- details --------------------------------------------------------------------------------

    def smtp_step(self, step: str, seconds: float, *, reply_code: int | None) -> None:
        """One SMTP step took ``seconds`` (``step`` as in the span name without ``smtp ``)."""
        attributes: dict[str, int | str] = {ATTR_SMTP_STEP: step if step in SMTP_STEPS else "other"}
        attributes.update(_reply_attributes(reply_code, None))
        self._step.record(max(0.0, seconds), attributes)

    def delivery_attempts(self, attempt: int) -> None:
        """A mail reached its final outcome (delivered, bounced or dead-lettered) on ``attempt``."""
        self._attempts.record(max(1, attempt))

    def set_oldest_undelivered_source(self, source: OldestUndeliveredSource | None) -> None:
        """Register the function the gauge calls at each collection.

        It returns the age in seconds of the oldest undelivered mail, or ``None`` when there is
        none (no point is reported then). It runs on the metric reader's thread: keep it fast.
        """
        self._oldest_source = source

    def _observe_oldest(self, _options: CallbackOptions) -> Iterable[Observation]:
        source = self._oldest_source
        if source is None:
            return []
        try:
            age = source()
        except Exception:  # a broken source must not break every other metric's export
            _log.exception("oldest-undelivered source failed")
            return []
        return [] if age is None else [Observation(max(0.0, float(age)))]

    def set_stuck_source(self, source: StuckSource | None) -> None:
        """Register the function the ``mailpipe.mails.stuck`` gauge calls at each collection.

        It returns ``{kind: count}`` (see :func:`mailpipe.reconcile.stuck_counts`), or ``None``
        when it cannot tell (no point is reported then). It runs on the metric reader's thread.
        """
        self._stuck_source = source

    def _observe_stuck(self, _options: CallbackOptions) -> Iterable[Observation]:
        source = self._stuck_source
        if source is None:
            return []
        try:
            counts = source()
        except Exception:  # a broken source must not break every other metric's export
            _log.exception("stuck-records source failed")
            return []
        if counts is None:
            return []
        return [
            Observation(max(0, int(count)), {ATTR_STUCK_KIND: str(kind)})
            for kind, count in sorted(counts.items())
        ]
