"""``renew_lease``: the claimant's check just before it sends, on every record backend.

The suite's own fixtures (a real SQLite file, Google's Firestore emulator, an injected clock)
come from test_record_backends.
"""

from __future__ import annotations

import datetime as dt

from mailpipe.record.base import ClaimResult, DeliveryRecord, MailStatus, RenewalResult
from tests.integration import test_record_backends as suite
from tests.integration.test_record_backends import LEASE, FakeClock, attempt, in_threads, queue

# The suite's fixtures, by name (its tests are not imported, so they do not run twice).
backend = suite.backend
clock = suite.clock
make_record = suite.make_record
record = suite.record


def claim(record: DeliveryRecord, mail_id: str) -> int:
    claimed = record.claim(mail_id, message_id="42", trace_id=None, lease_seconds=LEASE)
    assert claimed.result is ClaimResult.CLAIMED
    return claimed.attempt_number


def test_a_held_claim_is_renewed_from_now(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = queue(record)
    number = claim(record, mail_id)
    clock.advance(LEASE / 2)

    renewal = record.renew_lease(mail_id, attempt_number=number, lease_seconds=LEASE)

    assert renewal.result is RenewalResult.RENEWED
    stored = record.get(mail_id)
    assert stored is not None and stored.status is MailStatus.SENDING
    assert stored.lease_until == clock.now + dt.timedelta(seconds=LEASE)
    assert renewal.record is not None and renewal.record.lease_until == stored.lease_until


def test_a_renewal_never_shortens_the_lease(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = queue(record)
    number = claim(record, mail_id)
    before = record.get(mail_id)
    assert before is not None

    record.renew_lease(mail_id, attempt_number=number, lease_seconds=1)

    after = record.get(mail_id)
    assert after is not None and after.lease_until == before.lease_until


def test_an_expired_claim_nobody_took_is_renewed_and_keeps_others_out(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    number = claim(record, mail_id)
    clock.advance(LEASE + 5)

    renewal = record.renew_lease(mail_id, attempt_number=number, lease_seconds=LEASE)

    assert renewal.result is RenewalResult.RENEWED
    other = record.claim(mail_id, message_id="43", trace_id=None, lease_seconds=LEASE)
    assert other.result is ClaimResult.IN_PROGRESS


def test_a_claim_taken_over_is_lost_and_the_newer_one_untouched(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    first = claim(record, mail_id)
    clock.advance(LEASE + 1)
    second = claim(record, mail_id)
    before = record.get(mail_id)

    renewal = record.renew_lease(mail_id, attempt_number=first, lease_seconds=LEASE)

    assert renewal.result is RenewalResult.LOST
    assert renewal.record is not None and renewal.record.attempt_count == second == 2
    assert record.get(mail_id) == before  # nothing written


def test_a_mail_delivered_meanwhile_is_final(record: DeliveryRecord, clock: FakeClock) -> None:
    mail_id = queue(record)
    first = claim(record, mail_id)
    clock.advance(LEASE + 1)
    second = claim(record, mail_id)
    record.finish(mail_id, attempt(second, "delivered", 250))

    renewal = record.renew_lease(mail_id, attempt_number=first, lease_seconds=LEASE)

    assert renewal.result is RenewalResult.FINAL
    assert renewal.record is not None and renewal.record.status is MailStatus.DELIVERED


def test_a_mail_without_record_is_lost(record: DeliveryRecord) -> None:
    renewal = record.renew_lease("never-claimed", attempt_number=1, lease_seconds=LEASE)
    assert renewal.result is RenewalResult.LOST
    assert record.get("never-claimed") is None


def test_of_two_racing_claimants_only_one_may_send(
    record: DeliveryRecord, clock: FakeClock
) -> None:
    mail_id = queue(record)
    first = claim(record, mail_id)
    clock.advance(LEASE + 1)

    # The old claimant renews while a redelivered copy claims: exactly one of them wins.
    def race(i: int) -> object:
        if i == 0:
            return record.renew_lease(mail_id, attempt_number=first, lease_seconds=LEASE).result
        return record.claim(mail_id, message_id="43", trace_id=None, lease_seconds=LEASE).result

    renewed, claimed = in_threads(2, race)
    assert (renewed, claimed) in (
        (RenewalResult.RENEWED, ClaimResult.IN_PROGRESS),
        (RenewalResult.LOST, ClaimResult.CLAIMED),
    )
