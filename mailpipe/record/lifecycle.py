"""The status rules of the delivery record, as pure functions shared by every backend.

A backend reads the current :class:`MailRecord` (or ``None``) inside its own atomic section
(an SQLite ``BEGIN IMMEDIATE`` transaction, a Firestore transaction), asks a function here
what the record becomes, and writes that. So both backends follow the rules of
:mod:`mailpipe.record.base` by construction, and only storage differs between them.

It also holds what both backends need around the rules: UTC normalisation, the field
mapping of a record (:func:`to_fields` / :func:`from_fields`), page tokens and key hashing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from mailpipe.record.base import (
    DEFAULT_RESERVATION_SECONDS,
    AlreadyFinal,
    Attempt,
    Claim,
    ClaimResult,
    InvalidMailId,
    LeaseRenewal,
    MailNotFound,
    MailRecord,
    MailStatus,
    RenewalResult,
)

MAX_PAGE_SIZE = 1000
# Replayed mails are back on the mail topic: until delivered they count toward the lag alert.
# So do reservations (accepting): one left behind by a crash must not go unseen. Unconfirmed mails
# do not (reconcile settled them as far as the record can; Pub/Sub's own backlog alert covers a
# copy it still holds), nor do dead-lettered ones.
UNDELIVERED = (
    MailStatus.ACCEPTING,
    MailStatus.QUEUED,
    MailStatus.SENDING,
    MailStatus.DEFERRED,
    MailStatus.REPLAYED,
)
_OUTCOMES = {
    "delivered": MailStatus.DELIVERED,
    "deferred": MailStatus.DEFERRED,
    "bounced": MailStatus.BOUNCED,
}

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    """The default clock of the backends."""
    return dt.datetime.now(dt.UTC)


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


# Firestore's document-id rules (firebase.google.com/docs/firestore/quotas, "Collections,
# documents, and fields"): the emulator and production refuse these ids, or (with "/") read them
# as a path into another collection.
MAX_MAIL_ID_BYTES = 1500
_RESERVED_ID = re.compile(r"__.*__", re.DOTALL)


def mail_id_problem(mail_id: object) -> str | None:
    """Why ``mail_id`` cannot key a record (see :mod:`mailpipe.record.base`), or ``None``."""
    if not isinstance(mail_id, str) or not mail_id:
        return "must be a non-empty string"
    try:
        size = len(mail_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    problems = (
        (size > MAX_MAIL_ID_BYTES, f"is {size} bytes long in UTF-8; at most {MAX_MAIL_ID_BYTES}"),
        ("/" in mail_id, "must not contain '/'"),
        (mail_id in (".", ".."), "must not be '.' or '..'"),
        (bool(_RESERVED_ID.fullmatch(mail_id)), "must not start and end with '__' (reserved)"),
    )
    return next((problem for broken, problem in problems if broken), None)


def check_mail_id(mail_id: str) -> None:
    """Raise :class:`InvalidMailId` unless ``mail_id`` can key a record."""
    problem = mail_id_problem(mail_id)
    if problem is not None:
        shown = mail_id[:80] if isinstance(mail_id, str) else mail_id
        raise InvalidMailId(f"mail id {shown!r} {problem}")


def key_hash(idempotency_key: str, scope: str | None = None) -> str:
    """The stored form of an idempotency key in its scope: fixed length, safe as a document id.

    The shared scope (``None``) hashes the key alone (as records written before scopes did); a
    caller's scope is length-prefixed and joined with a line feed, which no key the API accepts
    contains, so no two (scope, key) pairs share a hash.
    """
    text = idempotency_key if scope is None else f"{len(scope)}:{scope}\n{idempotency_key}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def record_key_hash(record: MailRecord) -> str | None:
    """The key hash a record holds, ``None`` without an idempotency key."""
    if record.idempotency_key is None:
        return None
    return key_hash(record.idempotency_key, record.idempotency_scope)


# --- transitions -------------------------------------------------------------------------


def reserved(
    *,
    mail_id: str,
    accepted_at: dt.datetime,
    recipient_domains: tuple[str, ...],
    idempotency_key: str | None,
    now: dt.datetime,
    idempotency_scope: str | None = None,
    request_hash: str | None = None,
    reservation_seconds: float | None = None,
) -> MailRecord:
    """A new record in ``accepting`` (held until now + ``reservation_seconds``, if given)."""
    if reservation_seconds is not None and reservation_seconds <= 0:
        raise ValueError("reservation_seconds must be positive")
    return MailRecord(
        mail_id=mail_id,
        status=MailStatus.ACCEPTING,
        accepted_at=utc(accepted_at),
        updated_at=now,
        idempotency_key=idempotency_key,
        recipient_domains=tuple(recipient_domains),
        idempotency_scope=idempotency_scope if idempotency_key is not None else None,
        request_hash=request_hash,
        reserved_until=(
            now + dt.timedelta(seconds=reservation_seconds)
            if reservation_seconds is not None
            else None
        ),
    )


def queued(
    record: MailRecord | None,
    mail_id: str,
    *,
    message_id: str,
    trace_id: str | None,
    now: dt.datetime,
    accepted_at: dt.datetime | None = None,
    recipient_domains: tuple[str, ...] = (),
) -> MailRecord:
    """``accepting`` → ``queued``; a record already moved on only gets the missing ids.

    Without a record: created in ``queued`` when ``accepted_at`` is given (a mail published
    without a reservation), else :class:`MailNotFound`.
    """
    if record is None:
        if accepted_at is None:
            raise MailNotFound(f"no record for mail {mail_id}")
        record = reserved(
            mail_id=mail_id,
            accepted_at=accepted_at,
            recipient_domains=recipient_domains,
            idempotency_key=None,
            now=now,
        )
    status = MailStatus.QUEUED if record.status is MailStatus.ACCEPTING else record.status
    return dataclasses.replace(
        record,
        status=status,
        reserved_until=None,  # the reservation's work is done: the key now holds for good
        message_id=record.message_id or message_id,
        trace_id=record.trace_id or trace_id,
        updated_at=now,
    )


def releasable(record: MailRecord | None) -> bool:
    """Whether :meth:`release` deletes this record (only while the publish is pending)."""
    return record is not None and record.status is MailStatus.ACCEPTING


# --- reconcile: records no live request or delivery will move on ----------------------------


def reservation_expires_at(record: MailRecord) -> dt.datetime | None:
    """When an ``accepting`` record's reservation expires; ``None`` for any other status.

    Records written before reservations carried ``reserved_until`` expire
    :data:`DEFAULT_RESERVATION_SECONDS` after their last write.
    """
    if record.status is not MailStatus.ACCEPTING:
        return None
    if record.reserved_until is not None:
        return record.reserved_until
    return record.updated_at + dt.timedelta(seconds=DEFAULT_RESERVATION_SECONDS)


def reservation_expired(record: MailRecord | None, now: dt.datetime) -> bool:
    """Whether ``record`` is a reservation past its expiry (left by a crash: release it)."""
    if record is None:
        return False
    expires = reservation_expires_at(record)
    return expires is not None and expires <= now


def delivery_stalled_at(record: MailRecord, grace_seconds: float) -> dt.datetime | None:
    """When a ``sending`` record counts as stalled (its lease's end + grace); ``None`` for any
    other status. A ``sending`` without a lease (not written by a claim) counts from its last
    write."""
    if record.status is not MailStatus.SENDING:
        return None
    base = record.lease_until if record.lease_until is not None else record.updated_at
    return base + dt.timedelta(seconds=grace_seconds)


def delivery_stalled(record: MailRecord | None, now: dt.datetime, grace_seconds: float) -> bool:
    """Whether ``record`` is a delivery nobody finished nor took over within the grace."""
    if record is None:
        return False
    stalled = delivery_stalled_at(record, grace_seconds)
    return stalled is not None and stalled <= now


def unconfirmed(record: MailRecord, *, now: dt.datetime) -> MailRecord:
    """``sending`` (stalled) → ``unconfirmed``: the lease cleared, what is known in
    ``last_error``. Claimable like any non-final status, so nothing Pub/Sub still holds is lost."""
    number = record.attempt_count
    recorded = any(a.number == number and a.outcome for a in record.attempts)
    note = (
        f"the outcome of delivery attempt {number} was never recorded"
        if not recorded
        else f"delivery attempt {number} left the mail sending"
    )
    return dataclasses.replace(
        record,
        status=MailStatus.UNCONFIRMED,
        lease_until=None,
        last_error=(
            f"{note}: its worker stopped, or the record write after the relay's answer failed. "
            "If Pub/Sub still holds the message it will be delivered (the mail stays claimable); "
            "if the subscriber logged that it could not record this attempt, the relay answered "
            f"and the mail was acknowledged. Last error before: {record.last_error or 'none'}"
        ),
        updated_at=now,
    )


def claimed(
    record: MailRecord | None,
    mail_id: str,
    *,
    message_id: str | None,
    trace_id: str | None,
    lease_seconds: float,
    now: dt.datetime,
    accepted_at: dt.datetime | None = None,
    recipient_domains: tuple[str, ...] = (),
) -> tuple[Claim, MailRecord | None]:
    """The claim's answer and the record to write (``None``: write nothing)."""
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    if record is None:
        # The mail reached the subscriber without a record (the publisher's write lagged or
        # failed, or the mail predates the record): deliver it anyway, and record it from here.
        record = MailRecord(
            mail_id=mail_id,
            status=MailStatus.QUEUED,
            accepted_at=utc(accepted_at) if accepted_at is not None else now,
            updated_at=now,
            trace_id=trace_id,
            message_id=message_id,
            recipient_domains=tuple(recipient_domains),
        )
    if record.status.final:
        return Claim(ClaimResult.ALREADY_FINAL, record.attempt_count, record), None
    if record.lease_until is not None and record.lease_until > now:
        return Claim(ClaimResult.IN_PROGRESS, record.attempt_count, record), None
    number = record.attempt_count + 1
    new = dataclasses.replace(
        record,
        status=MailStatus.SENDING,
        attempt_count=number,
        lease_until=now + dt.timedelta(seconds=lease_seconds),
        updated_at=now,
    )
    return Claim(ClaimResult.CLAIMED, number, new), new


def lease_renewed(
    record: MailRecord | None,
    mail_id: str,
    *,
    attempt_number: int,
    lease_seconds: float,
    now: dt.datetime,
) -> tuple[LeaseRenewal, MailRecord | None]:
    """The answer of :meth:`DeliveryRecord.renew_lease` and the record to write (``None``: none).

    The claim is this attempt's while no later claim was made (``attempt_count`` is still its
    number): an expired lease nobody took over is simply extended. The status is left as it
    is; ``finish`` sets it from the outcome.
    """
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    if record is None:
        return LeaseRenewal(RenewalResult.LOST), None
    if record.status.final:
        return LeaseRenewal(RenewalResult.FINAL, record), None
    if record.attempt_count != attempt_number:
        return LeaseRenewal(RenewalResult.LOST, record), None
    until = now + dt.timedelta(seconds=lease_seconds)
    if record.lease_until is not None and record.lease_until > until:
        until = record.lease_until
    new = dataclasses.replace(record, lease_until=until, updated_at=now)
    return LeaseRenewal(RenewalResult.RENEWED, new), new


def describe_error(attempt: Attempt) -> str:
    """``last_error`` for a failed attempt, e.g. ``"451 4.3.0 at rcpt to: try later"``."""
    parts = [str(attempt.reply_code) if attempt.reply_code is not None else attempt.outcome or "?"]
    if attempt.enhanced_status:
        parts.append(attempt.enhanced_status)
    if attempt.failed_step:
        parts.append(f"at {attempt.failed_step}")
    text = " ".join(parts)
    if attempt.reply_message:
        text += f": {attempt.reply_message}"
    return text


def finished(
    record: MailRecord | None, mail_id: str, attempt: Attempt, *, now: dt.datetime
) -> MailRecord:
    """The record after ``attempt`` ended (see :meth:`DeliveryRecord.finish`)."""
    try:
        outcome = _OUTCOMES[attempt.outcome or ""]
    except KeyError:
        raise ValueError(
            f"attempt outcome must be delivered, deferred or bounced, got {attempt.outcome!r}"
        ) from None
    if attempt.finished_at is None:
        attempt = dataclasses.replace(attempt, finished_at=now)
    if record is None:
        record = MailRecord(
            mail_id=mail_id,
            status=MailStatus.SENDING,
            accepted_at=utc(attempt.started_at),
            updated_at=now,
            trace_id=attempt.trace_id,
            message_id=attempt.message_id,
            attempt_count=attempt.number,
        )
    attempts = (*record.attempts, attempt)
    count = max(record.attempt_count, attempt.number)
    if record.status.final:
        # Never leave delivered/bounced; keep the late attempt for the history.
        return dataclasses.replace(record, attempts=attempts, attempt_count=count, updated_at=now)
    superseded = (
        attempt.number < record.attempt_count
        and record.lease_until is not None
        and record.lease_until > now
    )
    if superseded and not outcome.final:
        # This attempt's lease expired and a newer claim is running: do not end its lease.
        return dataclasses.replace(record, attempts=attempts, attempt_count=count, updated_at=now)
    assert attempt.finished_at is not None
    return dataclasses.replace(
        record,
        status=outcome,
        attempts=attempts,
        attempt_count=count,
        lease_until=None,
        last_error=None if outcome is MailStatus.DELIVERED else describe_error(attempt),
        delivered_at=utc(attempt.finished_at) if outcome is MailStatus.DELIVERED else None,
        updated_at=now,
    )


def dead_lettered(record: MailRecord, *, last_error: str | None, now: dt.datetime) -> MailRecord:
    """``… → dead_lettered``; a final record is returned unchanged."""
    if record.status.final:
        return record
    return dataclasses.replace(
        record,
        status=MailStatus.DEAD_LETTERED,
        last_error=last_error if last_error is not None else record.last_error,
        updated_at=now,
    )


def replayed(
    record: MailRecord | None, mail_id: str, *, trace_id: str | None, now: dt.datetime
) -> MailRecord:
    """``… → replayed`` with the replay's trace noted; refused for a final record."""
    if record is None:
        raise MailNotFound(f"no record for mail {mail_id}")
    if record.status.final:
        raise AlreadyFinal(f"mail {mail_id} is {record.status}: not replayed")
    replays = (*record.replays, trace_id) if trace_id else record.replays
    return dataclasses.replace(record, status=MailStatus.REPLAYED, replays=replays, updated_at=now)


# --- field mapping -----------------------------------------------------------------------

TimeOut = Callable[[dt.datetime], Any]
TimeIn = Callable[[Any], dt.datetime]


def _opt(value: Any, convert: Callable[[Any], Any]) -> Any:
    return None if value is None else convert(value)


def to_fields(record: MailRecord, time_out: TimeOut) -> dict[str, Any]:
    """The record as a flat mapping of plain values; ``time_out`` converts each datetime."""
    return {
        "mail_id": record.mail_id,
        "status": str(record.status),
        "accepted_at": time_out(record.accepted_at),
        "updated_at": time_out(record.updated_at),
        "trace_id": record.trace_id,
        "message_id": record.message_id,
        "idempotency_key": record.idempotency_key,
        "recipient_domains": list(record.recipient_domains),
        "attempts": [
            {
                **dataclasses.asdict(a),
                "started_at": time_out(a.started_at),
                "finished_at": _opt(a.finished_at, time_out),
            }
            for a in record.attempts
        ],
        "last_error": record.last_error,
        "replays": list(record.replays),
        "delivered_at": _opt(record.delivered_at, time_out),
        "attempt_count": record.attempt_count,
        "lease_until": _opt(record.lease_until, time_out),
        "idempotency_scope": record.idempotency_scope,
        "request_hash": record.request_hash,
        "reserved_until": _opt(record.reserved_until, time_out),
    }


def from_fields(fields: Mapping[str, Any], time_in: TimeIn) -> MailRecord:
    """The inverse of :func:`to_fields`; ``time_in`` returns aware datetimes."""
    attempt_names = {f.name for f in dataclasses.fields(Attempt)}
    attempts = []
    for raw in fields.get("attempts") or ():
        values = {k: v for k, v in raw.items() if k in attempt_names}
        values["started_at"] = utc(time_in(values["started_at"]))
        values["finished_at"] = _opt(values.get("finished_at"), lambda v: utc(time_in(v)))
        attempts.append(Attempt(**values))
    return MailRecord(
        mail_id=fields["mail_id"],
        status=MailStatus(fields["status"]),
        accepted_at=utc(time_in(fields["accepted_at"])),
        updated_at=utc(time_in(fields["updated_at"])),
        trace_id=fields.get("trace_id"),
        message_id=fields.get("message_id"),
        idempotency_key=fields.get("idempotency_key"),
        recipient_domains=tuple(fields.get("recipient_domains") or ()),
        attempts=tuple(attempts),
        last_error=fields.get("last_error"),
        replays=tuple(fields.get("replays") or ()),
        delivered_at=_opt(fields.get("delivered_at"), lambda v: utc(time_in(v))),
        attempt_count=int(fields.get("attempt_count") or 0),
        lease_until=_opt(fields.get("lease_until"), lambda v: utc(time_in(v))),
        idempotency_scope=fields.get("idempotency_scope"),
        request_hash=fields.get("request_hash"),
        reserved_until=_opt(fields.get("reserved_until"), lambda v: utc(time_in(v))),
    )


# --- pages -------------------------------------------------------------------------------


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")


def page_token(record: MailRecord) -> str:
    """An opaque cursor just after ``record`` in ``(accepted_at, mail_id)`` order."""
    raw = json.dumps([record.accepted_at.isoformat(), record.mail_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_page_token(token: str) -> tuple[dt.datetime, str]:
    """``(accepted_at, mail_id)`` of the last record of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        accepted, mail_id = json.loads(raw)
        check_mail_id(mail_id)  # a forged id must not reach a backend as a cursor
        # OverflowError: a time at the calendar's edge whose offset has no UTC equivalent.
        return utc(dt.datetime.fromisoformat(accepted)), mail_id
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError("malformed page token") from exc
