"""The delivery core, shared by the push endpoint and the streaming-pull worker.

For each Pub/Sub message: claim the attempt in the record → SMTP transaction → outcome. The
ack/nack decision lives in :func:`decide` and nowhere else::

    outcome      reason                                   ack?   push answer
    delivered    250 after DATA                           yes    204
    sandboxed    a sandbox mail (request ``sandbox``):    yes    204   (nothing sent: no DATA)
                 RCPT accepted, then RSET
    bounced      5xx, or the message can never be sent    yes    204   (a mail this version
                 (it cannot be built, or needs SMTPUTF8                  refuses or cannot build
                 that the relay lacks)                                   included: recorded)
    duplicate    the record says delivered/bounced        yes    204
    suppressed   every recipient on the suppression list  yes    204   (nothing sent; some of
                                                                        them: the rest is sent)
    expired      claimed past its deliver_by: not sent    yes    204   (docs/deliver-by.md)
    deferred     4xx, timeout, connection/TLS failure,    no     503   (Pub/Sub retries with
                 record unavailable, claimed elsewhere,                 backoff, then dead-letters)
                 no pooled connection in time, the
                 delivery's time budget used up
    undecodable  not a mailpipe mail                      no     503   (ends on the dead-letter
                                                                        topic, where it is visible)

Retry timing and dead-lettering come from the subscription's policies (topology.json), not from
loops in this code.

Time and the claim: a delivery has ``delivery_timeout`` seconds (``MAILPIPE_DELIVERY_TIMEOUT``)
from its start, the wait for a pooled SMTP connection and every SMTP step included, and that is
shorter than its claim's lease. Once it holds a connection, just before MAIL FROM, it renews the
claim in the record (:meth:`~mailpipe.record.DeliveryRecord.renew_lease`): if another delivery
claimed the mail meanwhile, or the mail was delivered, nothing is sent. So two deliveries of one
mail never both reach MAIL FROM; what remains is listed in docs/guarantees.md.

Every text kept from the relay (record, span, log, push answer) went through the sender's
redaction and is cleaned once more here: no registered secret, addresses only as configured.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from mailpipe.attributes import (
    MESSAGING_DELIVERY_ATTEMPT,
    MESSAGING_MESSAGE_ID,
    MESSAGING_SYSTEM,
    MESSAGING_SYSTEM_PUBSUB,
    SMTP_ENHANCED_STATUS,
    SMTP_REPLY_CODE,
    SPAN_DUPLICATE,
    SPAN_MAIL_ID,
    SPAN_OUTCOME,
    current_traceparent,
)
from mailpipe.config import AddressStyle
from mailpipe.events import EventEmitter, EventType
from mailpipe.logs import redact_address, redact_addresses, redact_secrets
from mailpipe.mail import MailDecodeError, QueuedMail, UnsendableMail
from mailpipe.record import (
    Attempt,
    ClaimResult,
    DeliveryRecord,
    RecipientResult,
    RecordError,
    RenewalResult,
)
from subscriber.config import default_delivery_timeout
from subscriber.errors import DeliveryError, UndeliverableMail
from subscriber.message import build_message, envelope, message_bytes
from subscriber.metrics import DeliveryMetrics
from subscriber.smtp import SmtpReceipt
from subscriber.suppression import CHECK_STEP, RecipientScreen, Screened

log = logging.getLogger(__name__)

CLAIM_STEP = "claim"  # an attempt's failed_step when its claim was lost before MAIL FROM


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    SANDBOXED = "sandboxed"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"
    UNDECODABLE = "undecodable"
    EXPIRED = "expired"


def decide(outcome: Outcome) -> bool:
    """Whether the Pub/Sub message is acknowledged (True) or handed back for a retry (False)."""
    return outcome in (
        Outcome.DELIVERED,
        Outcome.SANDBOXED,
        Outcome.BOUNCED,
        Outcome.DUPLICATE,
        Outcome.SUPPRESSED,
        Outcome.EXPIRED,
    )


class MailSender(Protocol):
    """Sends one SMTP transaction (see :class:`subscriber.smtp.SmtpSender`).

    Within ``deadline`` (``time.monotonic()``), calling ``before_mail_from`` with the connection
    held, just before MAIL FROM, and sending nothing if it raises.
    """

    def send(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        deadline: float | None = None,
        before_mail_from: Callable[[], None] | None = None,
        sandbox: bool = False,
    ) -> SmtpReceipt: ...


class _NotSent(Exception):
    """Raised by the claim check before MAIL FROM: this delivery must not send the mail."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@dataclass(frozen=True)
class ReceivedMessage:
    """A Pub/Sub message as either receive path sees it."""

    data: bytes
    attributes: Mapping[str, str]
    message_id: str
    delivery_attempt: int | None = None  # absent in the emulator's push body


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    mail_id: str | None = None
    detail: str = ""
    reply_code: int | None = None
    enhanced_status: str | None = None
    trace_id: str | None = None

    @property
    def ack(self) -> bool:
        return decide(self.outcome)


class DeliveryService:
    """Delivers one Pub/Sub message and says whether to ack it."""

    def __init__(
        self,
        *,
        sender: MailSender,
        record: DeliveryRecord,
        tracer: trace.Tracer,
        message_id_domain: str,
        metrics: DeliveryMetrics | None = None,
        lease_seconds: float = 120.0,
        address_style: AddressStyle = "domain",
        delivery_timeout: float | None = None,
        events: EventEmitter | None = None,
        screen: RecipientScreen | None = None,
    ) -> None:
        self._sender = sender
        self._screen = screen  # the suppression list (None: off)
        self._events = events  # one event per finished attempt (docs/events.md)
        self._record = record
        self._tracer = tracer
        self._message_id_domain = message_id_domain
        self._metrics = metrics
        self._lease_seconds = lease_seconds
        self._address_style = address_style
        # MAILPIPE_DELIVERY_TIMEOUT; by default the config's: 60 s or half the lease.
        self._delivery_timeout = (
            delivery_timeout
            if delivery_timeout is not None
            else default_delivery_timeout(lease_seconds)
        )

    def deliver(
        self,
        message: ReceivedMessage,
        *,
        parent: otel_context.Context | None,
        kind: SpanKind = SpanKind.INTERNAL,
        links: Sequence[Link] = (),
    ) -> DeliveryResult:
        """Run one delivery attempt inside a ``mail deliver`` span parented on ``parent``."""
        # An explicit parent (never the thread's current context): the pull callback has no current
        # span and the push request's own context belongs to Cloud Run's unrelated trace.
        parent = parent if parent is not None else otel_context.Context()
        with self._tracer.start_as_current_span(
            "mail deliver",
            context=parent,
            kind=kind,
            links=list(links),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute(MESSAGING_SYSTEM, MESSAGING_SYSTEM_PUBSUB)
            span.set_attribute(MESSAGING_MESSAGE_ID, message.message_id)
            if message.delivery_attempt:
                span.set_attribute(MESSAGING_DELIVERY_ATTEMPT, message.delivery_attempt)
            result = self._deliver_in_span(message, span)
            span.set_attribute(SPAN_OUTCOME, str(result.outcome))
            if result.reply_code is not None:
                span.set_attribute(SMTP_REPLY_CODE, result.reply_code)
            if result.enhanced_status:
                span.set_attribute(SMTP_ENHANCED_STATUS, result.enhanced_status)
            if result.outcome in (Outcome.DEFERRED, Outcome.BOUNCED, Outcome.UNDECODABLE):
                span.set_status(
                    Status(
                        StatusCode.ERROR,
                        redact_addresses(result.detail, self._address_style)[:200],
                    )
                )
            trace_id = format(span.get_span_context().trace_id, "032x")
            # Inside the span: the line carries logging.googleapis.com/trace and spanId.
            log.info(
                "mail %s",
                result.outcome,
                extra={
                    "json_fields": {
                        "mail_id": result.mail_id,
                        "message_id": message.message_id,
                        "outcome": str(result.outcome),
                        "reply_code": result.reply_code,
                        "detail": result.detail,
                    }
                },
            )
        return DeliveryResult(
            outcome=result.outcome,
            mail_id=result.mail_id,
            detail=result.detail,
            reply_code=result.reply_code,
            enhanced_status=result.enhanced_status,
            trace_id=trace_id,
        )

    def _deliver_in_span(  # noqa: PLR0911 - one return per row of the module's table
        self, message: ReceivedMessage, span: trace.Span
    ) -> DeliveryResult:
        deadline = time.monotonic() + self._delivery_timeout  # the whole delivery's budget
        try:
            mail = QueuedMail.from_pubsub(message.data, dict(message.attributes))
        except UnsendableMail as exc:
            return self._bounce_unsendable(exc, message.message_id, span)
        except MailDecodeError as exc:
            log.error("undecodable message %s: %s", message.message_id, exc)
            return DeliveryResult(Outcome.UNDECODABLE, detail=str(exc))
        span.set_attribute(SPAN_MAIL_ID, mail.mail_id)
        trace_id = format(span.get_span_context().trace_id, "032x")

        try:
            claim = self._record.claim(
                mail.mail_id,
                message_id=message.message_id,
                trace_id=trace_id,
                lease_seconds=self._lease_seconds,
                # Used only if the record is missing (its write failed): the lag stays right.
                accepted_at=mail.accepted_at,
                recipient_domains=mail.request.recipient_domains,
                deliver_by=mail.deliver_by,
            )
        except RecordError as exc:
            return DeliveryResult(
                Outcome.DEFERRED, mail.mail_id, detail=f"delivery record unavailable: {exc}"
            )
        if claim.result is ClaimResult.ALREADY_FINAL:
            span.set_attribute(SPAN_DUPLICATE, True)
            status = claim.record.status if claim.record else "final"
            return DeliveryResult(
                Outcome.DUPLICATE, mail.mail_id, detail=f"already {status}: not sent again"
            )
        if claim.result is ClaimResult.IN_PROGRESS:
            return DeliveryResult(
                Outcome.DEFERRED,
                mail.mail_id,
                detail="another delivery of this mail is in progress",
            )
        # Claimed past its give-up time: expired, never sent (docs/deliver-by.md).
        deliver_by = mail.deliver_by or (claim.record.deliver_by if claim.record else None)
        if deliver_by is not None and deliver_by <= dt.datetime.now(dt.UTC):
            return self._expire(mail, claim.attempt_number, deliver_by)
        return self._send(mail, claim.attempt_number, message.message_id, trace_id, deadline)

    def _send(
        self,
        mail: QueuedMail,
        attempt_number: int,
        message_id: str,
        trace_id: str,
        deadline: float | None = None,
    ) -> DeliveryResult:
        started = dt.datetime.now(dt.UTC)
        traceparent = current_traceparent()  # the current span is `mail deliver`
        screened, recipients = Screened([], []), list[str]()
        try:
            # Inside the try: a mail that cannot be built bounces (UndeliverableMail, step
            # "build"), recorded and acked, instead of failing the same way on every redelivery.
            mail_from, recipients = envelope(mail)
            if self._screen is not None:
                screened = self._screen.screen(mail, recipients)
                recipients = screened.send_to
                if not recipients:
                    numbers = (attempt_number, started, message_id, trace_id)
                    return self._suppressed(mail, screened, *numbers)
            data = message_bytes(
                build_message(
                    mail,
                    message_id_domain=self._message_id_domain,
                    traceparent=traceparent,
                )
            )
            receipt = self._sender.send(
                mail_from=mail_from,
                recipients=recipients,
                message=data,
                deadline=deadline,
                before_mail_from=self._claim_check(mail.mail_id, attempt_number),
                sandbox=bool(mail.request.sandbox),
            )
        except _NotSent as stop:
            return self._not_sent(mail, stop, attempt_number, started, message_id, trace_id)
        except DeliveryError as exc:
            outcome = Outcome.DEFERRED if exc.transient else Outcome.BOUNCED
            refusals = dict(exc.refused)  # RCPT TO's refusals, even when DATA failed after them
            left = [rcpt for rcpt in recipients if rcpt not in refusals]
            if exc.step == "data" and len(left) == 1 and not exc.transient:
                # A permanent refusal after DATA with one recipient left is that recipient's.
                refusals[left[0]] = (exc.reply_code or 0, exc.reply_message or "")
            results = screened.results + self._learn(mail, refusals)
            self._announce_suppressed(mail, screened, attempt_number)
            self._finish(
                mail,
                Attempt(
                    number=attempt_number,
                    started_at=started,
                    finished_at=dt.datetime.now(dt.UTC),
                    outcome=str(outcome),
                    reply_code=exc.reply_code,
                    enhanced_status=exc.enhanced_status,
                    reply_message=self._clean(exc.reply_message or str(exc)),
                    failed_step=exc.step,
                    trace_id=trace_id,
                    message_id=message_id,
                    recipients=results,
                ),
            )
            if self._metrics is not None:
                if outcome is Outcome.DEFERRED:
                    self._metrics.deferred(
                        reply_code=exc.reply_code, enhanced_status=exc.enhanced_status
                    )
                else:
                    self._metrics.bounced(
                        reply_code=exc.reply_code, enhanced_status=exc.enhanced_status
                    )
                    self._metrics.delivery_attempts(attempt_number)
            return DeliveryResult(
                outcome,
                mail.mail_id,
                detail=self._clean(exc.summary()),
                reply_code=exc.reply_code,
                enhanced_status=exc.enhanced_status,
            )

        refused = "; ".join(
            f"{redact_address(rcpt, self._address_style)}: {code} {text}".rstrip()
            for rcpt, (code, text) in receipt.refused.items()
        )
        reply = self._clean(receipt.reply_message or "")
        outcome = Outcome.SANDBOXED if receipt.sandboxed else Outcome.DELIVERED
        results = screened.results + self._learn(mail, receipt.refused)
        self._announce_suppressed(mail, screened, attempt_number)
        self._finish(
            mail,
            Attempt(
                number=attempt_number,
                started_at=started,
                finished_at=dt.datetime.now(dt.UTC),
                outcome=str(outcome),
                reply_code=receipt.reply_code,
                enhanced_status=receipt.enhanced_status,
                reply_message=reply + (f" (refused: {self._clean(refused)})" if refused else ""),
                trace_id=trace_id,
                message_id=message_id,
                recipients=results,
            ),
        )
        if self._metrics is not None:
            latency = (dt.datetime.now(dt.UTC) - mail.accepted_at).total_seconds()
            if receipt.sandboxed:
                self._metrics.sandboxed()
            else:
                self._metrics.delivered(latency_seconds=max(latency, 0.0), attempt=attempt_number)
            self._metrics.delivery_attempts(attempt_number)
        return DeliveryResult(
            outcome,
            mail.mail_id,
            detail=reply,
            reply_code=receipt.reply_code,
            enhanced_status=receipt.enhanced_status,
        )

    def _learn(
        self, mail: QueuedMail, refused: Mapping[str, tuple[int, str]]
    ) -> tuple[RecipientResult, ...]:
        return self._screen.learn(mail, refused) if self._screen and refused else ()

    def _announce_suppressed(self, mail: QueuedMail, screened: Screened, number: int) -> None:
        """The ``suppressed`` event and metric of the recipients left out of this attempt."""
        if not screened.suppressed:
            return
        if self._metrics is not None:
            self._metrics.suppressed(len(screened.suppressed))
        if self._events is not None:
            self._events.emit(
                EventType.SUPPRESSED,
                mail.mail_id,
                mail=mail,
                attempt=number,
                recipients=screened.suppressed,
            )

    def _suppressed(
        self,
        mail: QueuedMail,
        screened: Screened,
        attempt_number: int,
        started: dt.datetime,
        message_id: str,
        trace_id: str,
    ) -> DeliveryResult:
        """Every recipient is suppressed: record the mail ``suppressed`` (final), send nothing."""
        detail = f"every recipient ({len(screened.suppressed)}) is on the suppression list"
        self._announce_suppressed(mail, screened, attempt_number)
        attempt = Attempt(  # nothing was sent: no reply; finish() sets finished_at
            attempt_number,
            started,
            outcome=str(Outcome.SUPPRESSED),
            reply_message=detail,
            failed_step=CHECK_STEP,
            trace_id=trace_id,
            message_id=message_id,
            recipients=screened.results,
        )
        self._record_attempt(mail, attempt)
        return DeliveryResult(Outcome.SUPPRESSED, mail.mail_id, detail=detail)

    def _bounce_unsendable(
        self, unsendable: UnsendableMail, message_id: str, span: trace.Span
    ) -> DeliveryResult:
        """Bounce a mailpipe mail this version refuses (published before a rule tightened, or
        replayed): claimed and recorded like any attempt, then acked. Never sent."""
        mail_id = unsendable.mail_id
        span.set_attribute(SPAN_MAIL_ID, mail_id)
        trace_id = format(span.get_span_context().trace_id, "032x")
        try:
            claim = self._record.claim(
                mail_id,
                message_id=message_id,
                trace_id=trace_id,
                lease_seconds=self._lease_seconds,
                accepted_at=unsendable.accepted_at,
                recipient_domains=(),
            )
        except RecordError as exc:
            return DeliveryResult(
                Outcome.DEFERRED, mail_id, detail=f"delivery record unavailable: {exc}"
            )
        if claim.result is ClaimResult.ALREADY_FINAL:
            status = claim.record.status if claim.record else "final"
            return DeliveryResult(
                Outcome.DUPLICATE, mail_id, detail=f"already {status}: not sent again"
            )
        if claim.result is ClaimResult.IN_PROGRESS:
            return DeliveryResult(
                Outcome.DEFERRED, mail_id, detail="another delivery of this mail is in progress"
            )
        error = UndeliverableMail(str(unsendable), step="decode")
        log.error("bouncing mail %s: %s", mail_id, unsendable.reason)
        now = dt.datetime.now(dt.UTC)
        try:
            self._record.finish(
                mail_id,
                Attempt(
                    number=claim.attempt_number,
                    started_at=now,
                    finished_at=now,
                    outcome=str(Outcome.BOUNCED),
                    reply_message=self._clean(str(error)),
                    failed_step=error.step,
                    trace_id=trace_id,
                    message_id=message_id,
                ),
            )
        except RecordError as exc:  # nothing was sent: a retry is safe and records the bounce
            return DeliveryResult(
                Outcome.DEFERRED, mail_id, detail=f"delivery record unavailable: {exc}"
            )
        if self._metrics is not None:
            self._metrics.bounced(reply_code=None, enhanced_status=None)
            self._metrics.delivery_attempts(claim.attempt_number)
        if self._events is not None:
            self._events.emit(
                EventType.BOUNCED, mail_id, attempt=claim.attempt_number, reply=error.summary()
            )
        return DeliveryResult(Outcome.BOUNCED, mail_id, detail=error.summary())

    def _expire(self, mail: QueuedMail, attempt: int, deliver_by: dt.datetime) -> DeliveryResult:
        """Claimed past its deliver_by: ``expired`` (final), acked, never sent."""
        detail = f"not sent: deliver_by {deliver_by.isoformat()} has passed"
        try:
            self._record.expire(mail.mail_id, reason=detail)
        except RecordError as exc:  # nothing was sent: the retry expires it
            return DeliveryResult(Outcome.DEFERRED, mail.mail_id, detail=f"record: {exc}")
        if self._metrics is not None:
            self._metrics.expired()
        if self._events is not None:
            self._events.emit(EventType.EXPIRED, mail.mail_id, mail=mail, attempt=attempt)
        return DeliveryResult(Outcome.EXPIRED, mail.mail_id, detail=detail)

    def _clean(self, text: str) -> str:
        """``text`` as it may be kept: no registered secret, addresses as configured."""
        return redact_addresses(redact_secrets(text), self._address_style)

    def _claim_check(self, mail_id: str, attempt_number: int) -> Callable[[], None]:
        """The sender's ``before_mail_from``: renew this attempt's claim, or stop the send.

        Runs once the SMTP connection is held (the wait for it may have outlasted the lease, and
        a redelivered copy may have claimed the mail meanwhile).
        """

        def check() -> None:
            try:
                renewal = self._record.renew_lease(
                    mail_id, attempt_number=attempt_number, lease_seconds=self._lease_seconds
                )
            except RecordError as exc:
                raise _NotSent(
                    Outcome.DEFERRED,
                    "not sent: the delivery record could not confirm this delivery's claim "
                    f"before MAIL FROM: {exc}",
                ) from exc
            if renewal.result is RenewalResult.FINAL:
                status = renewal.record.status if renewal.record else "final"
                raise _NotSent(
                    Outcome.DUPLICATE,
                    f"already {status} (found before MAIL FROM): not sent again",
                )
            if renewal.result is RenewalResult.LOST:
                taker = (
                    f"attempt {renewal.record.attempt_count} claimed the mail; that delivery "
                    "sends it"
                    if renewal.record is not None
                    else "the mail's record is gone; a retry claims it again"
                )
                raise _NotSent(
                    Outcome.DEFERRED,
                    f"not sent: the claim of attempt {attempt_number} ran out before MAIL FROM "
                    f"and {taker}",
                )

        return check

    def _not_sent(
        self,
        mail: QueuedMail,
        stop: _NotSent,
        attempt_number: int,
        started: dt.datetime,
        message_id: str,
        trace_id: str,
    ) -> DeliveryResult:
        """The claim check stopped the send before MAIL FROM: record why (unless already final)."""
        if stop.outcome is Outcome.DUPLICATE:
            trace.get_current_span().set_attribute(SPAN_DUPLICATE, True)
            return DeliveryResult(Outcome.DUPLICATE, mail.mail_id, detail=stop.detail)
        self._finish(
            mail,
            Attempt(
                number=attempt_number,
                started_at=started,
                finished_at=dt.datetime.now(dt.UTC),
                outcome=str(Outcome.DEFERRED),
                reply_message=stop.detail,
                failed_step=CLAIM_STEP,
                trace_id=trace_id,
                message_id=message_id,
            ),
        )
        if self._metrics is not None:
            self._metrics.deferred(reply_code=None, enhanced_status=None)
        return DeliveryResult(Outcome.DEFERRED, mail.mail_id, detail=stop.detail)

    def _finish(self, mail: QueuedMail, attempt: Attempt) -> None:
        self._record_attempt(mail, attempt)
        # Inside `mail deliver`: the event joins the mail's trace.
        if self._events is not None and attempt.outcome:
            self._events.emit(
                EventType(attempt.outcome),
                mail.mail_id,
                mail=mail,
                attempt=attempt.number,
                reply_code=attempt.reply_code,
                enhanced_status=attempt.enhanced_status,
                reply=attempt.reply_message,
            )

    def _record_attempt(self, mail: QueuedMail, attempt: Attempt) -> None:
        # After a 250 the mail is out: a record failure here must not nack (that would send it
        # again). The claim's lease expires and a redelivery would find the mail `sending`.
        for delay in (0.0, 0.2, 1.0):
            time.sleep(delay)
            try:
                self._record.finish(mail.mail_id, attempt)
                return
            except RecordError as exc:
                last = exc
        log.error("could not record attempt %s of mail %s: %s", attempt.number, mail.mail_id, last)
