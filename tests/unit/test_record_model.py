"""The record's model, its shared status rules and error translation, without any server.

The behaviour against real SQLite and the Firestore emulator is in
``tests/integration/test_record_backends.py``; these cover what those cannot reach (error
translation for failures a healthy emulator never produces) and the pure helpers.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest
from google.api_core import exceptions as gexc

from mailpipe.record import base, store
from mailpipe.record import firestore as firestore_record
from mailpipe.record import sqlite as sqlite_record
from mailpipe.record.base import (
    Attempt,
    MailRecord,
    MailStatus,
    RecordError,
    RecordUnavailable,
    open_record,
)
from publisher import listing

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)

FULL = MailRecord(
    mail_id="m-1",
    status=MailStatus.DEFERRED,
    accepted_at=T0,
    updated_at=T0 + dt.timedelta(seconds=3),
    trace_id="t" * 32,
    message_id="42",
    idempotency_key="order-1",
    recipient_domains=("example.org", "example.net"),
    attempts=(
        Attempt(
            number=1,
            started_at=T0 + dt.timedelta(seconds=1),
            finished_at=T0 + dt.timedelta(seconds=2),
            outcome="deferred",
            reply_code=451,
            enhanced_status="4.3.0",
            reply_message="try later",
            failed_step="rcpt to",
            trace_id="t" * 32,
            message_id="42",
        ),
    ),
    last_error="451 4.3.0 at rcpt to: try later",
    replays=("r" * 32,),
    attempt_count=2,
    lease_until=T0 + dt.timedelta(minutes=1),
)


def test_fields_round_trip_through_json() -> None:
    decoded = json.loads(json.dumps(store.encode(FULL), default=dt.datetime.isoformat))

    assert store.decode(MailRecord, decoded) == FULL


def test_page_token_round_trip() -> None:
    token = listing.token_after(FULL.accepted_at, FULL.mail_id)

    assert listing.parse_page_token(token) == (T0, "m-1")


@pytest.mark.parametrize("token", ["", "not a token", "W10", "WzEsMl0", "WyJ4IiwgIm0iXQ"])
def test_malformed_page_tokens_are_rejected(token: str) -> None:
    with pytest.raises(ValueError, match="page token"):
        listing.parse_page_token(token)


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (Attempt(1, T0, outcome="bounced", reply_code=550), "550"),
        (
            Attempt(1, T0, outcome="deferred", failed_step="connect", reply_message="refused"),
            "deferred at connect: refused",
        ),
        (
            Attempt(1, T0, outcome="bounced", reply_code=554, enhanced_status="5.7.1"),
            "554 5.7.1",
        ),
    ],
)
def test_last_error_text(attempt: Attempt, expected: str) -> None:
    assert base.describe_error(attempt) == expected


def test_a_claim_needs_a_positive_lease() -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        # Refused before the store is asked: a record over no store shows it.
        base.DeliveryRecord(store=None).claim(  # type: ignore[arg-type]
            "m", message_id=None, trace_id=None, lease_seconds=0
        )


def test_naive_times_are_taken_as_utc() -> None:
    assert store.utc(dt.datetime(2026, 1, 1, 12)) == dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    cet = dt.timezone(dt.timedelta(hours=1))
    assert store.utc(dt.datetime(2026, 1, 1, 13, tzinfo=cet)).hour == 12


def test_only_delivered_bounced_sandboxed_suppressed_and_expired_are_final() -> None:
    final = {s for s in MailStatus if s.final}
    assert final == {
        MailStatus.DELIVERED,
        MailStatus.BOUNCED,
        MailStatus.SANDBOXED,
        MailStatus.SUPPRESSED,
        MailStatus.EXPIRED,
    }


def test_open_record_rejects_unknown_backends() -> None:
    with pytest.raises(ValueError, match=r"sqlite:///PATH or firestore://DATABASE"):
        open_record("postgres://db")


# Failures a healthy emulator or file never produces: the translation is fed the real exception
# classes the client libraries raise.


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (gexc.ServiceUnavailable("down"), RecordUnavailable),
        (gexc.DeadlineExceeded("slow"), RecordUnavailable),
        (gexc.Aborted("contention"), RecordUnavailable),
        (gexc.ResourceExhausted("quota"), RecordUnavailable),
        (gexc.PermissionDenied("no"), RecordError),
        (gexc.NotFound("no database"), RecordError),
    ],
)
def test_firestore_errors_are_translated(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, firestore_record._translate_errors("claim"):
        raise raised
    assert info.value.__cause__ is raised
    if expected is RecordError:
        assert not isinstance(info.value, RecordUnavailable)


def test_firestore_exhausted_transaction_retries_are_unavailable() -> None:
    exhausted = ValueError("Failed to commit transaction in 10 attempts.")
    exhausted.__cause__ = gexc.Aborted("lock timeout")

    with pytest.raises(RecordUnavailable), firestore_record._translate_errors("claim"):
        raise exhausted


def test_firestore_translation_leaves_other_value_errors_alone() -> None:
    with pytest.raises(ValueError, match="outcome"), firestore_record._translate_errors("finish"):
        raise ValueError("attempt outcome must be …")


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (sqlite3.OperationalError("database is locked"), RecordUnavailable),
        (sqlite3.OperationalError("disk I/O error"), RecordUnavailable),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), RecordError),
        (sqlite3.DatabaseError("file is not a database"), RecordError),
    ],
)
def test_sqlite_errors_are_translated(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, sqlite_record._translate_errors("claim"):
        raise raised
    assert info.value.__cause__ is raised
    if expected is RecordError:
        assert not isinstance(info.value, RecordUnavailable)
