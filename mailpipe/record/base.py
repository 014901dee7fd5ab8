"""The delivery record: its model, its errors and its rules, written once for every backend.

The status lifecycle and the rules that span methods (atomic claims and leases, final statuses,
idempotency scopes, ``unconfirmed``, which mail ids a record takes) are in
docs/decisions/0002-delivery-record-effectively-once.md; each method's docstring says its own.
:class:`DeliveryRecord` writes them once over a backend's :class:`~mailpipe.record.store.Store`;
tests/integration/test_record_backends.py tests them on each backend.

Errors::

    RecordError                 base of everything the record raises
    ├── RecordUnavailable       the backend cannot be reached or timed out (callers retry / nack)
    ├── MailNotFound            the operation needs a record that does not exist
    ├── AlreadyFinal            the mail was delivered or bounced: replaying it is refused
    └── InvalidMailId           (also a ValueError) no backend can key a record by this id
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mailpipe.record.store import (
    IDEMPOTENCY,
    MAILS,
    Store,
    Transaction,
    decode,
    encode,
    id_problem,
    key_hash,
    utc,
    utc_now,
)
from mailpipe.record.suppressions import SuppressionList, SuppressionPolicy, SuppressionReason

__all__ = [  # what other packages import from mailpipe.record
    "AlreadyFinal",
    "Attempt",
    "ClaimResult",
    "DeliveryRecord",
    "InvalidMailId",
    "MailNotFound",
    "MailRecord",
    "MailStatus",
    "RecipientResult",
    "RecordError",
    "RecordUnavailable",
    "RenewalResult",
    "SuppressionList",
    "SuppressionPolicy",
    "SuppressionReason",
    "open_record",
]
R = TypeVar("R")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# How long a reservation holds its idempotency key unless the caller says (the publisher passes
# MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS); also the expiry of reservations written before
# records carried ``reserved_until``.
DEFAULT_RESERVATION_SECONDS = 300.0


class RecordError(Exception):
    """Base class of the delivery record's errors."""


class RecordUnavailable(RecordError):
    """The record backend could not be reached; the operation may be retried."""


class MailNotFound(RecordError):
    """The operation needs the mail's record, and there is none."""


class AlreadyFinal(RecordError):
    """The mail was delivered or bounced; the operation would send it again."""


class InvalidMailId(RecordError, ValueError):
    """No backend can key a record by this mail id; the text says which rule it breaks."""


class MailStatus(enum.StrEnum):
    ACCEPTING = "accepting"
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEAD_LETTERED = "dead_lettered"
    REPLAYED = "replayed"
    # Reconciled: the last delivery attempt's outcome was never recorded (publisher/reconcile.py).
    UNCONFIRMED = "unconfirmed"
    SANDBOXED = "sandboxed"  # a sandbox mail the relay would have taken (RSET after RCPT)
    SUPPRESSED = "suppressed"  # every recipient on the suppression list: nothing sent
    EXPIRED = "expired"  # its deliver_by passed before it was delivered: given up, never sent

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(map(MailStatus, ("delivered", "bounced", "sandboxed", "suppressed", "expired")))
_OUTCOMES = ("delivered", "deferred", "bounced", "sandboxed", "suppressed")


@dataclass(frozen=True)
class RecipientResult:
    """What became of one recipient in an attempt: ``suppressed`` (left out of RCPT) or
    ``refused`` (5xx at RCPT); ``recipient`` as ``MAILPIPE_LOG_ADDRESSES`` allows."""

    recipient: str
    status: str
    reply_code: int | None = None
    enhanced_status: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: when, by whom, and what the SMTP server answered."""

    number: int
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    outcome: str | None = None  # delivered | deferred | bounced | sandboxed
    reply_code: int | None = None
    enhanced_status: str | None = None
    reply_message: str | None = None
    failed_step: str | None = None  # e.g. "rcpt to", "data", "connect"
    trace_id: str | None = None
    message_id: str | None = None  # the Pub/Sub message id of this delivery
    recipients: tuple[RecipientResult, ...] = ()  # the recipients not sent to, and why


@dataclass(frozen=True)
class MailRecord:
    """Everything known about one mail (stored as the document of its mail id, field by field)."""

    mail_id: str
    status: MailStatus
    accepted_at: dt.datetime
    updated_at: dt.datetime
    trace_id: str | None = None
    message_id: str | None = None  # Pub/Sub message id of the original publish
    idempotency_key: str | None = None
    recipient_domains: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    last_error: str | None = None
    replays: tuple[str, ...] = ()  # trace ids of replays
    delivered_at: dt.datetime | None = None
    attempt_count: int = 0  # claims so far = the number of the latest attempt, finished or not
    lease_until: dt.datetime | None = None  # the current claim's lease; None once finished
    idempotency_scope: str | None = None  # whose key it is (the caller); None: the shared scope
    request_hash: str | None = None  # fingerprint of the request that reserved the key
    reserved_until: dt.datetime | None = None  # while accepting: when the reservation expires
    deliver_by: dt.datetime | None = None  # the give-up time (docs/deliver-by.md)
    next_attempt_at: dt.datetime | None = None  # dead-lettered: when `dlq replay --due` retries


class ClaimResult(enum.StrEnum):
    CLAIMED = "claimed"  # go ahead and send
    ALREADY_FINAL = "already_final"  # delivered or bounced before: ack without sending
    IN_PROGRESS = "in_progress"  # another delivery holds an unexpired lease: nack, retry later


class RenewalResult(enum.StrEnum):
    RENEWED = "renewed"  # still this attempt's claim; the lease now runs from now: send
    LOST = "lost"  # a later claim took the mail over (this lease had run out): do not send
    FINAL = "final"  # delivered or bounced meanwhile: do not send, ack


@dataclass(frozen=True)
class Claim:
    """Answer of :meth:`DeliveryRecord.claim` and of :meth:`DeliveryRecord.renew_lease`."""

    result: ClaimResult | RenewalResult
    attempt_number: int = 0
    record: MailRecord | None = None


@dataclass(frozen=True)
class Reservation:
    """Answer of :meth:`DeliveryRecord.reserve`: ``created`` False means the key was seen before."""

    created: bool
    record: MailRecord


def check_mail_id(mail_id: str) -> None:
    """Raise :class:`InvalidMailId` unless ``mail_id`` can key a record."""
    problem = id_problem(mail_id)
    if problem is not None:
        shown = mail_id[:80] if isinstance(mail_id, str) else mail_id
        raise InvalidMailId(f"mail id {shown!r} {problem}")


def _positive(seconds: float, name: str) -> dt.timedelta:
    if seconds <= 0:
        raise ValueError(f"{name} must be positive")
    return dt.timedelta(seconds=seconds)


def describe_error(attempt: Attempt) -> str:
    """``last_error`` for a failed attempt, e.g. ``"451 4.3.0 at rcpt to: try later"``."""
    code = str(attempt.reply_code) if attempt.reply_code is not None else attempt.outcome or "?"
    step = attempt.failed_step and f"at {attempt.failed_step}"
    text = " ".join(part for part in (code, attempt.enhanced_status, step) if part)
    return f"{text}: {attempt.reply_message}" if attempt.reply_message else text


# --- reconcile's rules: records no live request or delivery will move on ---------------------


def reservation_expires_at(record: MailRecord) -> dt.datetime | None:
    """When an ``accepting`` record's reservation expires; ``None`` for any other status."""
    if record.status is not MailStatus.ACCEPTING:
        return None
    if record.reserved_until is not None:
        return record.reserved_until
    return record.updated_at + dt.timedelta(seconds=DEFAULT_RESERVATION_SECONDS)


def passed(moment: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether ``moment`` (e.g. from the function above) is set and not in the future."""
    return moment is not None and moment <= now


Found = MailRecord | None
# A rule: from the mail's record (None: there is none) and the time, the answer and the record
# to write (None: write nothing).
Rule = Callable[[Found, dt.datetime], tuple[R, Found]]


class DeliveryRecord:
    """The delivery record over a backend's store, safe to share between threads (its rules: the
    module docstring). :func:`open_record` opens one."""

    def __init__(self, store: Store, *, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self.store = store  # also for reads outside these rules (publisher/listing.py)
        self._clock = clock

    @staticmethod
    def _read(txn: Transaction, mail_id: str) -> Found:
        doc = txn.get(MAILS, mail_id)
        return None if doc is None else decode(MailRecord, doc)

    @staticmethod
    def _write(txn: Transaction, record: MailRecord, *, new: bool = False) -> None:
        txn.put(MAILS, record.mail_id, encode(record), record.accepted_at, new)

    def _apply(self, operation: str, mail_id: str, rule: Rule[R]) -> R:
        """Read the mail's record, apply ``rule``, write what it returns: one transaction."""

        def body(txn: Transaction) -> R:
            answer, new = rule(self._read(txn, mail_id), self._clock())
            if new is not None:
                self._write(txn, new)
            return answer

        return self.store.transact(operation, body)

    def reserve(
        self,
        *,
        mail_id: str,
        accepted_at: dt.datetime,
        recipient_domains: tuple[str, ...],
        idempotency_key: str | None,
        idempotency_scope: str | None = None,
        request_hash: str | None = None,
        reservation_seconds: float = DEFAULT_RESERVATION_SECONDS,
        deliver_by: dt.datetime | None = None,
    ) -> Reservation:
        """Create the record ``accepting`` until now + ``reservation_seconds``, atomically
        claiming ``idempotency_key`` within ``idempotency_scope``. If the key is held (by an
        unexpired reservation or a published mail) or ``mail_id`` exists: ``created=False`` with
        that record, nothing created; what to answer (409, 422, a replay) is the caller's call."""
        check_mail_id(mail_id)
        hold = _positive(reservation_seconds, "reservation_seconds")
        key_id = None if idempotency_key is None else key_hash(idempotency_key, idempotency_scope)

        def body(txn: Transaction) -> Reservation:
            now = self._clock()
            held = None if key_id is None else txn.get(IDEMPOTENCY, key_id)
            holder = None if held is None else self._read(txn, held["mail_id"])
            if holder is not None and not passed(reservation_expires_at(holder), now):
                return Reservation(created=False, record=holder)
            existing = self._read(txn, mail_id)
            if existing is not None:
                return Reservation(created=False, record=existing)
            record = MailRecord(
                mail_id=mail_id,
                status=MailStatus.ACCEPTING,
                accepted_at=utc(accepted_at),
                updated_at=now,
                idempotency_key=idempotency_key,
                recipient_domains=tuple(recipient_domains),
                idempotency_scope=idempotency_scope if idempotency_key is not None else None,
                request_hash=request_hash,
                reserved_until=now + hold,
                deliver_by=deliver_by,
            )
            if holder is not None:  # left by a crash: the key is ours
                txn.delete(MAILS, holder.mail_id)
            self._write(txn, record, new=True)
            if key_id is not None:  # a key whose mail is gone (TTL) is taken over, too
                txn.put(IDEMPOTENCY, key_id, {"mail_id": mail_id}, record.accepted_at, not held)
            return Reservation(created=True, record=record)

        return self.store.transact("reserve", body)

    def mark_queued(
        self,
        mail_id: str,
        *,
        message_id: str,
        trace_id: str | None,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
        deliver_by: dt.datetime | None = None,
    ) -> None:
        """The publish succeeded: ``accepting`` → ``queued`` with Pub/Sub's message id.

        Without a record: created ``queued`` when ``accepted_at`` is given (a mail published
        without :meth:`reserve`, which only a mail with an idempotency key needs), else
        :class:`MailNotFound`.
        """
        mail: dict[str, Any] = {"mail_id": mail_id, "message_id": message_id, "trace_id": trace_id}
        mail |= {"accepted_at": accepted_at, "recipient_domains": recipient_domains}
        self.mark_queued_many([{**mail, "deliver_by": deliver_by}])

    def mark_queued_many(self, mails: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`mark_queued` of each of ``mails`` (its arguments by name) in one transaction,
        so at most 500 (Firestore's writes per transaction)."""
        for mail in mails:
            check_mail_id(mail["mail_id"])

        def queued(record: Found, now: dt.datetime, mail: Mapping[str, Any]) -> MailRecord:
            if record is None:
                if mail.get("accepted_at") is None:
                    raise MailNotFound(f"no record for mail {mail['mail_id']}")
                at, domains = mail["accepted_at"], mail.get("recipient_domains", ())
                record = _new(mail["mail_id"], MailStatus.ACCEPTING, at, now, domains)
            return dataclasses.replace(
                record,
                status=MailStatus.QUEUED
                if record.status is MailStatus.ACCEPTING
                else record.status,
                reserved_until=None,  # the reservation's work is done: the key now holds for good
                message_id=record.message_id or mail["message_id"],
                trace_id=record.trace_id or mail.get("trace_id"),
                deliver_by=record.deliver_by or mail.get("deliver_by"),
                updated_at=now,
            )

        def body(txn: Transaction) -> None:
            found = [self._read(txn, mail["mail_id"]) for mail in mails]  # reads before writes
            now = self._clock()
            for mail, record in zip(mails, found, strict=True):
                self._write(txn, queued(record, now, mail))

        self.store.transact("mark_queued", body)

    def release(self, mail_id: str, *, expired_only: bool = False) -> MailRecord | None:
        """The publish failed: delete the record while still ``accepting`` (a claimed record
        shows the publish did go through) and free its key for the client's retry. With
        ``expired_only`` (reconcile), only past its ``reserved_until``. The deleted record."""
        if id_problem(mail_id):
            return None  # no record can have this id

        def body(txn: Transaction) -> Found:
            record = self._read(txn, mail_id)
            expires = None if record is None else reservation_expires_at(record)
            if record is None or expires is None or (expired_only and expires > self._clock()):
                return None
            key = record.idempotency_key
            key_id = None if key is None else key_hash(key, record.idempotency_scope)
            held = None if key_id is None else txn.get(IDEMPOTENCY, key_id)  # reads before writes
            txn.delete(MAILS, mail_id)
            if key_id is not None and held is not None and held.get("mail_id") == mail_id:
                txn.delete(IDEMPOTENCY, key_id)  # the key still points at this reservation
            return record

        return self.store.transact("release", body)

    def update(self, mail_id: str, change: Rule[R], operation: str = "update") -> R:
        """For operations outside the core (ops' replay and reconcile): :data:`Rule` ``change``
        applied in one transaction. :class:`InvalidMailId` if no record can have this id."""
        check_mail_id(mail_id)
        return self._apply(operation, mail_id, change)

    def claim(
        self,
        mail_id: str,
        *,
        message_id: str | None,
        trace_id: str | None,
        lease_seconds: float,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
        deliver_by: dt.datetime | None = None,
    ) -> Claim:
        """Start a delivery attempt. ``CLAIMED`` carries its number (``Attempt.number`` for
        :meth:`finish`) and the record as written; ``accepted_at`` and ``recipient_domains``
        (from the queued mail) serve only to create a missing record (else: accepted now)."""
        check_mail_id(mail_id)
        lease = _positive(lease_seconds, "lease_seconds")

        def rule(record: Found, now: dt.datetime) -> tuple[Claim, Found]:
            if record is None:
                # The mail reached the subscriber without a record (the publisher's write lagged
                # or failed, or the mail predates the record): deliver it, record it from here.
                ids = {"trace_id": trace_id, "message_id": message_id, "deliver_by": deliver_by}
                at = accepted_at or now
                record = _new(mail_id, MailStatus.QUEUED, at, now, recipient_domains, **ids)
            count = record.attempt_count
            if record.status.final:
                return Claim(ClaimResult.ALREADY_FINAL, count, record), None
            if _leased(record, now):
                return Claim(ClaimResult.IN_PROGRESS, count, record), None
            new = dataclasses.replace(
                record,
                status=MailStatus.SENDING,
                attempt_count=count + 1,
                lease_until=now + lease,
                updated_at=now,
            )
            return Claim(ClaimResult.CLAIMED, count + 1, new), new

        return self._apply("claim", mail_id, rule)

    def renew_lease(self, mail_id: str, *, attempt_number: int, lease_seconds: float) -> Claim:
        """The claimant's check just before it sends: ``RENEWED`` (the lease then ends
        ``lease_seconds`` from now, never earlier) while the mail is not final and
        ``attempt_number`` is still its latest claim, even if that lease ran out; else ``LOST``
        (a later claim, or no record) or ``FINAL``, and nothing changes."""
        lease = _positive(lease_seconds, "lease_seconds")
        if id_problem(mail_id):
            return Claim(RenewalResult.LOST)  # no record can have this id

        def rule(record: Found, now: dt.datetime) -> tuple[Claim, Found]:
            if record is None:
                return Claim(RenewalResult.LOST), None
            if record.status.final:
                return Claim(RenewalResult.FINAL, record=record), None
            if record.attempt_count != attempt_number:
                return Claim(RenewalResult.LOST, record=record), None
            until = max(now + lease, record.lease_until or now)
            new = dataclasses.replace(record, lease_until=until, updated_at=now)
            return Claim(RenewalResult.RENEWED, attempt_number, new), new

        return self._apply("renew_lease", mail_id, rule)

    def finish(self, mail_id: str, attempt: Attempt) -> MailRecord:
        """Record the attempt (ValueError for an outcome not in ``_OUTCOMES``), set the status,
        ``last_error`` and ``delivered_at`` from it and end the lease; creates a missing record.
        A final status is kept, and so is a newer claim's lease over a stale ``deferred``."""
        check_mail_id(mail_id)
        if attempt.outcome not in _OUTCOMES:
            raise ValueError(
                f"attempt outcome must be one of {', '.join(_OUTCOMES)}, got {attempt.outcome!r}"
            )
        outcome = MailStatus(attempt.outcome)

        def rule(record: Found, now: dt.datetime) -> tuple[MailRecord, Found]:
            done = dataclasses.replace(attempt, finished_at=attempt.finished_at or now)
            if record is None:
                ids = {"trace_id": done.trace_id, "message_id": done.message_id}
                record = _new(mail_id, MailStatus.SENDING, done.started_at, now, (), **ids)
            superseded = done.number < record.attempt_count and _leased(record, now)
            new = dataclasses.replace(
                record,
                attempts=(*record.attempts, done),
                attempt_count=max(record.attempt_count, done.number),
                updated_at=now,
            )
            # Kept for the history only: never leave delivered/bounced, nor end a newer lease.
            if record.status.final or (superseded and not outcome.final):
                return new, new
            delivered = outcome is MailStatus.DELIVERED
            sandboxed = outcome is MailStatus.SANDBOXED
            new = dataclasses.replace(
                new,
                status=outcome,
                lease_until=None,
                last_error=None if delivered or sandboxed else describe_error(done),
                delivered_at=utc(done.finished_at or now) if delivered else None,
            )
            return new, new

        return self._apply("finish", mail_id, rule)

    def mark_dead_lettered(
        self,
        mail_id: str,
        *,
        last_error: str | None,
        next_attempt_at: dt.datetime | None = None,
        expire_at: dt.datetime | None = None,
    ) -> MailRecord | None:
        """The dead-letter consumer saw the mail; ``None`` without a record, a final record
        unchanged. ``expired`` instead when ``expire_at`` (its deliver_by) has passed."""
        if id_problem(mail_id):
            return None  # no record can have this id

        def rule(record: Found, now: dt.datetime) -> tuple[Found, Found]:
            if record is None or record.status.final:
                return record, None
            error = last_error if last_error is not None else record.last_error
            expired = expire_at is not None and expire_at <= now
            new = dataclasses.replace(
                record,
                status=MailStatus.EXPIRED if expired else MailStatus.DEAD_LETTERED,
                last_error=error,
                next_attempt_at=None if expired else next_attempt_at,
                lease_until=None if expired else record.lease_until,
                updated_at=now,
            )
            return new, new

        return self._apply("mark_dead_lettered", mail_id, rule)

    def expire(self, mail_id: str, *, reason: str) -> MailRecord | None:
        """Give the mail up now: ``expired`` (final) unless already final; ``None`` without one."""
        return self.mark_dead_lettered(mail_id, last_error=reason, expire_at=_EPOCH)

    def get(self, mail_id: str) -> MailRecord | None:
        if id_problem(mail_id):
            return None  # no record can have this id (and Firestore would refuse the path)
        doc = self.store.get_many(MAILS, [mail_id]).get(mail_id)
        return None if doc is None else decode(MailRecord, doc)

    def suppressions(self, policy: SuppressionPolicy) -> SuppressionList:
        """The suppression list kept in this record's store, keyed as ``policy`` says."""
        return SuppressionList(self.store, policy, self._clock)

    def close(self) -> None:
        self.store.close()


def _new(
    mail_id: str, status: MailStatus, at: dt.datetime, now: dt.datetime, domains: Any, **ids: Any
) -> MailRecord:
    """A record written for the first time, accepted ``at``."""
    return MailRecord(mail_id, status, utc(at), now, recipient_domains=tuple(domains), **ids)


def _leased(record: MailRecord, now: dt.datetime) -> bool:
    return record.lease_until is not None and record.lease_until > now


def open_record(url: str) -> DeliveryRecord:
    """Open the backend named by ``MAILPIPE_RECORD`` (``sqlite:///PATH`` or ``firestore://DB``)."""
    if url.startswith("sqlite:///"):
        from mailpipe.record.sqlite import SqliteRecord

        return SqliteRecord(url.removeprefix("sqlite:///"))
    if url.startswith("firestore://"):
        from mailpipe.record.firestore import FirestoreRecord

        return FirestoreRecord(database=url.removeprefix("firestore://") or "(default)")
    raise ValueError(f"unknown record backend {url!r}: use sqlite:///PATH or firestore://DATABASE")
