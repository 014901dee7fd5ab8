"""Dead-lettered mails: list them from the record, replay them from the dead-letter subscription.

A mail that exhausts ``max_delivery_attempts`` is forwarded by Pub/Sub to the dead-letter topic.
Two subscriptions read that topic: ``dead_letter_record`` (the subscriber marks the record
``dead_lettered``) and ``dead_letter`` (pull, consumed by nothing: it keeps the mails' data, which
the record does not store). So:

* :func:`list_dead_letters` reads the **record** (status ``dead_lettered``): ``mailpipe dlq list``.
* :class:`DeadLetterReplayer` pulls the **dead-letter subscription**, selects copies by their
  ``mail_id`` attribute (the copy has a new Pub/Sub message id), and for each selected mail:

  1. record says delivered or bounced → ack the copy, send nothing (``already_final``);
  2. otherwise, inside a new ``mail replay`` span (a new trace, linked to the original one from
     the copy's ``googclient_traceparent``): :func:`mark_replayed` *first* — it refuses a
     delivered mail atomically, so a replay never sends twice — then republish the original data
     and attributes to the mail topic (the client library's tracing carries the new trace to the
     subscriber), then ack the copy.

  Copies that are not selected are held while the scan runs (so they are not pulled again) and
  released at the end (``modify_ack_deadline 0``); a dry run releases everything and writes
  nothing.

* ``Selection(due=True)`` (``mailpipe dlq replay --due``, the scheduled job; docs/deliver-by.md):
  one pass that replays the ``dead_lettered`` mails whose ``next_attempt_at`` has come, expires
  (record ``expired``, event ``expired``, copy acked) those past their ``deliver_by``, and leaves
  the rest (``not_due``) for a later pass. Each replay is its own trace, linked to the previous
  attempt's and to the mail's first trace (carried in :data:`ORIGIN_TRACEPARENT`).

Errors::

    DlqError                     base of what this module raises
    └── DeadLetterUnavailable    Pub/Sub could not be reached to pull/ack/release (the run stops)

Per-mail failures (publish refused, record unavailable, no record) do not raise: they are
:class:`ReplayOutcome` values with ``ok`` False, so one bad mail does not stop a large replay.
Google's exceptions are translated in :func:`_translate_pubsub` only (through
:func:`publisher.pubsub.translate_api_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as api_exceptions
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mailpipe.attributes import (
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID,
    MESSAGING_SYSTEM,
    MESSAGING_SYSTEM_PUBSUB,
    PUBSUB_MAIL_ID,
    PUBSUB_TRACEPARENT,
    SPAN_MAIL_ID,
    SPAN_REPLAY_ORIGINAL_TRACE_ID,
    SPAN_REPLAY_OUTCOME,
    SPAN_REPLAY_SOURCE_MESSAGE_ID,
    context_from_traceparent,
    context_link,
    publisher_context,
    publisher_link,
)
from mailpipe.durations import DurationError, parse_duration
from mailpipe.durations import describe as describe_duration
from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import MailDecodeError, QueuedMail
from mailpipe.pubsub import PubSubUnavailable, translate_api_errors
from mailpipe.record import (
    AlreadyFinal,
    DeliveryRecord,
    MailNotFound,
    MailRecord,
    MailStatus,
    RecordError,
)
from publisher.listing import list_mails

log = logging.getLogger(__name__)

# Added by Pub/Sub to the dead-letter copy (CloudPubSubDeadLetterSourceDeliveryCount, ...) and by
# the client library (googclient_traceparent): never republished, the new publish sets its own.
STRIPPED_ATTRIBUTE_PREFIXES = ("CloudPubSubDeadLetter", "googclient_")
RELEASE_CHUNK = 500  # ack ids per modify_ack_deadline request (well under the 512 KB limit)
MAX_ACK_DEADLINE_SECONDS = 600  # Pub/Sub's maximum
# The mail's first traceparent, kept on replays so every attempt's trace links to the mail's.
ORIGIN_TRACEPARENT = "mailpipe_origin_traceparent"


class DlqError(Exception):
    """Base class of this module's errors."""


class DeadLetterUnavailable(DlqError, PubSubUnavailable):
    """The dead-letter subscription could not be pulled, acked or released."""


def _translate_pubsub(operation: str) -> contextlib.AbstractContextManager[None]:
    """Google's client exceptions become :class:`DeadLetterUnavailable`."""
    return translate_api_errors(f"Pub/Sub {operation} failed", DeadLetterUnavailable)


# --- time selection ----------------------------------------------------------------------------


def parse_since(text: str, *, now: dt.datetime) -> dt.datetime:
    """``--since``: an ISO 8601 time (UTC if no offset) or an age such as ``30m``, ``2h``, ``7d``
    (:mod:`mailpipe.durations`' grammar).

    Raises ValueError with a message saying what is accepted.
    """
    value = text.strip()
    try:
        age = parse_duration(value)
    except DurationError:
        age = None  # not an age: a time, or neither
    if age is not None:
        try:
            return now - dt.timedelta(seconds=age)
        except OverflowError:
            raise ValueError(
                f"{text!r} reaches back before the year 1: give a shorter age"
            ) from None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2026-11-23T10:00:00Z) nor an age: "
            f"{describe_duration(('m', 'h', 'd'))}"
        ) from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


# --- listing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead-lettered mail as ``mailpipe dlq list`` shows it."""

    mail_id: str
    recipient_domains: tuple[str, ...]
    last_reply: str | None
    attempts: int
    accepted_at: dt.datetime
    dead_lettered_at: dt.datetime
    age_seconds: float
    trace_id: str | None

    @classmethod
    def from_record(cls, record: MailRecord, *, now: dt.datetime) -> DeadLetterEntry:
        return cls(
            mail_id=record.mail_id,
            recipient_domains=record.recipient_domains,
            last_reply=last_reply(record),
            attempts=max(record.attempt_count, len(record.attempts)),
            accepted_at=record.accepted_at,
            dead_lettered_at=record.updated_at,
            age_seconds=max(0.0, (now - record.accepted_at).total_seconds()),
            trace_id=record.trace_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mail_id": self.mail_id,
            "recipient_domains": list(self.recipient_domains),
            "last_reply": self.last_reply,
            "attempts": self.attempts,
            "accepted_at": self.accepted_at.isoformat(),
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "age_seconds": round(self.age_seconds, 3),
            "trace_id": self.trace_id,
        }


def last_reply(record: MailRecord) -> str | None:
    """What the relay said last: ``last_error`` (e.g. ``451 4.3.0 at rcpt to: …``) or the last
    attempt's reply."""
    if record.last_error:
        return record.last_error
    if record.attempts:
        attempt = record.attempts[-1]
        parts = [str(p) for p in (attempt.reply_code, attempt.enhanced_status) if p is not None]
        text = " ".join(parts)
        if attempt.reply_message:
            text = f"{text}: {attempt.reply_message}" if text else attempt.reply_message
        return text or None
    return None


def list_dead_letters(
    record: DeliveryRecord,
    *,
    since: dt.datetime | None = None,
    limit: int = 100,
    now: dt.datetime | None = None,
) -> list[DeadLetterEntry]:
    """Dead-lettered mails, oldest first, accepted at or after ``since``; at most ``limit``.

    Pages through the record as needed (``limit`` may exceed one page). Raises
    :class:`mailpipe.record.RecordError` if the record cannot be read, ValueError if ``limit``
    is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    now = now or dt.datetime.now(dt.UTC)
    entries: list[DeadLetterEntry] = []
    token: str | None = None
    while len(entries) < limit:
        page = list_mails(
            record,
            status=MailStatus.DEAD_LETTERED,
            since=since,
            limit=min(1000, limit - len(entries)),
            page_token=token,
        )
        entries += [DeadLetterEntry.from_record(item, now=now) for item in page.items]
        token = page.next_page_token
        if token is None:
            break
    return entries


# --- replay ------------------------------------------------------------------------------------


class ReplayStatus(enum.StrEnum):
    """What happened to one selected mail."""

    REPLAYED = "replayed"  # republished to the mail topic; the copy was acked
    WOULD_REPLAY = "would_replay"  # dry run: would be republished
    ALREADY_FINAL = "already_final"  # record says delivered/bounced: nothing sent (copy acked)
    DUPLICATE_COPY = "duplicate_copy"  # another copy of a mail handled in this run (acked)
    IN_FLIGHT = "in_flight"  # --id not on the subscription, record shows it is being delivered
    NOT_FOUND = "not_found"  # --id not on the dead-letter subscription: nothing to replay
    NO_RECORD = "no_record"  # a copy without a delivery record: refused (wrong --record?)
    FAILED = "failed"  # record or publish failed; the copy stays on the subscription
    EXPIRED = "expired"  # --due: past its deliver_by: record expired, copy acked, not sent
    WOULD_EXPIRE = "would_expire"  # dry run of --due: would expire
    NOT_DUE = "not_due"  # --due: its next attempt has not come: the copy stays for a later pass

    @property
    def ok(self) -> bool:
        return self not in (ReplayStatus.NOT_FOUND, ReplayStatus.NO_RECORD, ReplayStatus.FAILED)


@dataclass(frozen=True)
class ReplayOutcome:
    """One mail's result. ``trace_id`` is the replay's new trace (``replayed`` only)."""

    mail_id: str
    status: ReplayStatus
    detail: str = ""
    record_status: str | None = None
    source_message_id: str | None = None  # the dead-letter copy's Pub/Sub message id
    message_id: str | None = None  # the republished message's id
    trace_id: str | None = None
    original_trace_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "mail_id": self.mail_id,
            "status": str(self.status),
            "ok": self.ok,
            "detail": self.detail,
            "record_status": self.record_status,
            "source_message_id": self.source_message_id,
            "message_id": self.message_id,
            "trace_id": self.trace_id,
            "original_trace_id": self.original_trace_id,
        }


@dataclass
class ReplayReport:
    """Every outcome of one run, plus how many copies were left alone (not selected)."""

    dry_run: bool
    outcomes: list[ReplayOutcome] = field(default_factory=list)
    left_alone: int = 0

    @property
    def ok(self) -> bool:
        return all(outcome.ok for outcome in self.outcomes)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[str(outcome.status)] = counts.get(str(outcome.status), 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "counts": self.counts(),
            "left_alone": self.left_alone,
            "outcomes": [outcome.to_json() for outcome in self.outcomes],
        }


@dataclass(frozen=True)
class Selection:
    """Which dead-lettered mails to replay: given ids, every one, or accepted since a time."""

    mail_ids: frozenset[str] = frozenset()
    all: bool = False
    since: dt.datetime | None = None
    due: bool = False  # those whose next attempt has come; expire those past deliver_by

    def __post_init__(self) -> None:
        if not (self.mail_ids or self.all or self.since is not None or self.due):
            raise ValueError("select mails to replay: give mail ids, all=True, since or due")

    def matches(self, mail_id: str, accepted_at: dt.datetime | None) -> bool:
        if self.mail_ids and mail_id not in self.mail_ids:
            return False
        if self.since is not None:
            return accepted_at is not None and accepted_at >= self.since
        return True


def republished_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """The original attributes, without Pub/Sub's dead-letter and the library's trace ones."""
    return {
        key: value
        for key, value in attributes.items()
        if not key.startswith(STRIPPED_ATTRIBUTE_PREFIXES)
    }


def _decoded(data: bytes, attributes: Mapping[str, str]) -> QueuedMail | None:
    try:
        return QueuedMail.from_pubsub(data, dict(attributes))
    except MailDecodeError:
        return None


def _deliver_by(data: bytes, attributes: Mapping[str, str]) -> dt.datetime | None:
    mail = _decoded(data, attributes)
    return mail.deliver_by if mail else None


def mark_replayed(record: DeliveryRecord, mail_id: str, *, trace_id: str | None) -> MailRecord:
    """The replay republishes it: ``replayed``, ``trace_id`` added to ``replays``. Call it
    *before* republishing: :class:`AlreadyFinal` for a delivered or bounced mail (never send
    twice), :class:`MailNotFound` without a record."""

    def rule(found: MailRecord | None, now: dt.datetime) -> tuple[MailRecord, MailRecord]:
        if found is None:
            raise MailNotFound(f"no record for mail {mail_id}")
        if found.status.final:
            raise AlreadyFinal(f"mail {mail_id} is {found.status}: not replayed")
        replays = (*found.replays, trace_id) if trace_id else found.replays
        new = dataclasses.replace(
            found,
            status=MailStatus.REPLAYED,
            replays=replays,
            next_attempt_at=None,
            updated_at=now,
        )
        return new, new

    return record.update(mail_id, rule, "mark_replayed")


def _accepted_at(
    record: MailRecord | None, data: bytes, attributes: Mapping[str, str]
) -> dt.datetime | None:
    if record is not None:
        return record.accepted_at
    try:
        return QueuedMail.from_pubsub(data, dict(attributes)).accepted_at
    except MailDecodeError:
        return None


OnOutcome = Callable[[ReplayOutcome], None]


class DeadLetterReplayer:
    """Replays dead-lettered mails; all collaborators are injected (see the module docstring).

    ``subscriber`` pulls ``dead_letter_subscription`` (a full path); ``publisher`` must be built
    with ``PublisherOptions(enable_open_telemetry_tracing=True)`` so the new trace continues into
    the subscriber; ``topic`` is the mail topic's full path. ``return_immediately`` makes an empty
    pull end the scan at once: right for the emulator; against production Pub/Sub leave it False
    (an immediate pull may come back empty while messages exist) and each scan ends with one pull
    that waits up to ``pull_timeout``.
    """

    def __init__(
        self,
        *,
        subscriber: pubsub_v1.SubscriberClient,
        publisher: pubsub_v1.PublisherClient,
        record: DeliveryRecord,
        tracer: trace.Tracer,
        dead_letter_subscription: str,
        topic: str,
        pull_batch: int = 100,
        pull_timeout: float = 10.0,
        return_immediately: bool = False,
        publish_timeout: float = 30.0,
        events: EventEmitter | None = None,
    ) -> None:
        self._events = events  # `replayed`, inside the `mail replay` span (docs/events.md)
        self._subscriber = subscriber
        self._publisher = publisher
        self._record = record
        self._tracer = tracer
        self._subscription = dead_letter_subscription
        self._topic = topic
        self._pull_batch = pull_batch
        self._pull_timeout = pull_timeout
        self._return_immediately = return_immediately
        self._publish_timeout = publish_timeout

    def replay(
        self,
        selection: Selection,
        *,
        dry_run: bool = False,
        on_outcome: OnOutcome | None = None,
    ) -> ReplayReport:
        """Replay the selected mails (see the module docstring); ``on_outcome`` sees each result.

        Raises :class:`DeadLetterUnavailable` if the subscription cannot be pulled; copies held
        so far are released first (best effort).
        """
        report = ReplayReport(dry_run=dry_run)
        held: list[str] = []  # ack ids to release at the end
        seen: set[str] = set()  # message ids: a copy pulled twice (lease expired) ends the scan
        handled: dict[str, ReplayOutcome] = {}  # mail id -> outcome of its first copy
        wanted = set(selection.mail_ids)

        def emit(outcome: ReplayOutcome) -> None:
            report.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

        try:
            while not (selection.mail_ids and not wanted):
                received = self._pull()
                if not received:
                    break
                # Keep every pulled copy leased for the whole run, so none comes back mid-scan.
                self._modify_deadline([m.ack_id for m in received], MAX_ACK_DEADLINE_SECONDS)
                fresh = 0
                for item in received:
                    message = item.message
                    if message.message_id in seen:
                        held.append(item.ack_id)
                        continue
                    seen.add(message.message_id)
                    fresh += 1
                    outcome, ack = self._handle(item, selection, dry_run, handled)
                    if outcome is None:
                        report.left_alone += 1
                    else:
                        wanted.discard(outcome.mail_id)
                        handled.setdefault(outcome.mail_id, outcome)
                        emit(outcome)
                    if ack:
                        self._ack(item.ack_id, outcome)
                    else:
                        held.append(item.ack_id)
                if not fresh:
                    break
        finally:
            self._release(held)
        for mail_id in sorted(wanted):
            emit(self._missing(mail_id))
        return report

    # --- one copy --------------------------------------------------------------------------

    def _handle(  # noqa: PLR0911 - one return per row of the decision table
        self,
        item: Any,
        selection: Selection,
        dry_run: bool,
        handled: Mapping[str, ReplayOutcome],
    ) -> tuple[ReplayOutcome | None, bool]:
        """``(outcome or None if not selected, whether to ack the copy)``."""
        message = item.message
        attributes = dict(message.attributes)
        mail_id = attributes.get(PUBSUB_MAIL_ID)
        if not mail_id or (selection.mail_ids and mail_id not in selection.mail_ids):
            return None, False  # not a mailpipe mail, or not asked for: left on the subscription
        source = message.message_id
        try:
            record = self._record.get(mail_id)
        except RecordError as exc:
            return ReplayOutcome(
                mail_id, ReplayStatus.FAILED, f"delivery record unavailable: {exc}", None, source
            ), False
        if not selection.matches(mail_id, _accepted_at(record, message.data, attributes)):
            return None, False
        first = handled.get(mail_id)
        if first is not None:
            if first.ok and not dry_run:
                return ReplayOutcome(
                    mail_id,
                    ReplayStatus.DUPLICATE_COPY,
                    f"another copy of this mail was {first.status} in this run",
                    None if record is None else str(record.status),
                    source,
                ), True
            return None, False
        if record is None:
            return ReplayOutcome(
                mail_id,
                ReplayStatus.NO_RECORD,
                "no delivery record for this mail: not replayed, so a mail that was delivered "
                "cannot be sent twice (is --record / MAILPIPE_RECORD the pipeline's record?)",
                None,
                source,
            ), False
        status = str(record.status)
        if selection.due and not record.status.final:
            return self._due(mail_id, message.data, attributes, source, record, dry_run)
        if record.status.final:
            return ReplayOutcome(
                mail_id,
                ReplayStatus.ALREADY_FINAL,
                f"already {status}: not sent again",
                status,
                source,
                original_trace_id=record.trace_id,
            ), not dry_run
        if dry_run:
            return ReplayOutcome(
                mail_id,
                ReplayStatus.WOULD_REPLAY,
                f"would be republished (record: {status})",
                status,
                source,
                original_trace_id=record.trace_id,
            ), False
        return self._republish(mail_id, message.data, attributes, source, record)

    def _due(
        self,
        mail_id: str,
        data: bytes,
        attributes: Mapping[str, str],
        source: str,
        record: MailRecord,
        dry_run: bool,
    ) -> tuple[ReplayOutcome, bool]:
        """``--due``: expire past deliver_by, replay when next_attempt_at has come, else leave."""
        now = dt.datetime.now(dt.UTC)
        status, due_at = str(record.status), record.next_attempt_at
        deliver_by = record.deliver_by or _deliver_by(data, attributes)
        out = functools.partial(ReplayOutcome, mail_id, record_status=status)
        out = functools.partial(out, source_message_id=source, original_trace_id=record.trace_id)
        if deliver_by is not None and deliver_by <= now:
            if dry_run:
                return out(ReplayStatus.WOULD_EXPIRE, f"deliver_by {deliver_by} passed"), False
            return self._expire(mail_id, data, attributes, deliver_by, out), True
        if record.status is not MailStatus.DEAD_LETTERED or due_at is None or due_at > now:
            why = f"next attempt at {due_at.isoformat()}" if due_at else f"record: {status}"
            return out(ReplayStatus.NOT_DUE, f"not due ({why}); left for a later pass"), False
        if dry_run:
            return out(ReplayStatus.WOULD_REPLAY, f"due since {due_at.isoformat()}"), False
        return self._republish(mail_id, data, attributes, source, record)

    def _expire(
        self,
        mail_id: str,
        data: bytes,
        attributes: Mapping[str, str],
        deliver_by: dt.datetime,
        out: Callable[..., ReplayOutcome],
    ) -> ReplayOutcome:
        """Past deliver_by: ``expired`` in the record, the ``expired`` event in the mail's trace."""
        origin = context_from_traceparent(attributes.get(ORIGIN_TRACEPARENT))
        with self._tracer.start_as_current_span(
            "mail expire", context=origin or publisher_context(attributes) or otel_context.Context()
        ) as span:
            span.set_attribute(SPAN_MAIL_ID, mail_id)
            reason = f"deliver_by {deliver_by.isoformat()} passed while dead-lettered"
            try:
                marked = self._record.expire(mail_id, reason=reason)
            except RecordError as exc:
                return out(ReplayStatus.FAILED, f"delivery record unavailable: {exc}")
            if marked is not None and marked.status is not MailStatus.EXPIRED:
                return out(ReplayStatus.ALREADY_FINAL, f"already {marked.status}: not expired")
            if self._events is not None:
                mail = _decoded(data, attributes)
                attempt = marked.attempt_count if marked else 0
                self._events.emit(EventType.EXPIRED, mail_id, mail=mail, attempt=attempt)
            return out(ReplayStatus.EXPIRED, reason, record_status="expired")

    def _republish(
        self,
        mail_id: str,
        data: bytes,
        attributes: Mapping[str, str],
        source: str,
        record: MailRecord,
    ) -> tuple[ReplayOutcome, bool]:
        origin = attributes.get(ORIGIN_TRACEPARENT) or attributes.get(PUBSUB_TRACEPARENT)
        links = [publisher_link(attributes)]  # the attempt before, and the mail's first trace:
        if origin and origin != attributes.get(PUBSUB_TRACEPARENT):
            links.append(context_link(context_from_traceparent(origin)))
        with self._tracer.start_as_current_span(
            "mail replay",
            context=otel_context.Context(),  # a new trace: the replay is its own operation
            kind=SpanKind.INTERNAL,
            links=[link for link in links if link],
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            span.set_attribute(SPAN_MAIL_ID, mail_id)
            span.set_attribute(MESSAGING_SYSTEM, MESSAGING_SYSTEM_PUBSUB)
            span.set_attribute(MESSAGING_DESTINATION_NAME, self._topic.rsplit("/", 1)[-1])
            span.set_attribute(SPAN_REPLAY_SOURCE_MESSAGE_ID, source)
            if record.trace_id:
                span.set_attribute(SPAN_REPLAY_ORIGINAL_TRACE_ID, record.trace_id)

            def outcome(status: ReplayStatus, detail: str, **kw: Any) -> ReplayOutcome:
                span.set_attribute(SPAN_REPLAY_OUTCOME, str(status))
                if not status.ok:
                    span.set_status(Status(StatusCode.ERROR, detail[:200]))
                return ReplayOutcome(
                    mail_id,
                    status,
                    detail,
                    source_message_id=source,
                    original_trace_id=record.trace_id,
                    **kw,
                )

            # Record first: mark_replayed refuses a delivered/bounced mail atomically, so a
            # delivery that finished after our read still cannot be sent twice.
            try:
                marked = mark_replayed(self._record, mail_id, trace_id=trace_id)
            except AlreadyFinal as exc:
                final = self._record.get(mail_id)
                status = str(final.status) if final else None
                return outcome(ReplayStatus.ALREADY_FINAL, str(exc), record_status=status), True
            except MailNotFound as exc:
                return outcome(ReplayStatus.NO_RECORD, str(exc)), False
            except RecordError as exc:
                return outcome(ReplayStatus.FAILED, f"delivery record unavailable: {exc}"), False

            try:
                kept = republished_attributes(attributes)
                if origin:
                    kept[ORIGIN_TRACEPARENT] = origin
                future = self._publisher.publish(self._topic, data, **kept)
                message_id = str(future.result(timeout=self._publish_timeout))
            # Any failure (API error, timeout, too large) leaves the copy on the subscription.
            except Exception as exc:
                detail = f"republish failed: {exc}"
                self._undo_replayed(mail_id, detail, record.next_attempt_at)
                return outcome(ReplayStatus.FAILED, detail), False
            span.set_attribute(MESSAGING_MESSAGE_ID, message_id)
            if self._events is not None:
                self._emit_replayed(mail_id, data, attributes, marked)
            return outcome(
                ReplayStatus.REPLAYED,
                f"republished as message {message_id}",
                record_status=str(marked.status),
                message_id=message_id,
                trace_id=trace_id,
            ), True

    def _emit_replayed(
        self, mail_id: str, data: bytes, attributes: Mapping[str, str], marked: MailRecord
    ) -> None:
        assert self._events is not None
        mail = _decoded(data, attributes)  # None: replayed all the same, recipients unknown
        self._events.emit(EventType.REPLAYED, mail_id, mail=mail, attempt=marked.attempt_count)

    def _undo_replayed(self, mail_id: str, detail: str, due: dt.datetime | None) -> None:
        """Put a mail whose republish failed back to ``dead_lettered``: ``dlq list`` shows it."""
        try:
            self._record.mark_dead_lettered(mail_id, last_error=detail, next_attempt_at=due)
        except RecordError:
            log.exception("could not put mail %s back to dead_lettered", mail_id)

    def _missing(self, mail_id: str) -> ReplayOutcome:
        """An id asked for by ``--id`` that no copy on the subscription carried."""
        try:
            record = self._record.get(mail_id)
        except RecordError as exc:
            return ReplayOutcome(
                mail_id, ReplayStatus.FAILED, f"delivery record unavailable: {exc}"
            )
        if record is None:
            return ReplayOutcome(
                mail_id,
                ReplayStatus.NOT_FOUND,
                "no such mail in the record and no copy on the dead-letter subscription",
            )
        status = str(record.status)
        if record.status.final:
            return ReplayOutcome(
                mail_id, ReplayStatus.ALREADY_FINAL, f"already {status}: not sent again", status
            )
        if record.status is MailStatus.DEAD_LETTERED:
            return ReplayOutcome(
                mail_id,
                ReplayStatus.NOT_FOUND,
                "dead-lettered, but its copy is not on the dead-letter subscription (older than "
                "the subscription's retention, or acked by someone else): it cannot be replayed",
                status,
            )
        return ReplayOutcome(
            mail_id,
            ReplayStatus.IN_FLIGHT,
            f"not on the dead-letter subscription; the record says {status} (already replayed "
            "or being delivered): nothing to do",
            status,
        )

    # --- Pub/Sub calls ---------------------------------------------------------------------

    def _pull(self) -> Sequence[Any]:
        request = {
            "subscription": self._subscription,
            "max_messages": self._pull_batch,
            "return_immediately": self._return_immediately,
        }
        try:
            with _translate_pubsub("pull"):
                response = self._subscriber.pull(request=request, timeout=self._pull_timeout)
        except DeadLetterUnavailable as exc:
            if isinstance(exc.__cause__, api_exceptions.DeadlineExceeded):
                return []  # a waiting pull that found nothing
            raise
        return list(response.received_messages)

    def _ack(self, ack_id: str, outcome: ReplayOutcome | None) -> None:
        try:
            with _translate_pubsub("acknowledge"):
                self._subscriber.acknowledge(
                    request={"subscription": self._subscription, "ack_ids": [ack_id]}
                )
        except DeadLetterUnavailable as exc:
            # The mail itself is handled; its copy comes back later and is then recognised
            # (the record says replayed/delivered), so this is only noise, not a double send.
            mail_id = outcome.mail_id if outcome else "?"
            log.warning("could not ack the dead-letter copy of mail %s: %s", mail_id, exc)

    def _modify_deadline(self, ack_ids: Sequence[str], seconds: int) -> None:
        for start in range(0, len(ack_ids), RELEASE_CHUNK):
            with _translate_pubsub("modify_ack_deadline"):
                self._subscriber.modify_ack_deadline(
                    request={
                        "subscription": self._subscription,
                        "ack_ids": list(ack_ids[start : start + RELEASE_CHUNK]),
                        "ack_deadline_seconds": seconds,
                    }
                )

    def _release(self, ack_ids: Sequence[str]) -> None:
        """Hand unselected copies back at once (best effort: they come back at their deadline)."""
        try:
            self._modify_deadline(ack_ids, 0)
        except DeadLetterUnavailable as exc:
            log.warning("could not release %d dead-letter copies: %s", len(ack_ids), exc)
