"""The delivery record's model and interface.

Errors::

    RecordError                 base of everything the record raises
    ├── RecordUnavailable       the backend cannot be reached or timed out (callers retry / nack)
    ├── IdempotencyConflict     an idempotency key is held by a request still being published
    ├── MailNotFound            the operation needs a record that does not exist
    ├── AlreadyFinal            the mail was delivered or bounced: replaying it is refused
    └── InvalidMailId           (also a ValueError) no backend can key a record by this id

Lifecycle of a mail's status::

    accepting ─publish ok─▶ queued ─claim─▶ sending ─250─▶ delivered
        │                     ▲   │            ├─4xx/timeout─▶ deferred ─claim─▶ sending …
        └─publish failed─▶ (released: the key is free again)   └─5xx─▶ bounced
    (no idempotency key) ─publish ok─▶ queued: nothing to reserve, one write after the publish
    deferred/queued/sending ─dead-letter consumer─▶ dead_lettered ─dlq replay─▶ replayed
    replayed ─claim─▶ sending …
    accepting past reserved_until ─reserve of its key / reconcile─▶ (released)
    sending past lease_until + grace ─reconcile─▶ unconfirmed ─claim─▶ sending …

``claim`` is atomic: of two concurrent deliveries of the same mail only one gets ``CLAIMED``;
a mail already delivered or bounced is never claimed again (at-least-once made effectively once).
Rules every backend follows (the shared suite tests them on each):

- A claim holds a lease (``lease_until``); while it is unexpired every other claim gets
  ``IN_PROGRESS``, whatever the status. ``finish`` ends the lease; an expired lease (a crashed
  worker) lets the next claim proceed with the next attempt number.
- Every non-final status is claimable (``accepting`` too: the publisher's ``mark_queued`` may lag
  behind the first delivery). A claim for a mail without a record creates it in ``sending``.
- Statuses never leave ``delivered`` or ``bounced``; ``mark_queued`` and ``mark_dead_lettered``
  never move a record backwards (they only fill in fields when it has moved on).
- ``release`` deletes only a record still ``accepting``; ``mark_replayed`` raises
  :class:`AlreadyFinal` for a delivered or bounced mail, so a replay never sends twice.
- ``renew_lease`` is the claimant's check just before it sends (after waiting for an SMTP
  connection): ``RENEWED`` only while the mail is not final and no later claim was made, and
  then the lease runs ``lease_seconds`` from now (never shortened); else ``LOST`` or ``FINAL``
  and nothing changes.
- An idempotency key is unique within its scope (the caller's identity; ``None`` is the one
  shared scope). A reservation holds its key until ``reserved_until``; after that the next
  ``reserve`` of the key, or :meth:`DeliveryRecord.release_expired_reservation`, frees it.
- ``unconfirmed`` is a ``sending`` whose delivery never recorded an outcome (its worker stopped,
  or the record write after the relay's answer failed): not final, so a later delivery of the
  mail still claims it, and a late ``finish`` of that attempt still records the real outcome.
- Mail ids follow Firestore's document-id rules on every backend (so a local run refuses what
  production would): non-empty valid Unicode, at most 1,500 UTF-8 bytes, no ``/``, not ``.`` or
  ``..``, not ``__…__``. Reads of any other id find nothing (``get`` → ``None``,
  ``mark_dead_lettered``, ``release_expired_reservation``, ``mark_unconfirmed`` → ``None``,
  ``release`` does nothing); writes raise :class:`InvalidMailId` before the backend is asked.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# How long a reservation holds its idempotency key unless the caller says (the publisher passes
# MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS); also the expiry of reservations written before
# records carried ``reserved_until``.
DEFAULT_RESERVATION_SECONDS = 300.0


class RecordError(Exception):
    """Base class of the delivery record's errors."""


class RecordUnavailable(RecordError):
    """The record backend could not be reached; the operation may be retried."""


class IdempotencyConflict(RecordError):
    """The idempotency key belongs to a request whose publish is still in progress."""


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
    # Reconciled: the last delivery attempt's outcome was never recorded (see the docstring).
    UNCONFIRMED = "unconfirmed"

    @property
    def final(self) -> bool:
        return self in (MailStatus.DELIVERED, MailStatus.BOUNCED)


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: when, by whom, and what the SMTP server answered."""

    number: int
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    outcome: str | None = None  # delivered | deferred | bounced
    reply_code: int | None = None
    enhanced_status: str | None = None
    reply_message: str | None = None
    failed_step: str | None = None  # e.g. "rcpt to", "data", "connect"
    trace_id: str | None = None
    message_id: str | None = None  # the Pub/Sub message id of this delivery


@dataclass(frozen=True)
class MailRecord:
    """Everything known about one mail."""

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

    def to_json(self) -> dict[str, object]:
        def iso(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "mail_id": self.mail_id,
            "status": str(self.status),
            "accepted_at": iso(self.accepted_at),
            "updated_at": iso(self.updated_at),
            "delivered_at": iso(self.delivered_at),
            "trace_id": self.trace_id,
            "message_id": self.message_id,
            "recipient_domains": list(self.recipient_domains),
            "last_error": self.last_error,
            "replays": list(self.replays),
            "attempts": [
                {
                    "number": a.number,
                    "started_at": iso(a.started_at),
                    "finished_at": iso(a.finished_at),
                    "outcome": a.outcome,
                    "reply_code": a.reply_code,
                    "enhanced_status": a.enhanced_status,
                    "reply_message": a.reply_message,
                    "failed_step": a.failed_step,
                    "trace_id": a.trace_id,
                    "message_id": a.message_id,
                }
                for a in self.attempts
            ],
        }


class ClaimResult(enum.StrEnum):
    CLAIMED = "claimed"  # go ahead and send
    ALREADY_FINAL = "already_final"  # delivered or bounced before: ack without sending
    IN_PROGRESS = "in_progress"  # another delivery holds an unexpired lease: nack, retry later


@dataclass(frozen=True)
class Claim:
    result: ClaimResult
    attempt_number: int = 0
    record: MailRecord | None = None


class RenewalResult(enum.StrEnum):
    RENEWED = "renewed"  # still this attempt's claim; the lease now runs from now: send
    LOST = "lost"  # a later claim took the mail over (this lease had run out): do not send
    FINAL = "final"  # delivered or bounced meanwhile: do not send, ack


@dataclass(frozen=True)
class LeaseRenewal:
    """Answer of :meth:`DeliveryRecord.renew_lease`."""

    result: RenewalResult
    record: MailRecord | None = None


@dataclass(frozen=True)
class Reservation:
    """Answer of :meth:`DeliveryRecord.reserve`: ``created`` False means the key was seen before."""

    created: bool
    record: MailRecord


@dataclass(frozen=True)
class Page:
    items: list[MailRecord]
    next_page_token: str | None = None


@runtime_checkable
class DeliveryRecord(Protocol):
    """The delivery record. Implementations are safe to share between threads."""

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
    ) -> Reservation:
        """Create the record in status ``accepting``, atomically claiming ``idempotency_key``
        within ``idempotency_scope``.

        If the key is already held, return ``Reservation(created=False, record=<the holder>)``
        (the caller answers with the original mail, or refuses a different ``request_hash``) and
        create nothing. The holder may still be ``accepting``: raising
        :class:`IdempotencyConflict` for that case is the caller's choice. A holder still
        ``accepting`` after its ``reserved_until`` (now + ``reservation_seconds``) is a
        reservation left by a crash: it is deleted and the key goes to this reserve. A second
        reserve of an existing ``mail_id`` also returns ``created=False`` with it.
        """
        ...

    def mark_queued(
        self,
        mail_id: str,
        *,
        message_id: str,
        trace_id: str | None,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
    ) -> None:
        """The publish succeeded: ``accepting`` → ``queued`` with Pub/Sub's message id.

        If a delivery already moved the record on, only ``message_id``/``trace_id`` are filled
        in. If there is no record: with ``accepted_at`` (a mail published without
        :meth:`reserve`, which only a mail with an idempotency key needs) it is created in
        ``queued``; without it :class:`MailNotFound` is raised.
        """
        ...

    def release(self, mail_id: str) -> None:
        """The publish failed: forget the reservation so a retry with the same key can succeed.

        Deletes the record only while it is ``accepting`` (a record a delivery has claimed shows
        the publish did go through); otherwise, or without a record, does nothing.
        """
        ...

    def release_expired_reservation(self, mail_id: str) -> MailRecord | None:
        """Reconcile: delete the record if it is still ``accepting`` past its
        ``reserved_until`` (its publisher crashed or lost the record before releasing it), and
        free its key. Returns the deleted record, ``None`` when nothing was deleted (the record
        moved on, is not expired yet, or is gone). Checked and done atomically.
        """
        ...

    def mark_unconfirmed(self, mail_id: str, *, grace_seconds: float) -> MailRecord | None:
        """Reconcile: ``sending`` whose lease ended more than ``grace_seconds`` ago →
        ``unconfirmed``, the lease cleared and ``last_error`` saying what is known.

        Returns the new record, ``None`` when nothing changed (another delivery claimed it since,
        or it finished, or it is not stalled). Checked and done atomically.
        """
        ...

    def claim(
        self,
        mail_id: str,
        *,
        message_id: str | None,
        trace_id: str | None,
        lease_seconds: float,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
    ) -> Claim:
        """Atomically start a delivery attempt (see the module docstring).

        ``CLAIMED`` carries the new attempt number (pass it to :meth:`finish` in
        ``Attempt.number``) and the record as written. ``accepted_at`` and
        ``recipient_domains`` (from the queued mail) are used only when the claim has to create
        the record; without them it is created as accepted now, with no domains.
        """
        ...

    def renew_lease(
        self, mail_id: str, *, attempt_number: int, lease_seconds: float
    ) -> LeaseRenewal:
        """Atomically check that claim ``attempt_number`` still holds the mail, and extend it.

        Called right before sending: ``RENEWED`` (the lease now ends ``lease_seconds`` from now,
        or later if it already did) while the mail is not delivered or bounced and its latest
        claim is this one — even if this lease had run out, as long as nobody claimed since.
        ``LOST`` when a later claim was made (or the record is gone), ``FINAL`` when the mail was
        delivered or bounced; both change nothing.
        """
        ...

    def finish(self, mail_id: str, attempt: Attempt) -> MailRecord:
        """Record the attempt's outcome and set the status from it.

        ``attempt.outcome`` must be ``delivered``, ``deferred`` or ``bounced`` (else ValueError).
        Appends the attempt, sets ``last_error`` (``None`` when delivered) and ``delivered_at``,
        and ends the lease. A final status is kept; a stale ``deferred`` (from a claim whose lease
        expired and was taken over) does not override the newer claim. Creates the record if it
        is missing.
        """
        ...

    def mark_dead_lettered(self, mail_id: str, *, last_error: str | None) -> MailRecord | None:
        """The dead-letter consumer saw the mail; ``None`` if it has no record.

        A delivered or bounced record is returned unchanged.
        """
        ...

    def mark_replayed(self, mail_id: str, *, trace_id: str | None) -> MailRecord:
        """``mailpipe dlq replay`` republishes it: status ``replayed``, ``trace_id`` appended to
        ``replays``; the next claim moves it to ``sending``.

        Call it *before* republishing: it raises :class:`AlreadyFinal` for a delivered or bounced
        mail (never send twice) and :class:`MailNotFound` without a record.
        """
        ...

    def get(self, mail_id: str) -> MailRecord | None: ...

    def get_by_idempotency_key(
        self, key: str, *, scope: str | None = None
    ) -> MailRecord | None: ...

    def list(
        self,
        *,
        status: MailStatus | None = None,
        since: dt.datetime | None = None,
        limit: int = 100,
        page_token: str | None = None,
    ) -> Page:
        """Records, oldest first, optionally by status and accepted at or after ``since``.

        Ordered by ``(accepted_at, mail_id)``; ``next_page_token`` is an opaque cursor (stable
        under concurrent inserts), ``None`` on the last page. ``limit`` is 1..1000 (else
        ValueError); a malformed ``page_token`` raises ValueError.
        """
        ...

    def oldest_undelivered(self) -> MailRecord | None:
        """The oldest mail still accepting, queued, sending, deferred or replayed (drives the
        lag alert; accepting too, so a reservation left by a crash is seen)."""
        ...

    def close(self) -> None: ...


def open_record(url: str) -> DeliveryRecord:
    """Open the backend named by ``MAILPIPE_RECORD`` (``sqlite:///PATH`` or ``firestore://DB``)."""
    if url.startswith("sqlite:///"):
        from mailpipe.record.sqlite import SqliteRecord

        return SqliteRecord(url.removeprefix("sqlite:///"))
    if url.startswith("firestore://"):
        from mailpipe.record.firestore import FirestoreRecord

        return FirestoreRecord(database=url.removeprefix("firestore://") or "(default)")
    raise ValueError(f"unknown record backend {url!r}: use sqlite:///PATH or firestore://DATABASE")
