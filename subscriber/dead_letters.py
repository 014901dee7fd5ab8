"""The dead-letter consumer: marks each dead-lettered mail in the delivery record.

Pub/Sub forwards a message to the dead-letter topic after ``max_delivery_attempts``; the copy keeps
the original attributes (``mail_id``, ``googclient_traceparent``) and gains
``CloudPubSubDeadLetterSourceDeliveryCount``. This consumer reads the ``dead_letter_record``
subscription; the ``dead_letter`` subscription keeps the data for ``mailpipe dlq replay``.

Give-up time (docs/deliver-by.md): a mail dead-lettered before its ``deliver_by`` gets
``next_attempt_at`` from the retry schedule (``mailpipe dlq replay --due`` replays it then; none
when no attempt fits before ``deliver_by``); one past it becomes ``expired`` (event ``expired``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from mailpipe.attributes import (
    MESSAGING_DELIVERY_ATTEMPT,
    MESSAGING_MESSAGE_ID,
    MESSAGING_SYSTEM,
    MESSAGING_SYSTEM_PUBSUB,
    PUBSUB_DEAD_LETTER_DELIVERY_COUNT,
    PUBSUB_MAIL_ID,
    SPAN_MAIL_ID,
    SPAN_OUTCOME,
)
from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import MailDecodeError, QueuedMail
from mailpipe.record import DeliveryRecord, InvalidMailId, MailRecord, MailStatus, RecordError
from subscriber.delivery import ReceivedMessage
from subscriber.metrics import DeliveryMetrics
from subscriber.retry_schedule import DEFAULT_RETRY_SCHEDULE, RetrySchedule

log = logging.getLogger(__name__)
Found = MailRecord | None


class DeadLetterRecorder:
    """Handles one dead-lettered message; returns whether to ack it."""

    def __init__(
        self,
        *,
        record: DeliveryRecord,
        tracer: trace.Tracer,
        metrics: DeliveryMetrics | None = None,
        events: EventEmitter | None = None,
        schedule: RetrySchedule | None = None,
    ) -> None:
        self._schedule = schedule or RetrySchedule.parse(DEFAULT_RETRY_SCHEDULE)
        self._events = events
        self._record = record
        self._tracer = tracer
        self._metrics = metrics

    def handle(
        self,
        message: ReceivedMessage,
        *,
        parent: otel_context.Context | None,
        kind: SpanKind = SpanKind.CONSUMER,
    ) -> bool:
        with self._tracer.start_as_current_span(
            "mail dead-letter", context=parent or otel_context.Context(), kind=kind
        ) as span:
            span.set_attribute(MESSAGING_SYSTEM, MESSAGING_SYSTEM_PUBSUB)
            span.set_attribute(MESSAGING_MESSAGE_ID, message.message_id)
            mail_id = message.attributes.get(PUBSUB_MAIL_ID)
            if not mail_id:
                # Not a mailpipe mail; its data stays on the dead-letter subscription to inspect.
                log.warning("dead-lettered message %s has no mail_id", message.message_id)
                return True
            span.set_attribute(SPAN_MAIL_ID, mail_id)
            attempts = message.attributes.get(PUBSUB_DEAD_LETTER_DELIVERY_COUNT)
            if attempts and attempts.isdigit():
                span.set_attribute(MESSAGING_DELIVERY_ATTEMPT, int(attempts))
            try:
                mail: QueuedMail | None = QueuedMail.from_pubsub(
                    message.data, dict(message.attributes)
                )
            except MailDecodeError:
                mail = None  # still recorded; its recipients, metadata and schedule are unknown
            try:
                updated = self._mark(mail_id, mail)
            except RecordError as exc:
                log.error("could not mark mail %s dead-lettered: %s", mail_id, exc)
                return False
            span.set_attribute(SPAN_OUTCOME, str(updated.status) if updated else "dead_lettered")
            if updated is None:
                log.warning("dead-lettered mail %s has no delivery record", mail_id)
            if self._metrics is not None:
                self._metrics.dead_lettered()
                if updated is not None and updated.status == "expired":
                    self._metrics.expired()
            if self._events is not None and (
                updated is None or updated.status in ("dead_lettered", "expired")
            ):
                self._emit(mail, mail_id, updated, attempts)
            log.warning(
                "mail dead-lettered",
                extra={"json_fields": {"mail_id": mail_id, "delivery_count": attempts}},
            )
            return True

    def _mark(self, mail_id: str, mail: QueuedMail | None) -> MailRecord | None:
        """``dead_lettered`` with its next attempt, or ``expired`` past its deliver_by: one read
        and one write in one transaction. ``None`` without a record; a final one is kept."""

        def rule(found: MailRecord | None, now: dt.datetime) -> tuple[Found, Found]:
            if found is None or found.status.final:
                return found, None
            deliver_by = (mail.deliver_by if mail else None) or found.deliver_by
            if deliver_by is not None and deliver_by <= now:
                new = dataclasses.replace(
                    found,
                    status=MailStatus.EXPIRED,
                    last_error=f"deliver_by {deliver_by.isoformat()} passed; "
                    f"last error: {found.last_error}",
                    next_attempt_at=None,
                    lease_until=None,
                    updated_at=now,
                )
            else:
                accepted_at = mail.accepted_at if mail else found.accepted_at
                next_at = self._schedule.next_attempt(accepted_at, now, deliver_by)
                new = dataclasses.replace(
                    found, status=MailStatus.DEAD_LETTERED, next_attempt_at=next_at, updated_at=now
                )
            return new, new

        try:
            return self._record.update(mail_id, rule, "mark_dead_lettered")
        except InvalidMailId:
            return None  # no record can have this id

    def _emit(
        self, mail: QueuedMail | None, mail_id: str, updated: MailRecord | None, count: str | None
    ) -> None:
        """``dead_lettered`` (or ``expired``), inside the span (the mail's trace): a redelivered
        copy emits it again with the same ``event_id`` (docs/events.md)."""
        assert self._events is not None
        last = updated.attempts[-1] if updated is not None and updated.attempts else None
        attempt = updated.attempt_count if updated is not None else 0
        if updated is None and count and count.isdigit():
            attempt = int(count)
        expired = updated is not None and updated.status == "expired"
        self._events.emit(
            EventType.EXPIRED if expired else EventType.DEAD_LETTERED,
            mail_id,
            mail=mail,
            attempt=attempt,
            reply_code=last.reply_code if last else None,
            enhanced_status=last.enhanced_status if last else None,
            reply=last.reply_message if last else None,
        )
