"""Reconcile: find the delivery records that no live request or delivery will move on; the
publisher's ``/v1/stats``, the ``mailpipe.mails.stuck`` gauge and ``mailpipe reconcile`` show
this survey, and ``mailpipe reconcile --fix`` settles what it finds (:func:`ops.reconcile.fix`,
with the record's own atomic checks described here).

Two kinds of stuck record::

    kind                 record                                what --fix does
    expired_reservation  accepting past reserved_until         releases it (deletes it, frees its
                         (the publisher died, or lost the      idempotency key); the key's next
                         record, between reserving the key     reserve would have taken it over
                         and finishing the publish)            anyway
    stalled_delivery     sending, its lease ended more than    marks it unconfirmed: the lease
                         the grace ago, nobody claimed it      cleared, what is known in
                         since                                 last_error; still claimable

What a stalled delivery can be, and why ``unconfirmed`` is all the record can honestly say: the
delivery claimed the mail and never recorded an outcome. Either its worker stopped before the
relay answered (the Pub/Sub message is unacknowledged: Pub/Sub delivers it again and that
delivery claims and sends it), or the relay answered and the record write after it failed
(the subscriber then acknowledged a 250 or a 5xx, and logged "could not record attempt N of mail
M"; nothing will deliver it again). The record cannot tell the two apart, so reconcile never
marks such a mail delivered (a copy Pub/Sub still holds would then be dropped as a duplicate) and
never republishes it (a delivered mail would be sent twice). ``unconfirmed`` is not final: a
later delivery claims it, a late ``finish`` of the attempt records the real outcome. It leaves the
lag gauge (``mailpipe.oldest_undelivered_age``), because the copy Pub/Sub may still hold is
watched by Pub/Sub's own oldest-unacked-message alert, and stays visible in ``/v1/stats``,
``mailpipe reconcile`` and the ``mailpipe.mails.stuck`` gauge (kind ``unconfirmed``).

Races (every fix re-reads the record and re-checks it atomically, in the backend's transaction):

- A delivery claims the mail between the survey and the fix: the lease is live again, so the
  fix leaves it alone (``left_alone``). A delivery still running past its lease and the grace
  finishes after the fix: ``finish`` of that attempt sets the real outcome over ``unconfirmed``.
- A subscriber claims a published reservation (the publisher died after the publish but before
  marking it queued) before the release: it is ``sending``, not released. After the release: the
  claim recreates the record from the mail itself, so the mail is delivered and recorded; only
  its idempotency key is gone (a client retry with it would be a second mail, as for a publish
  that timed out).
- A publisher stalled longer than the reservation (beyond the publish timeout by design) that
  publishes after the release: ``mark_queued`` recreates the record as queued; the key is free.

Errors: :class:`mailpipe.record.RecordError` from :func:`survey` propagates (nothing is known);
a fix that fails is reported per mail and the others are still tried.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mailpipe.record import DeliveryRecord, MailRecord, MailStatus, RecordError
from mailpipe.record.base import passed, reservation_expires_at
from publisher.listing import list_mails

DEFAULT_GRACE_SECONDS = 900.0
# Records scanned per status in one survey (stuck and unconfirmed records are few; in-flight
# `sending` ones are bounded by the subscribers' concurrency). Beyond it the survey says so.
DEFAULT_SCAN_LIMIT = 10_000
_PAGE = 1000


class StuckKind(enum.StrEnum):
    EXPIRED_RESERVATION = "expired_reservation"
    STALLED_DELIVERY = "stalled_delivery"


@dataclass(frozen=True)
class StuckMail:
    """One stuck record: which mail, what kind, since when."""

    mail_id: str
    kind: StuckKind
    status: MailStatus
    accepted_at: dt.datetime
    stuck_since: dt.datetime  # when the reservation expired / the lease + grace ended
    attempt_count: int = 0

    def to_json(self, now: dt.datetime) -> dict[str, object]:
        return {
            "mail_id": self.mail_id,
            "kind": str(self.kind),
            "status": str(self.status),
            "accepted_at": self.accepted_at.isoformat(),
            "stuck_since": self.stuck_since.isoformat(),
            "stuck_for_seconds": max(0.0, (now - self.stuck_since).total_seconds()),
            "attempts": self.attempt_count,
            "fix": (
                "release the reservation (frees its idempotency key)"
                if self.kind is StuckKind.EXPIRED_RESERVATION
                else "mark it unconfirmed (still claimable by a later delivery)"
            ),
        }


def delivery_stalled_at(record: MailRecord, grace_seconds: float) -> dt.datetime | None:
    """When a ``sending`` record counts as stalled (its lease's end + grace); ``None`` for any
    other status. A ``sending`` without a lease (not written by a claim) counts from its last
    write."""
    if record.status is not MailStatus.SENDING:
        return None
    base = record.lease_until if record.lease_until is not None else record.updated_at
    return base + dt.timedelta(seconds=grace_seconds)


def diagnose(record: MailRecord, *, now: dt.datetime, grace_seconds: float) -> StuckMail | None:
    """``record`` as a stuck mail, or ``None`` if something live may still move it on."""
    # The same rules the fixes check: ``release(expired_only=True)``, ops' ``mark_unconfirmed``.
    found = (
        (StuckKind.EXPIRED_RESERVATION, reservation_expires_at(record)),
        (StuckKind.STALLED_DELIVERY, delivery_stalled_at(record, grace_seconds)),
    )
    kind, since = next(((k, at) for k, at in found if passed(at, now)), (None, None))
    if kind is None or since is None:
        return None
    return StuckMail(
        mail_id=record.mail_id,
        kind=kind,
        status=record.status,
        accepted_at=record.accepted_at,
        stuck_since=since,
        attempt_count=record.attempt_count,
    )


@dataclass(frozen=True)
class Survey:
    """What :func:`survey` found, at ``now``."""

    now: dt.datetime
    grace_seconds: float
    stuck: tuple[StuckMail, ...] = ()
    unconfirmed: tuple[str, ...] = ()  # mail ids, oldest first
    complete: bool = True  # False: a status had more records than the scan limit

    def count(self, kind: StuckKind) -> int:
        return sum(1 for mail in self.stuck if mail.kind is kind)

    def counts(self) -> dict[str, int]:
        """The ``mailpipe.mails.stuck`` gauge's points, by kind."""
        return {
            **{str(kind): self.count(kind) for kind in StuckKind},
            "unconfirmed": len(self.unconfirmed),
        }

    def to_json(self, *, max_mails: int | None = None) -> dict[str, object]:
        mails = self.stuck if max_mails is None else self.stuck[:max_mails]
        return {
            "expired_reservations": self.count(StuckKind.EXPIRED_RESERVATION),
            "stalled_deliveries": self.count(StuckKind.STALLED_DELIVERY),
            "unconfirmed": len(self.unconfirmed),
            "grace_seconds": self.grace_seconds,
            "complete": self.complete,
            "mails": [mail.to_json(self.now) for mail in mails],
        }


def _scan(record: DeliveryRecord, status: MailStatus, limit: int) -> tuple[list[MailRecord], bool]:
    """Up to ``limit`` records in ``status``, oldest first, and whether that was all of them."""
    items: list[MailRecord] = []
    token: str | None = None
    while True:
        page = list_mails(record, status=status, limit=_PAGE, page_token=token)
        items, token = items + page.items, page.next_page_token
        if len(items) > limit or token is None:
            return items[:limit], len(items) <= limit


def survey(
    record: DeliveryRecord,
    *,
    now: dt.datetime,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    scan_limit: int = DEFAULT_SCAN_LIMIT,
) -> Survey:
    """Find stuck records (and the unconfirmed ones) with the record's own status queries.

    Raises :class:`RecordError` if the record cannot be read.
    """
    if grace_seconds < 0:
        raise ValueError("grace_seconds must not be negative")
    statuses = (MailStatus.ACCEPTING, MailStatus.SENDING, MailStatus.UNCONFIRMED)
    (accepting, a_all), (sending, s_all), (unconfirmed, u_all) = (
        _scan(record, status, scan_limit) for status in statuses
    )
    found = (diagnose(item, now=now, grace_seconds=grace_seconds) for item in accepting + sending)
    stuck = sorted((m for m in found if m), key=lambda mail: (mail.stuck_since, mail.mail_id))
    return Survey(
        now=now,
        grace_seconds=grace_seconds,
        stuck=tuple(stuck),
        unconfirmed=tuple(item.mail_id for item in unconfirmed),
        complete=a_all and s_all and u_all,
    )


def stuck_counts(
    record: DeliveryRecord,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Callable[[], Mapping[str, int] | None]:
    """The source of the ``mailpipe.mails.stuck`` gauge (``None`` when the record is down)."""

    def counts() -> Mapping[str, int] | None:
        try:
            return survey(record, now=clock(), grace_seconds=grace_seconds).counts()
        except RecordError:
            return None

    return counts
