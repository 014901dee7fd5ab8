"""The whole delivery has one time budget (``MAILPIPE_DELIVERY_TIMEOUT``), not one per step.

Real parts: the subscriber's own wiring from the environment (``build_services``), the SQLite
record, aiosmtpd on loopback — and, for the tarpit, a TCP server that trickles its greeting.
Each relay here stays under the per-step timeout at every step, so only the budget can stop it;
the tests check the outcome and what the record says, and bound how far the relay got.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from emulator.smtp import STEPS
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus
from mailpipe.telemetry import setup_telemetry
from subscriber.config import SmtpConfig, SubscriberConfig
from subscriber.delivery import Outcome, ReceivedMessage
from subscriber.errors import SmtpPoolTimeout
from subscriber.main import Services, build_services
from subscriber.smtp import SmtpReceipt, SmtpSender
from tests.fixtures.smtp import CommandLog

STALL = 0.9  # seconds the relay waits at each step: under MAILPIPE_SMTP_TIMEOUT=1


def a_mail() -> tuple[QueuedMail, ReceivedMessage]:
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["b@example.org"], "subject": "budget", "text": "t"}
        )
    )
    data, attributes = mail.to_pubsub()
    return mail, ReceivedMessage(data=data, attributes=attributes, message_id="1")


def subscriber(port: int, tmp_path: Path, spans: InMemorySpanExporter, **env: str) -> Services:
    config = SubscriberConfig.from_env(
        {
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",  # never contacted: deliveries are handed in
            "MAILPIPE_RECORD": f"sqlite:///{tmp_path / 'record.sqlite3'}",
            "MAILPIPE_SMTP_TLS": "none",
            "MAILPIPE_SMTP_PORT": str(port),
            "MAILPIPE_SMTP_TIMEOUT": "1",
            "MAILPIPE_DELIVERY_LEASE_SECONDS": "10",
            **env,
        }
    )
    return build_services(config, telemetry=setup_telemetry(config.telemetry, span_exporter=spans))


def test_a_relay_stalling_step_after_step_is_cut_off_by_the_budget(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    with CommandLog() as relay:
        for step in STEPS:  # 5 stalls of 0.9 s: 4.5 s in all, each under the 1 s step timeout
            relay.hang(step, STALL, times=1)
        services = subscriber(relay.port, tmp_path, spans, MAILPIPE_DELIVERY_TIMEOUT="2.5")
        try:
            mail, message = a_mail()

            result = services.delivery.deliver(message, parent=None)

            assert result.outcome is Outcome.DEFERRED and not result.ack
            assert "MAILPIPE_DELIVERY_TIMEOUT" in result.detail
            stored = services.record.get(mail.mail_id)
            assert stored is not None and stored.status is MailStatus.DEFERRED
            [attempt] = stored.attempts
            assert attempt.failed_step in ("connect", "ehlo", "mail from", "rcpt to"), attempt
            assert "time budget (MAILPIPE_DELIVERY_TIMEOUT) ran out" in (
                attempt.reply_message or ""
            )
            # The budget stopped it before DATA: the relay stalled at most at 4 of the 5 steps.
            assert relay.count("data") == 0 and relay.messages == []
            assert len(relay.commands) <= 4

            # Pub/Sub's retry meets the stalls that are left, fits in the budget, and delivers.
            again = services.delivery.deliver(message, parent=None)
            assert again.outcome is Outcome.DELIVERED
            assert len(relay.messages) == 1
        finally:
            services.close()


class Tarpit:
    """A TCP server that answers every connection with an endless multi-line greeting, one
    ``220-`` line every ``interval`` seconds (at most ``lines``), as SMTP tarpits do."""

    def __init__(self, interval: float = 0.2, lines: int = 60) -> None:
        self.interval = interval
        self.lines = lines
        self.sent = 0
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Tarpit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(self.interval)
            for number in range(self.lines):
                try:
                    conn.sendall(f"220-tarpit line {number}\r\n".encode())
                    self.sent += 1
                    if conn.recv(1) == b"":  # waits `interval` unless the client hung up
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
                if self._stop.is_set():
                    return
        self.hung_up.set()


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    with Tarpit() as server:
        yield server


def test_a_relay_trickling_its_greeting_cannot_outlast_the_budget(
    tarpit: Tarpit, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    # Every line arrives well within MAILPIPE_SMTP_TIMEOUT=1: only the budget can end this.
    services = subscriber(tarpit.port, tmp_path, spans, MAILPIPE_DELIVERY_TIMEOUT="2")
    try:
        mail, message = a_mail()

        result = services.delivery.deliver(message, parent=None)

        assert result.outcome is Outcome.DEFERRED
        stored = services.record.get(mail.mail_id)
        assert stored is not None
        [attempt] = stored.attempts
        assert attempt.failed_step == "connect"
        assert "MAILPIPE_DELIVERY_TIMEOUT" in (attempt.reply_message or "")
        assert tarpit.hung_up.wait(10)
        assert tarpit.sent < tarpit.lines  # the client hung up, not the tarpit
    finally:
        services.close()


# -- the sender's side of it -------------------------------------------------------------------

MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n\r\nbody\r\n"


def test_a_send_stopped_before_mail_from_sends_nothing_and_keeps_the_connection() -> None:
    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with CommandLog() as relay:
        config = SmtpConfig(host=relay.host, port=relay.port, tls="none", pool_size=1)
        with SmtpSender(config) as sender:
            with pytest.raises(Stop):
                sender.send(
                    mail_from="stopped@example.com",
                    recipients=["b@example.org"],
                    message=MESSAGE,
                    before_mail_from=stop,
                )
            assert relay.count("mail") == 0
            # The only slot and its connection came back: the next mail uses them.
            receipt = sender.send(
                mail_from="a@example.com", recipients=["b@example.org"], message=MESSAGE
            )
        assert isinstance(receipt, SmtpReceipt) and receipt.connection_reused
        assert relay.connections_total == 1 and len(relay.messages) == 1


def test_a_full_pool_is_waited_for_only_so_long() -> None:
    with CommandLog() as relay:
        relay.hang("data", 1.5, times=1)
        config = SmtpConfig(
            host=relay.host, port=relay.port, tls="none", pool_size=1, pool_wait=0.2
        )
        with SmtpSender(config) as sender:
            holder = threading.Thread(
                target=sender.send,
                kwargs={
                    "mail_from": "a@example.com",
                    "recipients": ["b@example.org"],
                    "message": MESSAGE,
                },
            )
            holder.start()
            try:
                with pytest.raises(SmtpPoolTimeout) as raised:
                    while relay.count("data") == 0:  # until the holder sits in DATA
                        threading.Event().wait(0.01)
                    sender.send(
                        mail_from="waiting@example.com",
                        recipients=["b@example.org"],
                        message=MESSAGE,
                    )
            finally:
                holder.join(timeout=30)
        assert raised.value.step == "pool wait" and raised.value.transient
        assert "MAILPIPE_SMTP_POOL_WAIT (0.2 s)" in str(raised.value)
        assert relay.count("mail", "waiting@example.com") == 0
