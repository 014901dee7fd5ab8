"""The record's listings for the API, reconcile and ``mailpipe dlq``: pages of mails in
``(accepted_at, mail_id)`` order, the oldest undelivered mail, and the opaque page tokens
(stable under concurrent inserts) that the suppression list's pages use too."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import NamedTuple

from mailpipe.record import DeliveryRecord, MailRecord, MailStatus
from mailpipe.record.store import MAILS, Condition, decode, id_problem, utc

MAX_PAGE_SIZE = 1000
# Replayed mails are back on the mail topic: until delivered they count toward the lag alert.
# So do reservations (accepting): one left behind by a crash must not go unseen. Unconfirmed mails
# do not (reconcile settled them as far as the record can; Pub/Sub's own backlog alert covers a
# copy it still holds), nor do dead-lettered ones.
UNDELIVERED = tuple(map(MailStatus, ("accepting", "queued", "sending", "deferred", "replayed")))


class Page(NamedTuple):
    items: list[MailRecord]
    next_page_token: str | None = None


def list_mails(
    record: DeliveryRecord,
    *,
    status: MailStatus | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
    page_token: str | None = None,
) -> Page:
    """Records optionally in ``status`` and accepted at or after ``since``; ``next_page_token``
    is ``None`` on the last page. ValueError: ``limit`` not in 1..1000, a malformed token."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    where: list[Condition] = []
    if status is not None:
        where.append(("status", "==", str(MailStatus(status))))
    if since is not None:
        where.append(("accepted_at", ">=", utc(since)))
    after = parse_page_token(page_token) if page_token is not None else None
    # One more than asked tells whether there is a next page.
    docs = record.store.query(MAILS, where, "accepted_at", after, limit + 1)
    items = [decode(MailRecord, doc) for doc in docs[:limit]]
    last = items[-1] if len(docs) > limit else None
    return Page(items, None if last is None else token_after(last.accepted_at, last.mail_id))


def oldest_undelivered(record: DeliveryRecord) -> MailRecord | None:
    """The oldest mail in an :data:`UNDELIVERED` status (drives the lag alert)."""
    where = [("status", "in", [str(s) for s in UNDELIVERED])]
    docs = record.store.query(MAILS, where, "accepted_at", None, 1)
    return decode(MailRecord, docs[0]) if docs else None


def token_after(at: dt.datetime, doc_id: str) -> str:
    """An opaque cursor just after the document ``doc_id`` ordered at time ``at``."""
    raw = json.dumps([at.isoformat(), doc_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_page_token(token: str) -> tuple[dt.datetime, str]:
    """``(at, doc_id)`` of the last document of the previous page; ValueError if malformed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        at, doc_id = json.loads(raw)
        if id_problem(doc_id):  # a forged id must not reach a backend as a cursor
            raise ValueError(doc_id)
        # OverflowError: a time at the calendar's edge whose offset has no UTC equivalent.
        return utc(dt.datetime.fromisoformat(at)), doc_id
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError("malformed page token") from exc
