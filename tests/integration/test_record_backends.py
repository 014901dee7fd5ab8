"""One suite for every delivery-record backend, run against real servers.

SQLite: a real file under ``tmp_path`` (and, for the cross-process test, two real processes).
Firestore: Google's Firestore emulator over gRPC (``FIRESTORE_EMULATOR_HOST``), each test in its
own uniquely named collections. Time is an injected clock, so lease expiry needs no sleeping.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.cloud import firestore

from mailpipe.record.base import (
    AlreadyFinal,
    Attempt,
    ClaimResult,
    DeliveryRecord,
    MailNotFound,
    MailStatus,
    RecordError,
    RecordUnavailable,
    open_record,
)
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.record.sqlite import SCHEMA_VERSION, SqliteRecord
from mailpipe.record.store import key_hash
from ops.reconcile import fix, mark_unconfirmed
from ops.replay import mark_replayed
from publisher.listing import list_mails, oldest_undelivered
from publisher.reconcile import survey
from tests.fixtures.publishing import key_holder

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
LEASE = 60.0


class FakeClock:
    """The records' clock: stands still unless a test moves it."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0 + dt.timedelta(minutes=5))


@pytest.fixture(params=["sqlite", "firestore"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_record(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, clock: FakeClock
) -> Iterator[Callable[[], DeliveryRecord]]:
    """Factory: another handle on the same store (as a second service would open it)."""
    opened: list[DeliveryRecord] = []
    suffix = uuid.uuid4().hex[:10]
    if backend == "firestore":
        emulator = request.getfixturevalue("firestore_emulator")
        project = request.getfixturevalue("pubsub_project")

    def make() -> DeliveryRecord:
        record: DeliveryRecord
        if backend == "sqlite":
            record = SqliteRecord(tmp_path / "state" / "record.sqlite3", clock=clock)
        else:
            record = FirestoreRecord(
                project=project,
                collection=f"mails-{suffix}",
                idempotency_collection=f"keys-{suffix}",
                clock=clock,
            )
            assert emulator.host  # the client reads FIRESTORE_EMULATOR_HOST, set by the fixture
        opened.append(record)
        return record

    yield make
    for record in opened:
        record.close()


@pytest.fixture
def record(make_record: Callable[[], DeliveryRecord]) -> DeliveryRecord:
    return make_record()


def reserve(
    record: DeliveryRecord,
    mail_id: str | None = None,
    *,
    key: str | None = None,
    minutes: float = 0,
    domains: tuple[str, ...] = ("example.org",),
    **idempotency: object,
) -> str:
    """Reserve a mail accepted ``minutes`` after T0 and return its id (``idempotency``: the
    reserve's scope, fingerprint and reservation time)."""
    mail_id = mail_id or f"mail-{uuid.uuid4().hex}"
    reservation = record.reserve(
        mail_id=mail_id,
        accepted_at=T0 + dt.timedelta(minutes=minutes),
        recipient_domains=domains,
        idempotency_key=key,
        **idempotency,  # type: ignore[arg-type]
    )
    assert reservation.created
    return mail_id


def queue(record: DeliveryRecord, **kwargs: object) -> str:
    mail_id = reserve(record, **kwargs)  # type: ignore[arg-type]
    record.mark_queued(mail_id, message_id=f"msg-{mail_id}", trace_id="a" * 32)
    return mail_id


def attempt(number: int, outcome: str, code: int | None = None, **kwargs: object) -> Attempt:
    return Attempt(
        number=number,
        started_at=T0 + dt.timedelta(minutes=5),
        finished_at=T0 + dt.timedelta(minutes=5, seconds=2),
        outcome=outcome,
        reply_code=code,
        **kwargs,  # type: ignore[arg-type]
    )


def in_threads(count: int, action: Callable[[int], object]) -> list[object]:
    """Run ``action(i)`` in ``count`` threads released together; their results in order."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            results[i] = action(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


# --- reserve / mark_queued / release -------------------------------------------------------


def test_reserve_creates_an_accepting_record(record: DeliveryRecord) -> None:
    mail_id = reserve(record, key="order-1", domains=("example.org", "example.net"))

    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.ACCEPTING
    assert stored.accepted_at == T0
    assert stored.recipient_domains == ("example.org", "example.net")
    assert stored.idempotency_key == "order-1"
    assert stored.attempts == ()
    assert key_holder(record, "order-1") == stored
    assert key_holder(record, "order-2") is None
    assert record.get("no-such-mail") is None


def test_a_second_reserve_with_the_same_key_returns_the_holder(record: DeliveryRecord) -> None:
    first = reserve(record, key="order-1")

    again = record.reserve(
        mail_id="mail-second",
        accepted_at=T0,
        recipient_domains=("example.org",),
        idempotency_key="order-1",
    )

    assert not again.created
    assert again.record.mail_id == first
    assert record.get("mail-second") is None


def test_reserve_without_key_and_of_an_existing_mail_id(record: DeliveryRecord) -> None:
    a = reserve(record)
    b = reserve(record)
    assert a != b
    assert record.get(a) is not None
    assert record.get(b) is not None

    again = record.reserve(
        mail_id=a, accepted_at=T0, recipient_domains=(), idempotency_key="fresh-key"
    )
    assert not again.created
    assert again.record.mail_id == a
    assert key_holder(record, "fresh-key") is None


def test_mark_queued_sets_status_and_ids(record: DeliveryRecord) -> None:
    mail_id = reserve(record)

    record.mark_queued(mail_id, message_id="42", trace_id="t" * 32)

    stored = record.get(mail_id)
    assert stored is not None
    assert (stored.status, stored.message_id, stored.trace_id) == (
        MailStatus.QUEUED,
        "42",
        "t" * 32,
    )


def test_mark_queued_after_the_first_claim_does_not_move_the_record_back(
    record: DeliveryRecord,
) -> None:
    mail_id = reserve(record)
    assert record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE).result is (
        ClaimResult.CLAIMED
    )

    record.mark_queued(mail_id, message_id="42", trace_id="t" * 32)

    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.SENDING
    assert (stored.message_id, stored.trace_id) == ("42", "t" * 32)


def test_mark_queued_creates_the_record_of_a_mail_published_without_reservation(
    record: DeliveryRecord,
) -> None:
    # The publisher reserves only mails with an idempotency key; the others get one write.
    record.mark_queued(
        "keyless",
        message_id="42",
        trace_id="t" * 32,
        accepted_at=T0,
        recipient_domains=("example.org",),
    )

    stored = record.get("keyless")
    assert stored is not None
    assert (stored.status, stored.message_id, stored.trace_id) == (
        MailStatus.QUEUED,
        "42",
        "t" * 32,
    )
    assert (stored.accepted_at, stored.recipient_domains) == (T0, ("example.org",))
    assert stored.idempotency_key is None
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == "keyless"  # counts toward the lag alert like any queued mail


def test_mark_queued_of_an_unreserved_mail_the_subscriber_claimed_first_keeps_its_progress(
    record: DeliveryRecord,
) -> None:
    claim = record.claim(
        "keyless", message_id="42", trace_id=None, lease_seconds=LEASE, accepted_at=T0
    )
    assert claim.result is ClaimResult.CLAIMED

    record.mark_queued(
        "keyless", message_id="42", trace_id="t" * 32, accepted_at=T0, recipient_domains=()
    )

    stored = record.get("keyless")
    assert stored is not None
    assert (stored.status, stored.attempt_count, stored.trace_id) == (
        MailStatus.SENDING,
        1,
        "t" * 32,
    )


def test_mark_queued_without_record_raises(record: DeliveryRecord) -> None:
    with pytest.raises(MailNotFound):
        record.mark_queued("no-such-mail", message_id="1", trace_id=None)


def test_mark_queued_many_records_a_whole_batch_in_one_transaction(
    record: DeliveryRecord,
) -> None:
    reserved = reserve(record, key="order-7")
    claimed = "claimed-first"
    record.claim(claimed, message_id=None, trace_id=None, lease_seconds=LEASE, accepted_at=T0)
    # A batch request's size limit (500) is Firestore's limit of writes per transaction.
    keyless = [f"keyless-{i}" for i in range(497)]
    mails: list[dict[str, Any]] = [
        {"mail_id": mail_id, "message_id": f"m-{mail_id}", "trace_id": f"t-{mail_id}"}
        for mail_id in [reserved, claimed, *keyless]
    ]
    for mail in mails[1:]:
        mail |= {"accepted_at": T0, "recipient_domains": ("example.org",)}

    record.mark_queued_many(mails)

    stored = [record.get(mail["mail_id"]) for mail in mails]
    assert [(r.message_id, r.trace_id) for r in stored if r] == [
        (mail["message_id"], mail["trace_id"]) for mail in mails
    ]
    statuses = [r.status for r in stored if r]
    assert statuses == [MailStatus.QUEUED, MailStatus.SENDING] + [MailStatus.QUEUED] * 497
    assert stored[0] is not None and stored[0].reserved_until is None  # the key holds for good
    again = record.reserve(
        mail_id="retry", accepted_at=T0, recipient_domains=(), idempotency_key="order-7"
    )
    assert (again.created, again.record) == (False, stored[0])
    assert stored[1] is not None and stored[1].attempt_count == 1  # the claim's progress kept
    assert stored[2] is not None and stored[2].recipient_domains == ("example.org",)


def test_mark_queued_many_writes_nothing_when_one_mail_cannot_be_recorded(
    record: DeliveryRecord,
) -> None:
    good = {"mail_id": "good", "message_id": "1", "trace_id": None, "accepted_at": T0}
    missing = {"mail_id": "no-such-mail", "message_id": "2", "trace_id": None}
    with pytest.raises(MailNotFound):
        record.mark_queued_many([good, missing])
    assert record.get("good") is None


def test_release_deletes_the_reservation_and_frees_the_key(record: DeliveryRecord) -> None:
    first = reserve(record, key="order-1")

    record.release(first)

    assert record.get(first) is None
    assert key_holder(record, "order-1") is None
    second = reserve(record, key="order-1")  # the client's retry now succeeds
    holder = key_holder(record, "order-1")
    assert holder is not None
    assert holder.mail_id == second


def test_release_leaves_a_queued_record_and_ignores_a_missing_one(record: DeliveryRecord) -> None:
    mail_id = queue(record, key="order-1")

    record.release(mail_id)
    record.release("no-such-mail")

    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.QUEUED
    assert key_holder(record, "order-1") == stored


# --- idempotency scope, reservation expiry and reconcile -----------------------------------


def test_a_key_is_scoped_to_its_caller(record: DeliveryRecord) -> None:
    alice = reserve(
        record, key="order-1", idempotency_scope="alice@example.iam.gserviceaccount.com"
    )
    bob = reserve(record, key="order-1", idempotency_scope="bob@example.iam.gserviceaccount.com")
    shared = reserve(record, key="order-1")  # no identity: the one shared scope

    assert len({alice, bob, shared}) == 3
    held = key_holder(record, "order-1", scope="alice@example.iam.gserviceaccount.com")
    assert held is not None
    assert held.mail_id == alice
    unscoped = key_holder(record, "order-1")
    assert unscoped is not None
    assert unscoped.mail_id == shared
    assert key_holder(record, "order-1", scope="carol") is None
    again = record.reserve(
        mail_id="mail-again",
        accepted_at=T0,
        recipient_domains=(),
        idempotency_key="order-1",
        idempotency_scope="bob@example.iam.gserviceaccount.com",
    )
    assert not again.created
    assert again.record.mail_id == bob
    # Scope and key do not run into each other: ("a", "b\nc") is not ("a\nb", "c").
    assert key_hash("c", "a\nb") != key_hash("b\nc", "a")
    assert key_hash("order-1", "") != key_hash("order-1")


def test_reserve_keeps_the_request_fingerprint_and_the_expiry(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = reserve(record, key="order-1", request_hash="f" * 64, reservation_seconds=90)

    again = record.reserve(
        mail_id="mail-again",
        accepted_at=T0,
        recipient_domains=(),
        idempotency_key="order-1",
        request_hash="0" * 64,
    )
    assert not again.created
    assert again.record.mail_id == mail_id
    assert again.record.request_hash == "f" * 64  # the caller compares: 422 if they differ
    assert again.record.reserved_until == clock.now + dt.timedelta(seconds=90)
    record.mark_queued(mail_id, message_id="1", trace_id=None)
    stored = record.get(mail_id)
    assert stored is not None
    assert stored.request_hash == "f" * 64
    assert stored.reserved_until is None  # published: the key now holds for good


def test_an_expired_reservation_is_taken_over_by_the_next_reserve_of_its_key(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    crashed = reserve(record, key="order-1", reservation_seconds=60)

    clock.advance(59)
    waiting = record.reserve(
        mail_id="mail-retry", accepted_at=T0, recipient_domains=(), idempotency_key="order-1"
    )
    assert not waiting.created  # still held: the publisher may be publishing (409)
    assert waiting.record.mail_id == crashed

    clock.advance(1)
    retry = record.reserve(
        mail_id="mail-retry", accepted_at=T0, recipient_domains=(), idempotency_key="order-1"
    )
    assert retry.created
    assert record.get(crashed) is None
    holder = key_holder(record, "order-1")
    assert holder is not None
    assert holder.mail_id == "mail-retry"


def test_a_published_reservation_never_expires(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = queue(record, key="order-1", reservation_seconds=60)

    clock.advance(3600)
    again = record.reserve(
        mail_id="mail-retry", accepted_at=T0, recipient_domains=(), idempotency_key="order-1"
    )

    assert not again.created
    assert again.record.mail_id == mail_id
    assert record.release(mail_id, expired_only=True) is None


def test_release_expired_reservation(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = reserve(record, key="order-1", reservation_seconds=60)
    assert record.release(mail_id, expired_only=True) is None  # still within its time

    clock.advance(61)
    released = record.release(mail_id, expired_only=True)

    assert released is not None
    assert released.mail_id == mail_id
    assert record.get(mail_id) is None
    assert key_holder(record, "order-1") is None
    assert record.release(mail_id, expired_only=True) is None  # once
    assert record.release("no-such-mail", expired_only=True) is None
    assert reserve(record, key="order-1")  # the key is free


def test_an_expired_reservation_a_delivery_claimed_is_not_released(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    # The publisher died after the publish but before marking it queued; the subscriber got it.
    mail_id = reserve(record, key="order-1", reservation_seconds=60)
    clock.advance(61)
    assert record.claim(mail_id, message_id="1", trace_id=None, lease_seconds=LEASE).result is (
        ClaimResult.CLAIMED
    )

    assert record.release(mail_id, expired_only=True) is None
    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.SENDING


def test_mark_unconfirmed_settles_a_stalled_delivery_and_keeps_it_claimable(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    clock.advance(LEASE + 100)
    assert mark_unconfirmed(record, mail_id, grace_seconds=101) is None  # within the grace
    clock.advance(1)
    marked = mark_unconfirmed(record, mail_id, grace_seconds=101)

    assert marked is not None
    assert marked.status is MailStatus.UNCONFIRMED
    assert marked.lease_until is None
    assert marked.last_error is not None
    assert "attempt 1 was never recorded" in marked.last_error
    assert record.get(mail_id) == marked
    assert mark_unconfirmed(record, mail_id, grace_seconds=0) is None  # once
    oldest = oldest_undelivered(record)
    assert oldest is None  # settled: out of the lag gauge (Pub/Sub's backlog alert covers it)
    # A copy Pub/Sub still holds is delivered, not dropped as a duplicate.
    later = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    assert later.result is ClaimResult.CLAIMED
    assert later.attempt_number == 2
    done = record.finish(mail_id, attempt(2, "delivered", 250))
    assert done.status is MailStatus.DELIVERED


def test_a_late_finish_of_the_attempt_records_the_real_outcome(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    clock.advance(LEASE + 1)
    assert mark_unconfirmed(record, mail_id, grace_seconds=0) is not None

    done = record.finish(mail_id, attempt(1, "delivered", 250))

    assert done.status is MailStatus.DELIVERED
    assert done.last_error is None


def test_mark_unconfirmed_leaves_alone_what_a_delivery_took_over(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    clock.advance(LEASE + 1)
    assert record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE).result is (
        ClaimResult.CLAIMED
    )

    assert mark_unconfirmed(record, mail_id, grace_seconds=0) is None
    stored = record.get(mail_id)
    assert stored is not None
    assert (stored.status, stored.attempt_count) == (MailStatus.SENDING, 2)
    for other in (queue(record), reserve(record)):  # not sending: never touched
        clock.advance(3600)
        assert mark_unconfirmed(record, other, grace_seconds=0) is None


def test_survey_and_fix_on_the_record(record: DeliveryRecord, clock: FakeClock) -> None:
    crashed = reserve(record, key="order-1", minutes=1, reservation_seconds=60)
    in_flight = reserve(record, key="order-2", minutes=2, reservation_seconds=6000)
    stalled = queue(record, minutes=3)
    record.claim(stalled, message_id="1", trace_id=None, lease_seconds=LEASE)
    healthy = queue(record, minutes=4)
    clock.advance(LEASE + 61)
    record.claim(healthy, message_id="2", trace_id=None, lease_seconds=LEASE)

    found = survey(record, now=clock.now, grace_seconds=60)

    assert [(m.mail_id, str(m.kind)) for m in found.stuck] == [
        (crashed, "expired_reservation"),
        (stalled, "stalled_delivery"),
    ]
    assert found.counts() == {
        "expired_reservation": 1,
        "stalled_delivery": 1,
        "unconfirmed": 0,
    }
    report = fix(record, found)
    assert report.ok
    assert [str(o.action) for o in report.outcomes] == ["released", "marked_unconfirmed"]
    assert record.get(crashed) is None
    assert record.get(in_flight) is not None
    stored = record.get(stalled)
    assert stored is not None
    assert stored.status is MailStatus.UNCONFIRMED
    after = survey(record, now=clock.now, grace_seconds=60)
    assert after.stuck == ()
    assert after.unconfirmed == (stalled,)
    # A survey taken before a delivery claimed the mail: the fix sees the live lease, leaves it.
    record.claim(stalled, message_id="1", trace_id=None, lease_seconds=LEASE)
    stale = fix(record, found)
    assert [str(o.action) for o in stale.outcomes] == ["left_alone", "left_alone"]


# --- claim / finish ------------------------------------------------------------------------


def test_claim_starts_an_attempt_with_a_lease(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = queue(record)

    claim = record.claim(mail_id, message_id="42", trace_id="t" * 32, lease_seconds=LEASE)

    assert claim.result is ClaimResult.CLAIMED
    assert claim.attempt_number == 1
    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.SENDING
    assert stored.attempt_count == 1
    assert stored.lease_until == clock.now + dt.timedelta(seconds=LEASE)
    assert claim.record == stored


def test_a_second_claim_during_the_lease_is_in_progress(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    clock.advance(LEASE - 1)
    second = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    assert second.result is ClaimResult.IN_PROGRESS
    stored = record.get(mail_id)
    assert stored is not None
    assert stored.attempt_count == 1


def test_an_expired_lease_lets_a_later_claim_proceed(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    clock.advance(LEASE + 1)  # the first worker died without finishing
    later = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    assert later.result is ClaimResult.CLAIMED
    assert later.attempt_number == 2


def test_delivered_records_the_attempt_and_is_final(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    claim = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    done = record.finish(
        mail_id, attempt(claim.attempt_number, "delivered", 250, reply_message="2.0.0 Ok")
    )

    assert done.status is MailStatus.DELIVERED
    assert done.delivered_at == T0 + dt.timedelta(minutes=5, seconds=2)
    assert done.last_error is None
    assert done.lease_until is None
    assert [(a.number, a.outcome, a.reply_code) for a in done.attempts] == [(1, "delivered", 250)]
    assert record.get(mail_id) == done
    again = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    assert again.result is ClaimResult.ALREADY_FINAL
    assert again.record == done


def test_bounced_records_the_reply_and_is_final(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    done = record.finish(
        mail_id,
        attempt(
            1,
            "bounced",
            550,
            enhanced_status="5.1.1",
            failed_step="rcpt to",
            reply_message="no such user",
        ),
    )

    assert done.status is MailStatus.BOUNCED
    assert done.last_error == "550 5.1.1 at rcpt to: no such user"
    assert done.delivered_at is None
    result = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE).result
    assert result is ClaimResult.ALREADY_FINAL


def test_deferred_then_delivered_keeps_every_attempt(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    deferred = record.finish(
        mail_id, attempt(1, "deferred", 451, enhanced_status="4.3.0", reply_message="try later")
    )
    assert deferred.status is MailStatus.DEFERRED
    assert deferred.last_error == "451 4.3.0: try later"
    assert deferred.lease_until is None

    retry = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    assert retry.result is ClaimResult.CLAIMED
    assert retry.attempt_number == 2
    done = record.finish(mail_id, attempt(2, "delivered", 250))

    assert done.status is MailStatus.DELIVERED
    assert [a.outcome for a in done.attempts] == ["deferred", "delivered"]


def test_finish_rejects_an_unknown_outcome(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    with pytest.raises(ValueError, match="outcome"):
        record.finish(mail_id, attempt(1, "sent"))

    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.SENDING


def test_a_late_deferral_does_not_end_the_newer_claim(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    clock.advance(LEASE + 1)
    assert record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE).result is (
        ClaimResult.CLAIMED
    )

    record.finish(mail_id, attempt(1, "deferred", 421))  # the slow first worker gives up

    stored = record.get(mail_id)
    assert stored is not None
    assert stored.status is MailStatus.SENDING
    assert [a.number for a in stored.attempts] == [1]
    third = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    assert third.result is ClaimResult.IN_PROGRESS


def test_claim_without_a_record_creates_it(record: DeliveryRecord, clock: FakeClock) -> None:
    claim = record.claim("mail-unknown", message_id="77", trace_id="t" * 32, lease_seconds=LEASE)

    assert claim.result is ClaimResult.CLAIMED
    assert claim.attempt_number == 1
    stored = record.get("mail-unknown")
    assert stored is not None
    assert stored.status is MailStatus.SENDING
    assert (stored.message_id, stored.trace_id, stored.accepted_at) == ("77", "t" * 32, clock.now)
    done = record.finish("mail-unknown", attempt(1, "delivered", 250))
    assert done.status is MailStatus.DELIVERED


def test_claim_without_a_record_takes_the_mails_own_facts(record: DeliveryRecord) -> None:
    claim = record.claim(
        "mail-unknown",
        message_id="77",
        trace_id=None,
        lease_seconds=LEASE,
        accepted_at=T0,
        recipient_domains=("example.org",),
    )

    assert claim.result is ClaimResult.CLAIMED
    stored = record.get("mail-unknown")
    assert stored is not None
    assert (stored.accepted_at, stored.recipient_domains) == (T0, ("example.org",))
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == "mail-unknown"


def test_claim_while_the_publisher_has_not_marked_it_queued(record: DeliveryRecord) -> None:
    mail_id = reserve(record)  # still accepting: mark_queued lags behind the first delivery

    claim = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)

    assert claim.result is ClaimResult.CLAIMED


# --- dead letters and replay ---------------------------------------------------------------


def test_dead_letter_then_replay_then_delivery(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    record.finish(mail_id, attempt(1, "deferred", 451))

    dead = record.mark_dead_lettered(mail_id, last_error="451 4.3.0: mailbox busy")
    assert dead is not None
    assert dead.status is MailStatus.DEAD_LETTERED
    assert dead.last_error == "451 4.3.0: mailbox busy"
    assert record.get(mail_id) == dead

    replayed = mark_replayed(record, mail_id, trace_id="r" * 32)
    assert replayed.status is MailStatus.REPLAYED
    assert replayed.replays == ("r" * 32,)

    claim = record.claim(mail_id, message_id="99", trace_id="r" * 32, lease_seconds=LEASE)
    assert claim.result is ClaimResult.CLAIMED
    assert claim.attempt_number == 2
    done = record.finish(mail_id, attempt(2, "delivered", 250))
    assert done.status is MailStatus.DELIVERED
    assert done.replays == ("r" * 32,)


def test_a_delivered_mail_is_never_replayed_nor_dead_lettered(record: DeliveryRecord) -> None:
    mail_id = queue(record)
    record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    done = record.finish(mail_id, attempt(1, "delivered", 250))

    assert record.mark_dead_lettered(mail_id, last_error="late copy") == done
    with pytest.raises(AlreadyFinal):
        mark_replayed(record, mail_id, trace_id="r" * 32)

    assert record.get(mail_id) == done


def test_dead_letter_and_replay_of_an_unknown_mail(record: DeliveryRecord) -> None:
    assert record.mark_dead_lettered("no-such-mail", last_error="x") is None
    with pytest.raises(MailNotFound):
        mark_replayed(record, "no-such-mail", trace_id=None)


# --- list / oldest_undelivered -------------------------------------------------------------


def test_list_is_oldest_first_and_pages_stably(record: DeliveryRecord) -> None:
    # Accepted out of order, two at the same instant (ties broken by mail id).
    minutes = [5, 1, 3, 3, 0, 4, 2]
    ids = [reserve(record, f"mail-{i}", minutes=m) for i, m in enumerate(minutes)]
    expected = [mail for _, mail in sorted(zip(minutes, ids, strict=True))]

    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = list_mails(record, limit=3, page_token=token)
        seen += [r.mail_id for r in page.items]
        pages += 1
        if pages == 1:
            reserve(record, "mail-late", minutes=60)  # arrives while the client pages
        token = page.next_page_token
        if token is None:
            break

    assert seen == [*expected, "mail-late"]
    assert pages == 3


def test_list_filters_by_status_and_since(record: DeliveryRecord) -> None:
    old_queued = queue(record, minutes=0)
    new_queued = queue(record, minutes=10)
    accepting = reserve(record, minutes=20)
    dead = queue(record, minutes=30)
    record.mark_dead_lettered(dead, last_error="451")

    def ids(**kwargs: object) -> list[str]:
        return [r.mail_id for r in list_mails(record, **kwargs).items]  # type: ignore[arg-type]

    assert ids(status=MailStatus.QUEUED) == [old_queued, new_queued]
    assert ids(status=MailStatus.DEAD_LETTERED) == [dead]
    assert ids(since=T0 + dt.timedelta(minutes=10)) == [new_queued, accepting, dead]
    assert ids(status=MailStatus.QUEUED, since=T0 + dt.timedelta(minutes=5)) == [new_queued]
    assert ids(status=MailStatus.BOUNCED) == []
    page = list_mails(record, status=MailStatus.QUEUED, limit=1)
    assert [r.mail_id for r in page.items] == [old_queued]
    rest = list_mails(record, status=MailStatus.QUEUED, limit=1, page_token=page.next_page_token)
    assert [r.mail_id for r in rest.items] == [new_queued]
    assert rest.next_page_token is None


def test_list_rejects_bad_arguments(record: DeliveryRecord) -> None:
    with pytest.raises(ValueError, match="limit"):
        list_mails(record, limit=0)
    with pytest.raises(ValueError, match="page token"):
        list_mails(record, page_token="not a token")


def test_oldest_undelivered(record: DeliveryRecord) -> None:
    assert oldest_undelivered(record) is None
    accepting = reserve(record, minutes=0)  # a publish in progress, or a reservation a crash left
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == accepting  # the lag alert sees it (a crash's is never released)
    record.release(accepting)
    delivered = queue(record, minutes=1)
    record.claim(delivered, message_id="1", trace_id=None, lease_seconds=LEASE)
    record.finish(delivered, attempt(1, "delivered", 250))
    dead = queue(record, minutes=2)
    record.mark_dead_lettered(dead, last_error="451")
    assert oldest_undelivered(record) is None

    newer = queue(record, minutes=4)
    deferred = queue(record, minutes=3)
    record.claim(deferred, message_id="2", trace_id=None, lease_seconds=LEASE)
    record.finish(deferred, attempt(1, "deferred", 451))

    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == deferred
    record.claim(deferred, message_id="2", trace_id=None, lease_seconds=LEASE)
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == deferred  # sending still counts as undelivered
    record.finish(deferred, attempt(2, "delivered", 250))
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == newer

    # A replayed mail is back on the topic: it counts until delivered, so the lag alert sees it.
    mark_replayed(record, dead, trace_id=None)
    oldest = oldest_undelivered(record)
    assert oldest is not None
    assert oldest.mail_id == dead


# --- concurrency ---------------------------------------------------------------------------

THREADS = 8


def test_concurrent_reserves_of_one_key_create_one_mail(
    make_record: Callable[[], DeliveryRecord],
) -> None:
    records = [make_record() for _ in range(2)]  # two handles, as two publisher instances

    results = in_threads(
        THREADS,
        lambda i: records[i % 2].reserve(
            mail_id=f"mail-{i}", accepted_at=T0, recipient_domains=(), idempotency_key="order-1"
        ),
    )

    assert not [r for r in results if isinstance(r, Exception)], results
    created = [r for r in results if r.created]  # type: ignore[union-attr]
    assert len(created) == 1
    winner = created[0].record.mail_id  # type: ignore[union-attr]
    assert {r.record.mail_id for r in results} == {winner}  # type: ignore[union-attr]
    assert [r.mail_id for r in list_mails(records[0]).items] == [winner]


def test_concurrent_claims_of_one_mail_claim_it_once(
    make_record: Callable[[], DeliveryRecord],
) -> None:
    records = [make_record() for _ in range(2)]  # two handles, as two subscriber instances
    mail_id = queue(records[0])

    results = in_threads(
        THREADS,
        lambda i: (
            records[i % 2]
            .claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
            .result
        ),
    )

    assert sorted(map(str, results)) == ["claimed"] + ["in_progress"] * (THREADS - 1)
    stored = records[1].get(mail_id)
    assert stored is not None
    assert stored.attempt_count == 1


# --- SQLite only ---------------------------------------------------------------------------


def _claim_all(path: str, mail_ids: list[str], barrier: object, results: object) -> None:
    """In a child process: open the record and claim every mail (lease long enough)."""
    record = SqliteRecord(path)
    barrier.wait(timeout=60)  # type: ignore[attr-defined]
    outcomes = {
        m: str(record.claim(m, message_id=None, trace_id=None, lease_seconds=600).result)
        for m in mail_ids
    }
    results.put(outcomes)  # type: ignore[attr-defined]
    record.close()


def test_sqlite_two_processes_claim_each_mail_once(tmp_path: Path) -> None:
    path = tmp_path / "record.sqlite3"
    record = SqliteRecord(path)
    mail_ids = [reserve(record, minutes=i) for i in range(20)]
    for mail_id in mail_ids:
        record.mark_queued(mail_id, message_id="1", trace_id=None)
    ctx = multiprocessing.get_context("spawn")  # no sqlite connection crosses a fork
    barrier, results = ctx.Barrier(2), ctx.Queue()
    processes = [
        ctx.Process(target=_claim_all, args=(str(path), mail_ids, barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    for mail_id in mail_ids:
        assert sorted(o[mail_id] for o in outcomes) == ["claimed", "in_progress"]
        stored = record.get(mail_id)
        assert stored is not None
        assert (stored.status, stored.attempt_count) == (MailStatus.SENDING, 1)
    record.close()


def _open_new_records(directory: str, trials: int, barrier: object, results: object) -> None:
    """In a child process: per trial, open the same new record file as the others, at once."""
    errors = []
    for trial in range(trials):
        barrier.wait(timeout=60)  # type: ignore[attr-defined]
        try:
            SqliteRecord(f"{directory}/record-{trial}.sqlite3").close()
        except RecordError as exc:
            errors.append(str(exc))
    results.put(errors)  # type: ignore[attr-defined]


def test_sqlite_processes_opening_the_same_new_record_at_once_all_succeed(tmp_path: Path) -> None:
    # The publisher and the subscriber start together on a new record: turning the file to WAL
    # answered "database is locked" to one of them (about one open in twenty, before the fix).
    processes_count, trials = 6, 25
    ctx = multiprocessing.get_context("fork")  # nothing of sqlite is open in this process yet
    barrier, results = ctx.Barrier(processes_count), ctx.Queue()
    processes = [
        ctx.Process(target=_open_new_records, args=(str(tmp_path), trials, barrier, results))
        for _ in range(processes_count)
    ]
    for process in processes:
        process.start()
    errors = [error for _ in processes for error in results.get(timeout=120)]
    for process in processes:
        process.join(timeout=30)

    assert errors == []
    assert len(list(tmp_path.glob("record-*.sqlite3"))) == trials


def test_sqlite_creates_parent_directories_and_a_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "record.sqlite3"

    record = open_record(f"sqlite:///{path}")
    reserve(record)
    record.close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_sqlite_a_version_1_record_is_migrated_in_place(tmp_path: Path) -> None:
    # Version 1 kept the idempotency key's hash in a UNIQUE column of the one mails table.
    path = tmp_path / "record.sqlite3"
    body = json.dumps(
        {
            "mail_id": "m-1",
            "status": "queued",
            "accepted_at": T0.isoformat(),
            "updated_at": T0.isoformat(),
            "idempotency_key": "order-1",
            "recipient_domains": ["a.b"],
        }
    )
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE mails (mail_id TEXT PRIMARY KEY, status TEXT NOT NULL, accepted_us"
            " INTEGER NOT NULL, key_hash TEXT UNIQUE, body TEXT NOT NULL) WITHOUT ROWID;"
            "CREATE INDEX mails_by_accepted ON mails (accepted_us, mail_id);"
            "CREATE INDEX mails_by_status ON mails (status, accepted_us, mail_id);"
            "PRAGMA user_version = 1;"
        )
        conn.execute(
            "INSERT INTO mails VALUES ('m-1', 'queued', ?, ?, ?)",
            (int(T0.timestamp() * 1_000_000), key_hash("order-1"), body),
        )

    record = SqliteRecord(path)
    try:
        by_key = key_holder(record, "order-1")
        assert by_key is not None
        assert (by_key.mail_id, by_key.status, by_key.accepted_at) == ("m-1", MailStatus.QUEUED, T0)
        assert [
            r.mail_id for r in list_mails(record, status=MailStatus.QUEUED, since=T0).items
        ] == ["m-1"]
        again = record.reserve(
            mail_id="m-2", accepted_at=T0, recipient_domains=(), idempotency_key="order-1"
        )
        assert (again.created, again.record.mail_id) == (False, "m-1")
    finally:
        record.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "record.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(RecordError, match="upgrade mailpipe"):
        SqliteRecord(path)


def test_sqlite_a_lock_held_too_long_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "record.sqlite3"
    record = SqliteRecord(path, busy_timeout=0.05)
    mail_id = reserve(record)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(RecordUnavailable, match="locked"):
            record.claim(mail_id, message_id=None, trace_id=None, lease_seconds=LEASE)
        stored = record.get(mail_id)  # readers are not blocked in WAL mode
        assert stored is not None
        assert stored.status is MailStatus.ACCEPTING
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert record.claim(mail_id, message_id=None, trace_id=None, lease_seconds=LEASE).result is (
        ClaimResult.CLAIMED
    )
    record.close()


# --- Firestore only ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["firestore"], indirect=True)
def test_firestore_documents_carry_expiry_and_the_hashed_key(
    record: DeliveryRecord, firestore_emulator: object, pubsub_project: str
) -> None:
    assert isinstance(record, FirestoreRecord)
    mail_id = reserve(record, key="order-1")
    client = firestore.Client(project=pubsub_project)
    try:
        mail = client.collection(record.collection).document(mail_id).get().to_dict()
        key = (
            client.collection(record.idempotency_collection)
            .document(key_hash("order-1"))
            .get()
            .to_dict()
        )
    finally:
        client.close()

    assert mail is not None
    assert key is not None
    # Terraform's TTL policy deletes documents after expire_at; the emulator never does.
    assert mail["expire_at"] == T0 + dt.timedelta(days=30)
    assert key == {"mail_id": mail_id, "expire_at": T0 + dt.timedelta(days=30)}
