"""The subscriber's side of the suppression list, with its own wiring from the environment
(``build_services``), the SQLite record and aiosmtpd on loopback (deliveries are handed in, as
Pub/Sub would): which refusals suppress, what each attempt records per recipient, and a recipient
already on the list never reaching RCPT TO."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from emulator.smtp import LocalSmtpServer
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus, SuppressionPolicy, SuppressionReason
from mailpipe.telemetry import setup_telemetry
from subscriber.config import SubscriberConfig
from subscriber.delivery import Outcome, ReceivedMessage
from subscriber.main import Services, build_services

KEY = "0123456789abcdef0123456789abcdef-test"
POLICY = SuppressionPolicy("hashed", KEY.encode())


@pytest.fixture
def relay() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer() as server:
        yield server


@pytest.fixture
def services(
    relay: LocalSmtpServer, tmp_path: Path, spans: InMemorySpanExporter
) -> Iterator[Services]:
    config = SubscriberConfig.from_env(
        {
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",  # never contacted: deliveries are handed in
            "MAILPIPE_RECORD": f"sqlite:///{tmp_path / 'record.sqlite3'}",
            "MAILPIPE_SMTP_TLS": "none",
            "MAILPIPE_SMTP_PORT": str(relay.port),
            "MAILPIPE_SUPPRESSION_KEY": KEY,
            "MAILPIPE_LOG_ADDRESSES": "hashed",
        }
    )
    built = build_services(config, telemetry=setup_telemetry(config.telemetry, span_exporter=spans))
    yield built
    built.close()


def deliver(services: Services, *recipients: str) -> tuple[QueuedMail, Outcome]:
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": list(recipients), "subject": "s", "text": "t"}
        )
    )
    data, attributes = mail.to_pubsub()
    message = ReceivedMessage(data=data, attributes=attributes, message_id=mail.mail_id)
    return mail, services.delivery.deliver(message, parent=None).outcome


def test_only_mailbox_gone_refusals_suppress(services: Services, relay: LocalSmtpServer) -> None:
    relay.fail("rcpt", 550, "5.1.1 no such user", address="gone@example.org")
    relay.fail("rcpt", 550, "5.7.1 relaying denied by policy", address="policy@example.org")
    relay.fail("rcpt", 452, "4.2.2 mailbox full, try later", times=1, address="full@example.org")
    listing = services.record.suppressions(POLICY)  # what the API would open

    mail, outcome = deliver(services, "gone@example.org", "policy@example.org", "ok@example.org")
    assert outcome is Outcome.DELIVERED
    [attempt] = services.record.get(mail.mail_id).attempts  # type: ignore[union-attr]
    refused = {(r.status, r.reply_code, r.enhanced_status) for r in attempt.recipients}
    assert refused == {("refused", 550, "5.1.1"), ("refused", 550, "5.7.1")}
    assert all(r.recipient.startswith("sha256:") for r in attempt.recipients)  # as configured
    found = listing.lookup(["gone@example.org", "policy@example.org", "ok@example.org"])
    assert set(found) == {"gone@example.org"}
    entry = found["gone@example.org"]
    assert (entry.reason, entry.mail_id, entry.reply_code) == ("bounce", mail.mail_id, 550)

    # A transient 4xx defers the whole mail and suppresses nobody.
    _, outcome = deliver(services, "full@example.org")
    assert outcome is Outcome.DEFERRED
    assert listing.lookup(["full@example.org"]) == {}


def test_a_suppressed_recipient_never_reaches_rcpt(
    services: Services, relay: LocalSmtpServer
) -> None:
    listing = services.record.suppressions(POLICY)  # what the API would open
    listing.put(listing.entry("Gone@Example.org", SuppressionReason.MANUAL))

    mail, outcome = deliver(services, "gone@example.org", "ok@example.org")
    assert outcome is Outcome.DELIVERED
    [received] = relay.wait_for(1)
    assert received.recipients == ("ok@example.org",)
    [attempt] = services.record.get(mail.mail_id).attempts  # type: ignore[union-attr]
    assert [r.status for r in attempt.recipients] == ["suppressed"]

    alone, outcome = deliver(services, "GONE@example.org")
    assert outcome is Outcome.SUPPRESSED
    record = services.record.get(alone.mail_id)
    assert record is not None and record.status is MailStatus.SUPPRESSED
    assert len(relay.messages) == 1


def test_a_single_recipient_refused_after_data_with_5_1_1_is_suppressed(
    services: Services, relay: LocalSmtpServer
) -> None:
    relay.fail("data", 550, "5.1.1 mailbox unknown (checked after data)", times=1)
    _, outcome = deliver(services, "late@example.org")
    assert outcome is Outcome.BOUNCED
    listing = services.record.suppressions(POLICY)  # what the API would open
    assert set(listing.lookup(["late@example.org"])) == {"late@example.org"}


def test_a_recipient_refused_at_rcpt_is_suppressed_when_data_then_fails(
    services: Services, relay: LocalSmtpServer
) -> None:
    relay.fail("rcpt", 550, "5.1.1 no such user", address="gone@example.org")
    relay.fail("data", 451, "4.3.0 try again later", times=1)
    mail, outcome = deliver(services, "gone@example.org", "ok@example.org")
    assert outcome is Outcome.DEFERRED  # the accepted recipient is retried...
    listing = services.record.suppressions(POLICY)
    assert set(listing.lookup(["gone@example.org", "ok@example.org"])) == {"gone@example.org"}
    [attempt] = services.record.get(mail.mail_id).attempts  # type: ignore[union-attr]
    # ...and the refusal RCPT TO answered is in the attempt, not lost with DATA's 451.
    assert [(r.status, r.reply_code) for r in attempt.recipients] == [("refused", 550)]
