"""The third double-send window: a delivery that claimed a mail, then waited for a pooled SMTP
connection while its lease ran out.

Issue 16's reproduction: a pool of one connection, a 1 s lease, a slow relay holding the only
connection, and the same mail delivered twice (the second delivery standing in for Pub/Sub's
redelivery after the ack deadline). Everything is real: the subscriber's own wiring
(``build_services`` from the environment), the SQLite record, aiosmtpd on loopback. Before the
fix the relay received the mail twice.

Two lines of defence close it, each tested here:

- the time limits nest (pool wait < delivery timeout < lease), so a waiting delivery gives up
  before its lease ends (a recorded, deferred attempt; nothing sent);
- just before MAIL FROM, with the connection held, the delivery renews its claim in the record:
  if another delivery claimed the mail meanwhile, or it was delivered, nothing is sent. The tests
  of this line break the first on purpose (a lease shorter than the delivery timeout, as a paused
  process or an ack deadline changed behind the subscriber's back would).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import Attempt, ClaimResult, DeliveryRecord, MailStatus, open_record
from mailpipe.telemetry import setup_telemetry
from subscriber.config import SmtpConfig, SubscriberConfig
from subscriber.delivery import DeliveryResult, DeliveryService, Outcome, ReceivedMessage
from subscriber.main import Services, build_services
from subscriber.smtp import SmtpSender
from tests.fixtures.smtp import CommandLog
from tests.reliability.harness import COUNT_LINES

SLOW_RELAY_SECONDS = 3.0  # how long the relay sits on the first mail's DATA


def queued(tag: str, sender: str = "slow@example.com") -> tuple[QueuedMail, Callable[[str], Any]]:
    """A mail and a factory of its Pub/Sub deliveries (one per Pub/Sub message id)."""
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": sender, "to": ["rcpt@example.org"], "subject": tag, "text": f"{tag}\n"}
        )
    )
    data, attributes = mail.to_pubsub()

    def delivery(message_id: str) -> ReceivedMessage:
        return ReceivedMessage(data=data, attributes=attributes, message_id=message_id)

    return mail, delivery


def received(relay: CommandLog, mail: QueuedMail) -> int:
    return sum(1 for m in relay.messages if m.message["Subject"] == mail.request.subject)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def lease_ran_out(record: DeliveryRecord, mail_id: str) -> Callable[[], bool]:
    """True once the mail was claimed and that claim's lease has ended (or was given back)."""

    def check() -> bool:
        found = record.get(mail_id)
        if found is None or found.attempt_count < 1:
            return False
        return found.lease_until is None or found.lease_until <= dt.datetime.now(dt.UTC)

    return check


def attempts_claimed(record: DeliveryRecord, mail_id: str) -> int:
    found = record.get(mail_id)
    return found.attempt_count if found is not None else 0


@pytest.fixture
def relay() -> Iterator[CommandLog]:
    with CommandLog() as server:
        yield server


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def subscriber(
    relay: CommandLog, tmp_path: Path, spans: InMemorySpanExporter, **env: str
) -> Services:
    """The subscriber's own wiring, from the environment, as `python -m subscriber` builds it."""
    config = SubscriberConfig.from_env(
        {
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",  # never contacted: deliveries are handed in
            "MAILPIPE_RECORD": f"sqlite:///{tmp_path / 'record.sqlite3'}",
            "MAILPIPE_SMTP_TLS": "none",
            "MAILPIPE_SMTP_PORT": str(relay.port),
            "MAILPIPE_SMTP_POOL_SIZE": "1",
            **env,
        }
    )
    return build_services(config, telemetry=setup_telemetry(config.telemetry, span_exporter=spans))


def test_issue_16_a_slow_relay_and_a_short_lease_no_longer_send_a_mail_twice(
    relay: CommandLog, tmp_path: Path, spans: InMemorySpanExporter, pool: ThreadPoolExecutor
) -> None:
    services = subscriber(relay, tmp_path, spans, MAILPIPE_DELIVERY_LEASE_SECONDS="1")
    try:
        record = services.record
        _, first_delivery = queued("holds the only connection")
        mail, delivery = queued("the same mail twice", sender="twice@example.com")
        relay.hang("data", SLOW_RELAY_SECONDS, times=1)

        def deliver(message: ReceivedMessage) -> Future[DeliveryResult]:
            return pool.submit(services.delivery.deliver, message, parent=None)

        slow = deliver(first_delivery("x-1"))
        # The relay sits on it: the pool is full. (Its own 0.5 s budget may end it first.)
        wait_until(lambda: relay.count("data") == 1 or slow.done())
        results = [deliver(delivery("m-1"))]
        wait_until(lease_ran_out(record, mail.mail_id))
        results.append(deliver(delivery("m-2")))  # Pub/Sub's redelivery after the deadline
        outcomes = [f.result(timeout=60).outcome for f in results]
        slow.result(timeout=60)
        # Pub/Sub retries whatever was nacked (each retry a new delivery of the same message).
        retries = 0
        while not any(o in (Outcome.DELIVERED, Outcome.DUPLICATE) for o in outcomes):
            retries += 1
            assert retries <= 3, outcomes
            retry = services.delivery.deliver(delivery(f"m-r{retries}"), parent=None)
            outcomes.append(retry.outcome)

        sent = received(relay, mail)
        line = (
            f"[double-send window: pool 1, lease 1 s, relay stalled {SLOW_RELAY_SECONDS:g} s] "
            f"deliveries={[str(o) for o in outcomes]} sent={sent}"
        )
        print(line)
        COUNT_LINES.append(line)
        assert sent == 1, f"the relay received the mail {sent} times"
        assert relay.count("mail", "twice@example.com") == 1
        stored = record.get(mail.mail_id)
        assert stored is not None and stored.status is MailStatus.DELIVERED
        # A delivery that did not send stopped before MAIL FROM, and the record says why.
        for attempt in stored.attempts:
            if attempt.outcome == "deferred":
                assert attempt.failed_step in ("pool wait", "claim"), attempt
    finally:
        services.close()


def test_a_wait_longer_than_the_pool_wait_defers_without_sending(
    relay: CommandLog, tmp_path: Path, spans: InMemorySpanExporter, pool: ThreadPoolExecutor
) -> None:
    services = subscriber(
        relay,
        tmp_path,
        spans,
        MAILPIPE_SMTP_POOL_WAIT="0.3",
        MAILPIPE_DELIVERY_TIMEOUT="5",
        MAILPIPE_DELIVERY_LEASE_SECONDS="10",
    )
    try:
        first, first_delivery = queued("holds the only connection")
        mail, delivery = queued("waits in vain", sender="waiting@example.com")
        relay.hang("data", 2.0, times=1)
        slow = pool.submit(services.delivery.deliver, first_delivery("x-1"), parent=None)
        wait_until(lambda: relay.count("data") == 1)

        waited = services.delivery.deliver(delivery("m-1"), parent=None)

        assert waited.outcome is Outcome.DEFERRED and not waited.ack
        assert "MAILPIPE_SMTP_POOL_WAIT" in waited.detail
        stored = services.record.get(mail.mail_id)
        assert stored is not None and stored.status is MailStatus.DEFERRED
        [attempt] = stored.attempts
        assert attempt.failed_step == "pool wait"
        assert "MAILPIPE_SMTP_POOL_WAIT (0.3 s)" in (attempt.reply_message or "")
        assert "nothing was sent" in (attempt.reply_message or "")
        assert relay.count("mail", "waiting@example.com") == 0  # no SMTP command for it
        [deliver_span] = [
            s
            for s in spans.get_finished_spans()
            if s.name == "mail deliver"
            and (s.attributes or {}).get("mailpipe.mail_id") == mail.mail_id
        ]
        children = [
            s
            for s in spans.get_finished_spans()
            if s.parent is not None and s.parent.span_id == deliver_span.context.span_id
        ]
        assert children == []  # not one SMTP step

        assert slow.result(timeout=30).outcome is Outcome.DELIVERED
        again = services.delivery.deliver(delivery("m-2"), parent=None)  # Pub/Sub's retry
        assert again.outcome is Outcome.DELIVERED
        assert received(relay, mail) == 1 and received(relay, first) == 1
    finally:
        services.close()


# -- the claim check before MAIL FROM ------------------------------------------------------------


@pytest.fixture
def unguarded(
    relay: CommandLog, tmp_path: Path, spans: InMemorySpanExporter
) -> Iterator[tuple[DeliveryService, DeliveryRecord]]:
    """A delivery core whose limits do NOT nest (1 s lease, 30 s budget, 20 s pool wait): what a
    paused process or a clock jump does to a correct config. Only the claim check is left."""
    record = open_record(f"sqlite:///{tmp_path / 'record.sqlite3'}")
    sender = SmtpSender(
        SmtpConfig(host=relay.host, port=relay.port, tls="none", pool_size=1, pool_wait=20.0)
    )
    delivery = DeliveryService(
        sender=sender,
        record=record,
        tracer=trace.get_tracer("tests.claim"),
        message_id_domain="mailpipe.test",
        lease_seconds=1.0,
        delivery_timeout=30.0,
    )
    try:
        yield delivery, record
    finally:
        sender.close()
        record.close()


def test_a_claim_taken_over_while_waiting_is_not_sent(
    relay: CommandLog,
    unguarded: tuple[DeliveryService, DeliveryRecord],
    pool: ThreadPoolExecutor,
) -> None:
    delivery, record = unguarded
    _, first_delivery = queued("holds the only connection")
    mail, deliveries = queued("claimed twice", sender="twice@example.com")
    relay.hang("data", SLOW_RELAY_SECONDS, times=1)
    slow = pool.submit(delivery.deliver, first_delivery("x-1"), parent=None)
    wait_until(lambda: relay.count("data") == 1)

    early = pool.submit(delivery.deliver, deliveries("m-1"), parent=None)
    wait_until(lease_ran_out(record, mail.mail_id))
    late = pool.submit(delivery.deliver, deliveries("m-2"), parent=None)
    wait_until(lambda: attempts_claimed(record, mail.mail_id) == 2)
    outcomes = sorted(str(f.result(timeout=60).outcome) for f in (early, late))

    assert slow.result(timeout=30).outcome is Outcome.DELIVERED
    assert received(relay, mail) == 1
    assert relay.count("mail", "twice@example.com") == 1  # the loser sent not even MAIL FROM
    stored = record.get(mail.mail_id)
    assert stored is not None and stored.status is MailStatus.DELIVERED
    # Whichever held the connection first: the older claim stands down, or finds it delivered.
    assert outcomes in (["deferred", "delivered"], ["delivered", "duplicate"]), outcomes
    if outcomes == ["deferred", "delivered"]:
        [lost] = [a for a in stored.attempts if a.outcome == "deferred"]
        assert (lost.number, lost.failed_step) == (1, "claim")
        assert "attempt 2 claimed the mail" in (lost.reply_message or "")


def test_a_mail_delivered_elsewhere_while_waiting_is_not_sent(
    relay: CommandLog,
    unguarded: tuple[DeliveryService, DeliveryRecord],
    pool: ThreadPoolExecutor,
) -> None:
    delivery, record = unguarded
    _, first_delivery = queued("holds the only connection")
    mail, deliveries = queued("delivered by another instance", sender="other@example.com")
    relay.hang("data", SLOW_RELAY_SECONDS, times=1)
    slow = pool.submit(delivery.deliver, first_delivery("x-1"), parent=None)
    wait_until(lambda: relay.count("data") == 1)

    waiting = pool.submit(delivery.deliver, deliveries("m-1"), parent=None)
    wait_until(lease_ran_out(record, mail.mail_id))
    # Another subscriber instance claims the redelivered copy and delivers it.
    other = record.claim(mail.mail_id, message_id="m-2", trace_id=None, lease_seconds=60)
    assert other.result is ClaimResult.CLAIMED
    now = dt.datetime.now(dt.UTC)
    record.finish(
        mail.mail_id,
        Attempt(number=other.attempt_number, started_at=now, finished_at=now, outcome="delivered"),
    )

    result = waiting.result(timeout=60)
    assert slow.result(timeout=30).outcome is Outcome.DELIVERED
    assert result.outcome is Outcome.DUPLICATE and result.ack
    assert "not sent again" in result.detail
    assert relay.count("mail", "other@example.com") == 0
    stored = record.get(mail.mail_id)
    assert stored is not None and stored.status is MailStatus.DELIVERED
    assert [a.number for a in stored.attempts] == [2]
