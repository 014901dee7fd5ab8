"""The local SMTP server itself (emulator.smtp), driven with the standard library's smtplib."""

from __future__ import annotations

import mailbox
import smtplib
import socket
from pathlib import Path

import pytest

from emulator.errors import EmulatorError
from emulator.smtp import LocalSmtpServer, LocalSmtpServerError
from tests.fixtures.smtp import TlsCerts

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: kept\r\n\r\nbody\r\n"


def send(server: LocalSmtpServer, message: bytes = MESSAGE) -> None:
    with smtplib.SMTP(server.host, server.port, local_hostname="test", timeout=5) as client:
        client.sendmail("a@example.com", ["b@example.com"], message)


def test_mails_are_kept_in_memory_and_in_the_maildir(tmp_path: Path) -> None:
    with LocalSmtpServer(maildir=tmp_path / "maildir") as server:
        send(server)
        [received] = server.wait_for(1)
    assert received.mail_from == "a@example.com"
    assert received.recipients == ("b@example.com",)
    assert received.message["Subject"] == "kept"
    assert not received.tls and received.login is None
    box = mailbox.Maildir(tmp_path / "maildir", create=False)
    [stored] = list(box)
    assert stored["Subject"] == "kept"
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 1


def test_a_port_in_use_says_how_to_fix_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LocalSmtpServer(port=port)
        with pytest.raises(LocalSmtpServerError, match="already in use") as info:
            server.start()
    assert isinstance(info.value, EmulatorError)
    assert "port 0 picks a free one" in str(info.value)
    assert not server.running


def test_restart_keeps_the_port_and_the_mails(smtp_server: LocalSmtpServer) -> None:
    send(smtp_server)
    port = smtp_server.port
    smtp_server.stop()
    with pytest.raises(OSError):
        send(smtp_server)
    smtp_server.start()
    assert smtp_server.port == port
    send(smtp_server)
    assert len(smtp_server.wait_for(2)) == 2


def test_wait_for_reports_what_arrived(smtp_server: LocalSmtpServer) -> None:
    send(smtp_server)
    with pytest.raises(TimeoutError, match="received 1 mail"):
        smtp_server.wait_for(2, timeout=0.2)


def test_faults_recover_after_the_given_number_of_times(smtp_server: LocalSmtpServer) -> None:
    smtp_server.fail("data", 451, "4.3.0 try again", times=2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(smtp_server)
        assert info.value.smtp_code == 451
    send(smtp_server)
    assert len(smtp_server.wait_for(1)) == 1


def test_clear_faults(smtp_server: LocalSmtpServer) -> None:
    smtp_server.fail("mail", 550, "5.7.1 no")
    smtp_server.clear_faults()
    send(smtp_server)
    assert len(smtp_server.wait_for(1)) == 1


def test_refuse_and_accept_connections(smtp_server: LocalSmtpServer) -> None:
    smtp_server.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        send(smtp_server)
    smtp_server.accept_connections()
    send(smtp_server)
    assert len(smtp_server.wait_for(1)) == 1


def test_starttls_offered_only_with_a_tls_context(
    smtp_server: LocalSmtpServer, smtp_tls_server: LocalSmtpServer, tls_certs: TlsCerts
) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=5) as client:
        client.ehlo("test")
        assert not client.has_extn("starttls")
    with smtplib.SMTP(smtp_tls_server.host, smtp_tls_server.port, timeout=5) as client:
        client.ehlo("test")
        assert client.has_extn("starttls")
        client.starttls(context=tls_certs.client_context())
        client.ehlo("test")
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
    [received] = smtp_tls_server.wait_for(1)
    assert received.tls


def test_auth_is_required_when_configured(tls_certs: TlsCerts) -> None:
    with LocalSmtpServer(tls_context=tls_certs.server_context(), auth={"u": "p"}) as server:
        with smtplib.SMTP(server.host, server.port, timeout=5) as client:
            client.ehlo("test")
            assert not client.has_extn("auth")  # not before STARTTLS
            client.starttls(context=tls_certs.client_context())
            client.ehlo("test")
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            assert info.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("u", "wrong")
            client.login("u", "p")
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        [received] = server.wait_for(1)
    assert received.login == "u"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.fail("quit", 421, "x"), "step must be one of"),
        (lambda s: s.fail("mail", 999, "x"), "200..599"),
        (lambda s: s.fail("mail", 550, "a\r\n250 ok"), "one line"),
        (lambda s: s.hang("data", 1.0, times=0), "at least 1"),
    ],
)
def test_fault_arguments_are_checked(call: object, message: str) -> None:
    server = LocalSmtpServer()
    with pytest.raises(ValueError, match=message):
        call(server)  # type: ignore[operator]


def test_faults_at_connect_replace_the_greeting_drop_or_delay_it() -> None:
    with LocalSmtpServer() as server:
        server.fail("connect", 421, "4.3.2 too busy", times=1)
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtplib.SMTP(server.host, server.port, local_hostname="test", timeout=5)
        assert (info.value.smtp_code, info.value.smtp_error) == (421, b"4.3.2 too busy")

        server.drop_connection("connect", times=1)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtplib.SMTP(server.host, server.port, local_hostname="test", timeout=5)

        server.hang("connect", 0.3, times=1)
        send(server)  # greeted late, then served as usual
        server.wait_for(1)
        server.wait_for_connections(0)
        assert server.connections_total == 3
        assert server.max_open_connections == 1


def test_observers_see_every_command_and_every_kept_mail() -> None:
    commands: list[tuple[str, str | None]] = []
    kept: list[tuple[str, str]] = []
    with LocalSmtpServer(
        on_command=lambda step, address: commands.append((step, address)),
        on_mail=lambda mail, queue_id: kept.append((mail.mail_from, queue_id)),
    ) as server:
        commands.clear()  # start() checks the server answers with one connection of its own
        server.fail("rcpt", 550, "5.1.1 no such user", times=1)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(server)
        send(server)
        server.wait_for(1)
    assert commands == [
        ("connect", None),
        ("ehlo", None),
        ("mail", "a@example.com"),
        ("rcpt", "b@example.com"),
        ("rset", None),  # smtplib's sendmail resets after the refusal
        ("quit", None),
        ("connect", None),
        ("ehlo", None),
        ("mail", "a@example.com"),
        ("rcpt", "b@example.com"),
        ("data", None),
        ("quit", None),
    ]
    [(sender, queue_id)] = kept
    assert sender == "a@example.com" and queue_id
