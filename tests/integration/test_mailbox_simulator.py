"""The local SMTP server's mailbox simulator, spoken to with smtplib over loopback.

Each reserved local part at the simulator's domain answers its scripted reply (README, "Mailbox
simulator"); every other domain is served exactly as without the simulator.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator

import pytest

from emulator.smtp import SIMULATOR_DOMAIN, LocalSmtpServer, MailboxSimulator
from mailpipe.mail import addr_spec

SENDER = "sender@example.com"


def at(local: str) -> str:
    return f"{local}@{SIMULATOR_DOMAIN}"


def mail(message_id: str | None = "<01a2b3c4@mailpipe.test>", body: str = "hello") -> bytes:
    headers = f"From: {SENDER}\r\nTo: someone\r\nSubject: hi\r\n"
    if message_id is not None:
        headers += f"Message-ID: {message_id}\r\n"
    return f"{headers}\r\n{body}\r\n".encode()


@pytest.fixture
def server() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(simulator=MailboxSimulator()) as running:
        yield running


def transaction(
    server: LocalSmtpServer, recipients: list[str], message: bytes, timeout: float = 30.0
) -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes] | None]:
    """One SMTP transaction: the RCPT replies, and the DATA reply (None if no RCPT was taken)."""
    with smtplib.SMTP(server.host, server.port, timeout=timeout) as client:
        client.ehlo("tests.localhost")
        assert client.mail(SENDER)[0] == 250
        replies = {rcpt: client.rcpt(rcpt) for rcpt in recipients}
        if not any(code == 250 for code, _ in replies.values()):
            client.rset()
            return replies, None
        return replies, client.data(message)


def test_the_simulator_domain_is_one_the_publisher_accepts() -> None:
    for local in ("success", "bounce", "defer-3", "defer-forever", "slow", "slow-2", "bounce+x"):
        assert addr_spec(at(local)) == at(local)


def test_a_special_use_domain_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"simulator\.test.*special-use.*\.example"):
        MailboxSimulator("simulator.test")


def test_success_is_accepted_and_kept(server: LocalSmtpServer) -> None:
    replies, data = transaction(server, [at("success")], mail())
    assert replies[at("success")][0] == 250
    assert data is not None and data[0] == 250
    [received] = server.messages
    assert received.recipients == (at("success"),)


@pytest.mark.parametrize("local", ["bounce", "bounce+label-1", "BOUNCE"])
def test_bounce_is_refused_at_rcpt_with_5_1_1(server: LocalSmtpServer, local: str) -> None:
    replies, data = transaction(server, [at(local)], mail())
    code, text = replies[at(local)]
    assert (code, text.split()[0]) == (550, b"5.1.1")
    assert b"user unknown" in text
    assert data is None and server.messages == []


def test_a_bounce_among_recipients_leaves_the_others_their_mail(server: LocalSmtpServer) -> None:
    replies, data = transaction(server, [at("bounce"), at("success")], mail())
    assert replies[at("bounce")][0] == 550 and replies[at("success")][0] == 250
    assert data is not None and data[0] == 250
    assert server.messages[0].recipients == (at("success"),)


@pytest.mark.parametrize(
    "local", ["nobody", "defer", "defer-0", "defer-101", "slow-0", "slow-61", "success-1"]
)
def test_any_other_local_part_is_refused_naming_the_valid_ones(
    server: LocalSmtpServer, local: str
) -> None:
    replies, _ = transaction(server, [at(local)], mail())
    code, text = replies[at(local)]
    assert (code, text.split()[0]) == (550, b"5.1.1")
    for valid in (b"success", b"bounce", b"defer-N", b"defer-forever", b"slow-S", b"+label"):
        assert valid in text


def test_defer_n_defers_n_attempts_of_a_mail_then_accepts_it(server: LocalSmtpServer) -> None:
    replies = [transaction(server, [at("defer-2")], mail())[1] for _ in range(3)]

    assert [reply[0] if reply else None for reply in replies] == [451, 451, 250]
    texts = [reply[1] if reply else b"" for reply in replies]
    assert texts[0].startswith(b"4.2.0 ") and b"attempt 1 of 2" in texts[0]
    assert texts[1].startswith(b"4.2.0 ") and b"attempt 2 of 2" in texts[1]
    [received] = server.messages  # kept once, at the attempt that was accepted
    assert received.recipients == (at("defer-2"),)
    assert server.simulator is not None
    assert server.simulator.attempts("<01a2b3c4@mailpipe.test>", at("defer-2")) == 3


def data_code(server: LocalSmtpServer, recipients: list[str], message: bytes) -> int | None:
    reply = transaction(server, recipients, message)[1]
    return reply[0] if reply else None


def test_attempts_are_counted_per_mail_and_recipient(server: LocalSmtpServer) -> None:
    first, second = mail("<first@mailpipe.test>"), mail("<second@mailpipe.test>")
    a, b = at("defer-1+a"), at("defer-1+b")

    assert data_code(server, [a], first) == 451
    assert data_code(server, [a], second) == 451  # another mail: its own first attempt
    assert data_code(server, [b], first) == 451  # another recipient of the first mail
    assert data_code(server, [a], first) == 250
    assert data_code(server, [b], first) == 250
    assert data_code(server, [a], second) == 250


def test_without_a_message_id_the_same_bytes_count_as_the_same_mail(
    server: LocalSmtpServer,
) -> None:
    codes = [transaction(server, [at("defer-1")], mail(None))[1] for _ in range(2)]
    other = transaction(server, [at("defer-1")], mail(None, body="another mail"))[1]
    assert [c[0] for c in codes if c] == [451, 250]
    assert other is not None and other[0] == 451


def test_defer_forever_never_recovers(server: LocalSmtpServer) -> None:
    replies = [transaction(server, [at("defer-forever")], mail())[1] for _ in range(6)]
    assert {reply[0] for reply in replies if reply} == {451}
    assert all(reply and reply[1].startswith(b"4.2.0 ") for reply in replies)
    assert server.messages == []


def test_a_deferring_recipient_defers_the_whole_mail(server: LocalSmtpServer) -> None:
    """One DATA reply covers every recipient: nobody gets a copy before the retry."""
    _, data = transaction(server, [at("success"), at("defer-1")], mail())
    assert data is not None and data[0] == 451
    assert server.messages == []
    _, data = transaction(server, [at("success"), at("defer-1")], mail())
    assert data is not None and data[0] == 250
    assert server.messages[0].recipients == (at("success"), at("defer-1"))


def test_slow_answers_late_then_accepts(server: LocalSmtpServer) -> None:
    _, data = transaction(server, [at("slow-1")], mail())
    assert data is not None and data[0] == 250
    assert len(server.messages) == 1


def test_slow_is_a_timeout_for_a_client_that_will_not_wait(server: LocalSmtpServer) -> None:
    """A client giving up before the late reply gets none, and the mail is not kept."""
    with pytest.raises((TimeoutError, socket.timeout, smtplib.SMTPServerDisconnected)):
        transaction(server, [at("slow-3")], mail(), timeout=0.5)
    server.wait_for_connections(0)
    assert server.messages == []


@pytest.mark.parametrize("local", ["bounce", "defer-forever", "nobody"])
def test_other_domains_are_served_as_without_the_simulator(
    server: LocalSmtpServer, local: str
) -> None:
    address = f"{local}@example.org"
    replies, data = transaction(server, [address], mail())
    assert replies[address][0] == 250
    assert data is not None and data[0] == 250


def test_without_a_simulator_the_simulator_addresses_are_ordinary() -> None:
    with LocalSmtpServer() as plain:
        replies, data = transaction(plain, [at("bounce")], mail())
    assert replies[at("bounce")][0] == 250
    assert data is not None and data[0] == 250


def test_scripted_faults_come_before_the_simulator(server: LocalSmtpServer) -> None:
    server.fail("rcpt", 452, "4.3.1 insufficient system storage", times=1)
    replies, _ = transaction(server, [at("bounce")], mail())
    assert replies[at("bounce")][0] == 452
