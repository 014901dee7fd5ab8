"""SmtpSender against the real local SMTP server (aiosmtpd on 127.0.0.1), TLS from trustme.

Spans go to the session's in-memory exporter (``spans`` fixture); each test opens a
``mail deliver`` span around ``send`` as the delivery core does, and looks at its children.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from emulator.smtp import LocalSmtpServer
from mailpipe.logs import redact_address
from mailpipe.mail import MailRequest, QueuedMail
from subscriber.config import SmtpConfig
from subscriber.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpConnectionError,
    SmtpPermanentReply,
    SmtpTimeout,
    SmtpTlsError,
    SmtpTransientReply,
    TransientDeliveryError,
)
from subscriber.message import build_message, envelope, message_bytes
from subscriber.smtp import SmtpReceipt, SmtpSender
from tests.fixtures.smtp import TlsCerts

MakeConfig = Callable[..., SmtpConfig]
PASSWORD = "s3cret-Pa55word-that-must-not-leak"
SIMPLE = b"From: ada@example.com\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello\r\n"


@pytest.fixture
def tracer(spans: InMemorySpanExporter) -> trace.Tracer:
    return trace.get_tracer("tests.smtp")


def traced_send(
    sender: SmtpSender,
    tracer: trace.Tracer,
    *,
    recipients: Sequence[str] = ("bob@example.com",),
    message: bytes = SIMPLE,
    mail_from: str = "ada@example.com",
) -> tuple[SmtpReceipt | DeliveryError, int]:
    """Send inside a ``mail deliver`` span; return the receipt (or the error) and the trace id."""
    with tracer.start_as_current_span("mail deliver") as span:
        trace_id = span.get_span_context().trace_id
        try:
            return sender.send(
                mail_from=mail_from, recipients=recipients, message=message
            ), trace_id
        except DeliveryError as exc:
            return exc, trace_id


def trace_spans(
    exporter: InMemorySpanExporter, trace_id: int
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The ``mail deliver`` span of a trace and its children, in the order they started."""
    mine = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    root = next(s for s in mine if s.name == "mail deliver")
    children = sorted((s for s in mine if s is not root), key=lambda s: s.start_time or 0)
    for child in children:
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert child.kind is SpanKind.CLIENT
    return root, children


def names(spans: Sequence[ReadableSpan]) -> list[str]:
    return [s.name for s in spans]


def codes(spans: Sequence[ReadableSpan]) -> list[Any]:
    return [(s.attributes or {}).get("smtp.reply.code") for s in spans]


def all_span_text(exporter: InMemorySpanExporter) -> str:
    parts: list[str] = []
    for span in exporter.get_finished_spans():
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        parts.append(span.status.description or "")
        for event in span.events:
            parts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    return "\n".join(parts)


def exception_text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen} {seen.args!r}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# -- a mail, intact ----------------------------------------------------------------------------


def test_a_rich_mail_arrives_intact(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer
) -> None:
    pdf = b"%PDF-1.4\n\x00\xff\r\n.\r\n..leading dots\r\n"
    request = MailRequest.model_validate(
        {
            "from": "Zoë Ada <ada@example.com>",
            "to": ["Bob <bob@example.com>"],
            "cc": ["carol@example.org"],
            "bcc": ["hidden@example.net"],
            "reply_to": "support@example.com",
            "subject": "Grüße — 東京 report",
            "text": "Hallo Bob,\n.\n..a line with dots\nünïcödé ✓\n",
            "html": "<p>Hallo <b>Bob</b> ✓</p>",
            "headers": {"X-Campaign": "spring-ü", "X-Tenant": "acme"},
            "attachments": [
                {
                    "filename": "report.pdf",
                    "content_type": "application/pdf",
                    "content": base64.b64encode(pdf).decode(),
                },
            ],
        }
    )
    mail = QueuedMail.accept(request)
    mail_from, recipients = envelope(mail)
    with (
        SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender,
        tracer.start_as_current_span("mail deliver") as span,
    ):
        ctx = span.get_span_context()
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
        data = message_bytes(
            build_message(mail, message_id_domain="mailpipe.test", traceparent=traceparent)
        )
        receipt = sender.send(mail_from=mail_from, recipients=recipients, message=data)

    assert receipt.reply_code == 250
    assert receipt.accepted == ("bob@example.com", "carol@example.org", "hidden@example.net")
    [received] = smtp_server.wait_for(1)
    assert received.mail_from == "ada@example.com"
    assert received.recipients == ("bob@example.com", "carol@example.org", "hidden@example.net")
    assert received.raw.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
    msg = received.message
    assert msg["Subject"] == "Grüße — 東京 report"
    assert msg["From"] == "Zoë Ada <ada@example.com>"
    assert msg["To"] == "Bob <bob@example.com>"
    assert msg["Cc"] == "carol@example.org"
    assert msg["Reply-To"] == "support@example.com"
    assert "Bcc" not in msg and b"hidden@example.net" not in received.raw
    assert msg["Message-ID"] == f"<{mail.mail_id}@mailpipe.test>"
    assert msg["traceparent"] == traceparent
    assert parsedate_to_datetime(msg["Date"]) == mail.accepted_at.replace(microsecond=0)
    assert msg["X-Campaign"] == "spring-ü" and msg["X-Tenant"] == "acme"
    assert msg.get_content_type() == "multipart/mixed"
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == request.text
    assert html.get_content().strip() == request.html
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_payload(decode=True) == pdf


# -- spans -------------------------------------------------------------------------------------


def test_spans_of_a_plain_send(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    sender = SmtpSender(smtp_config(smtp_server), tracer=tracer, address_style="domain")
    result, trace_id = traced_send(
        sender, tracer, recipients=["bob@example.com", "carol@example.org"]
    )
    assert isinstance(result, SmtpReceipt)
    root, steps = trace_spans(spans, trace_id)
    assert names(steps) == [
        "smtp connect",
        "smtp ehlo",
        "smtp mail from",
        "smtp rcpt to",
        "smtp rcpt to",
        "smtp data",
    ]
    assert codes(steps) == [220, 250, 250, 250, 250, 250]
    for step in steps:
        assert step.attributes is not None
        assert step.attributes["server.address"] == "127.0.0.1"
        assert step.attributes["server.port"] == smtp_server.port
        assert step.status.status_code is StatusCode.UNSET
    assert steps[2].attributes["smtp.reply.enhanced_status"] == "2.1.0"  # type: ignore[index]
    assert steps[5].attributes["smtp.reply.enhanced_status"] == "2.0.0"  # type: ignore[index]
    assert [s.attributes["smtp.recipient"] for s in steps[3:5]] == [  # type: ignore[index]
        "@example.com",
        "@example.org",
    ]
    assert root.attributes is not None and root.attributes["smtp.connection.reused"] is False

    spans.clear()
    sender.close()
    [quit_span] = [s for s in spans.get_finished_spans() if s.name == "smtp quit"]
    assert codes([quit_span]) == [221]
    smtp_server.wait_for_connections(0)


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("full", "Bob.Smith@Example.com"),
        ("domain", "@example.com"),
        ("hashed", redact_address("bob.smith@example.com", "hashed")),
    ],
)
def test_recipient_on_spans_only_as_configured(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
    style: Any,
    expected: str,
) -> None:
    with SmtpSender(smtp_config(smtp_server), tracer=tracer, address_style=style) as sender:
        _, trace_id = traced_send(sender, tracer, recipients=["Bob.Smith@Example.com"])
    _, steps = trace_spans(spans, trace_id)
    [rcpt] = [s for s in steps if s.name == "smtp rcpt to"]
    assert rcpt.attributes is not None and rcpt.attributes["smtp.recipient"] == expected
    if style != "full":
        assert "bob.smith" not in all_span_text(spans).lower()


def test_starttls_and_auth_with_a_verified_certificate(
    tls_certs: TlsCerts, smtp_config: MakeConfig, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    with LocalSmtpServer(
        tls_context=tls_certs.server_context(), auth={"mailer": PASSWORD}
    ) as server:
        config = smtp_config(
            server, username="mailer", password=PASSWORD, ca_file=tls_certs.ca_file
        )
        assert config.tls == "starttls"
        # No injected context: the default one, verifying against MAILPIPE_SMTP_CA_FILE.
        with SmtpSender(config, tracer=tracer) as sender:
            result, trace_id = traced_send(sender, tracer)
        assert isinstance(result, SmtpReceipt)
        [received] = server.wait_for(1)
    assert received.tls and received.login == "mailer"
    _, steps = trace_spans(spans, trace_id)
    assert names(steps) == [
        "smtp connect",
        "smtp ehlo",
        "smtp starttls",
        "smtp ehlo",
        "smtp auth",
        "smtp mail from",
        "smtp rcpt to",
        "smtp data",
    ]
    assert codes(steps) == [220, 250, 220, 250, 235, 250, 250, 250]
    assert steps[4].attributes["smtp.reply.enhanced_status"] == "2.7.0"  # type: ignore[index]
    assert PASSWORD not in all_span_text(spans)


def test_implicit_tls(
    smtp_implicit_tls_server: LocalSmtpServer,
    tls_certs: TlsCerts,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    config = smtp_config(smtp_implicit_tls_server)
    assert config.tls == "implicit"
    with SmtpSender(config, tracer=tracer, ssl_context=tls_certs.client_context()) as sender:
        result, trace_id = traced_send(sender, tracer)
    assert isinstance(result, SmtpReceipt)
    [received] = smtp_implicit_tls_server.wait_for(1)
    assert received.tls
    _, steps = trace_spans(spans, trace_id)
    assert names(steps) == [
        "smtp connect",
        "smtp ehlo",
        "smtp mail from",
        "smtp rcpt to",
        "smtp data",
    ]


# -- TLS refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_an_untrusted_certificate_is_refused_without_plaintext_fallback(
    tls_certs: TlsCerts,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
    mode: str,
) -> None:
    tls = (
        {"tls_context": tls_certs.server_context()}
        if mode == "starttls"
        else {"implicit_tls_context": tls_certs.server_context()}
    )
    with LocalSmtpServer(**tls) as server:
        # The system's CAs do not know the trustme CA: verification must fail.
        with SmtpSender(smtp_config(server), tracer=tracer) as sender:
            result, trace_id = traced_send(sender, tracer)
        assert isinstance(result, SmtpTlsError)
        assert result.step == ("starttls" if mode == "starttls" else "connect")
        assert "certificate" in str(result).lower()
        assert server.messages == []
    _, steps = trace_spans(spans, trace_id)
    assert "smtp mail from" not in names(steps)
    assert steps[-1].status.status_code is StatusCode.ERROR
    assert steps[-1].events[0].name == "exception"


def test_starttls_required_but_not_offered(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    config = smtp_config(smtp_server, tls="starttls")
    with SmtpSender(config, tracer=tracer, ssl_context=None) as sender:
        result, trace_id = traced_send(sender, tracer)
    assert isinstance(result, SmtpTlsError) and isinstance(result, TransientDeliveryError)
    assert result.step == "starttls"
    assert "STARTTLS" in str(result)
    assert smtp_server.messages == []
    _, steps = trace_spans(spans, trace_id)
    assert names(steps) == ["smtp connect", "smtp ehlo", "smtp starttls"]


# -- reply codes -------------------------------------------------------------------------------

STEP_NAMES = {"mail": "mail from", "rcpt": "rcpt to", "data": "data"}


@pytest.mark.parametrize("server_step", ["mail", "rcpt", "data"])
@pytest.mark.parametrize(
    ("code", "text", "error"),
    [
        (421, "4.3.2 service shutting down", SmtpTransientReply),
        (450, "4.2.1 mailbox busy", SmtpTransientReply),
        (451, "4.3.0 try again later", SmtpTransientReply),
        (452, "4.3.1 insufficient storage", SmtpTransientReply),
        (550, "5.1.1 no such user", SmtpPermanentReply),
        (553, "5.1.3 bad address syntax", SmtpPermanentReply),
        (554, "5.7.1 rejected by policy", SmtpPermanentReply),
    ],
)
def test_reply_codes(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
    server_step: Any,
    code: int,
    text: str,
    error: type[DeliveryError],
) -> None:
    smtp_server.fail(server_step, code, text, times=1)
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        result, trace_id = traced_send(sender, tracer)
        assert type(result) is error
        assert isinstance(result, DeliveryError)
        assert result.transient is (code < 500)
        assert result.step == STEP_NAMES[server_step]
        assert result.reply_code == code
        assert result.enhanced_status == text.split(maxsplit=1)[0]
        assert result.server == f"127.0.0.1:{smtp_server.port}"
        assert smtp_server.messages == []
        _, steps = trace_spans(spans, trace_id)
        failed = [s for s in steps if s.status.status_code is StatusCode.ERROR]
        assert names(failed) == [f"smtp {STEP_NAMES[server_step]}"]
        assert codes(failed) == [code]
        # The failed transaction was reset (or the connection closed after 421); a retry works.
        assert ("smtp rset" in names(steps)) is (code != 421)
        retry, _ = traced_send(sender, tracer)
        assert isinstance(retry, SmtpReceipt)
    assert len(smtp_server.wait_for(1)) == 1


@pytest.mark.parametrize(
    ("step", "code", "text"),
    [
        ("connect", 421, "4.3.2 too busy"),
        ("connect", 554, "5.3.2 no service for you"),
        ("ehlo", 550, "5.7.1 not allowed"),
    ],
)
def test_session_refusals_are_transient(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    step: Any,
    code: int,
    text: str,
) -> None:
    # A relay refusing this client is not a reason to bounce the mail: it is retried.
    smtp_server.fail(step, code, text, times=1)
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        result, _ = traced_send(sender, tracer)
    assert isinstance(result, SmtpTransientReply)
    assert (result.step, result.reply_code) == (step, code)


def test_a_wrong_password_is_transient_and_never_shown(
    tls_certs: TlsCerts, smtp_config: MakeConfig, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    with LocalSmtpServer(
        tls_context=tls_certs.server_context(), auth={"mailer": "other"}
    ) as server:
        config = smtp_config(server, username="mailer", password=PASSWORD)
        with SmtpSender(config, tracer=tracer, ssl_context=tls_certs.client_context()) as sender:
            result, trace_id = traced_send(sender, tracer)
    assert isinstance(result, SmtpTransientReply)
    assert (result.step, result.reply_code, result.enhanced_status) == ("auth", 535, "5.7.8")
    assert PASSWORD not in exception_text(result)
    assert PASSWORD not in result.summary()
    assert PASSWORD not in all_span_text(spans)
    assert PASSWORD not in repr(config)
    _, steps = trace_spans(spans, trace_id)
    assert steps[-1].name == "smtp auth" and steps[-1].status.status_code is StatusCode.ERROR


# -- connection faults -------------------------------------------------------------------------


def test_connection_refused_then_accepted_again(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer
) -> None:
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        smtp_server.refuse_connections()
        result, _ = traced_send(sender, tracer)
        assert isinstance(result, SmtpConnectionError)
        assert result.step == "connect"
        smtp_server.accept_connections()
        again, _ = traced_send(sender, tracer)
        assert isinstance(again, SmtpReceipt)
    assert len(smtp_server.wait_for(1)) == 1


@pytest.mark.parametrize("step", ["connect", "ehlo", "mail", "rcpt", "data"])
def test_a_hanging_server_times_out(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer, step: Any
) -> None:
    smtp_server.hang(step, 30.0, times=1)
    with SmtpSender(smtp_config(smtp_server, timeout=0.5), tracer=tracer) as sender:
        result, _ = traced_send(sender, tracer)
        assert isinstance(result, SmtpTimeout)
        assert result.step == {"connect": "connect", "ehlo": "ehlo", **STEP_NAMES}[step]
        # The timed-out connection is not reused: the next mail goes through on a fresh one.
        again, _ = traced_send(sender, tracer)
        assert isinstance(again, SmtpReceipt) and not again.connection_reused
    assert len(smtp_server.wait_for(1)) == 1


def test_connection_dropped_mid_data(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer
) -> None:
    smtp_server.drop_connection("data", times=1)
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        result, _ = traced_send(sender, tracer)
        assert isinstance(result, SmtpConnectionError)
        assert result.step == "data"
        assert smtp_server.messages == []
        again, _ = traced_send(sender, tracer)
        assert isinstance(again, SmtpReceipt) and not again.connection_reused
    assert len(smtp_server.wait_for(1)) == 1


# -- recipients --------------------------------------------------------------------------------


def test_some_recipients_refused_for_good(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    smtp_server.fail("rcpt", 550, "5.1.1 no such user", address="nobody@example.com")
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        result, trace_id = traced_send(
            sender,
            tracer,
            recipients=["bob@example.com", "nobody@example.com", "carol@example.org"],
        )
    assert isinstance(result, SmtpReceipt)
    assert result.accepted == ("bob@example.com", "carol@example.org")
    assert result.refused == {"nobody@example.com": (550, "5.1.1 no such user")}
    [received] = smtp_server.wait_for(1)
    assert received.recipients == ("bob@example.com", "carol@example.org")
    _, steps = trace_spans(spans, trace_id)
    rcpts = [s for s in steps if s.name == "smtp rcpt to"]
    assert [s.status.status_code for s in rcpts] == [
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert codes(rcpts) == [250, 550, 250]


def test_every_recipient_refused_is_a_bounce(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer
) -> None:
    smtp_server.fail("rcpt", 550, "5.1.1 no such user", times=2)
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        result, _ = traced_send(sender, tracer, recipients=["a@example.com", "b@example.com"])
        assert isinstance(result, PermanentDeliveryError)
        assert (result.step, result.reply_code) == ("rcpt to", 550)
        assert smtp_server.messages == []
        # The connection was reset and kept.
        again, _ = traced_send(sender, tracer)
        assert isinstance(again, SmtpReceipt) and again.connection_reused


def test_one_deferred_recipient_defers_the_whole_mail(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    smtp_server.fail("rcpt", 451, "4.3.0 try again", times=3, address="carol@example.org")
    recipients = ["bob@example.com", "carol@example.org"]
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        for _ in range(3):  # as Pub/Sub redelivers
            result, trace_id = traced_send(sender, tracer, recipients=recipients)
            assert isinstance(result, SmtpTransientReply)
            assert (result.step, result.reply_code) == ("rcpt to", 451)
            _, steps = trace_spans(spans, trace_id)
            assert "smtp data" not in names(steps) and steps[-1].name == "smtp rset"
        assert smtp_server.messages == []  # no partial send a retry would duplicate
        result, _ = traced_send(sender, tracer, recipients=recipients)
        assert isinstance(result, SmtpReceipt) and result.connection_reused
    [received] = smtp_server.wait_for(1)
    assert received.recipients == ("bob@example.com", "carol@example.org")


# -- the pool ----------------------------------------------------------------------------------


def test_a_pooled_connection_is_reused(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
) -> None:
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        first, _ = traced_send(sender, tracer)
        second, trace_id = traced_send(sender, tracer)
    assert isinstance(first, SmtpReceipt) and not first.connection_reused
    assert isinstance(second, SmtpReceipt) and second.connection_reused
    root, steps = trace_spans(spans, trace_id)
    assert root.attributes is not None and root.attributes["smtp.connection.reused"] is True
    assert names(steps) == ["smtp mail from", "smtp rcpt to", "smtp data"]
    assert smtp_server.connections_total == 1
    assert len(smtp_server.wait_for(2)) == 2


def test_the_pool_under_concurrency(smtp_server: LocalSmtpServer, smtp_config: MakeConfig) -> None:
    threads, per_thread = 8, 20
    errors: list[BaseException] = []
    sender = SmtpSender(smtp_config(smtp_server, pool_size=2))

    def work(worker: int) -> None:
        try:
            for i in range(per_thread):
                message = SIMPLE.replace(b"Subject: hi", f"Subject: {worker}-{i}".encode())
                sender.send(
                    mail_from="ada@example.com", recipients=["bob@example.com"], message=message
                )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    sender.close()
    assert errors == []
    received = smtp_server.wait_for(threads * per_thread)
    subjects = sorted(m.message["Subject"] for m in received)
    assert subjects == sorted(f"{w}-{i}" for w in range(threads) for i in range(per_thread))
    assert smtp_server.max_open_connections <= 2
    smtp_server.wait_for_connections(0)  # close() sent QUIT on every pooled connection


@pytest.mark.parametrize("how", ["closed while idle", "421 at mail from"])
def test_a_dead_pooled_connection_is_replaced_transparently(
    smtp_server: LocalSmtpServer,
    smtp_config: MakeConfig,
    tracer: trace.Tracer,
    spans: InMemorySpanExporter,
    how: str,
) -> None:
    with SmtpSender(smtp_config(smtp_server), tracer=tracer) as sender:
        first, _ = traced_send(sender, tracer)
        assert isinstance(first, SmtpReceipt)
        if how == "closed while idle":
            smtp_server.close_connections()
        else:
            smtp_server.fail("mail", 421, "4.4.2 idle too long, closing", times=1)
        second, trace_id = traced_send(sender, tracer)
    assert isinstance(second, SmtpReceipt)
    assert not second.connection_reused
    assert len(smtp_server.wait_for(2)) == 2
    _, steps = trace_spans(spans, trace_id)
    assert names(steps) == [
        "smtp mail from",
        "smtp connect",
        "smtp ehlo",
        "smtp mail from",
        "smtp rcpt to",
        "smtp data",
    ]
    assert steps[0].status.status_code is StatusCode.ERROR


def test_a_timeout_on_a_pooled_connection_is_not_retried(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig, tracer: trace.Tracer
) -> None:
    with SmtpSender(smtp_config(smtp_server, timeout=0.5), tracer=tracer) as sender:
        traced_send(sender, tracer)
        smtp_server.hang("mail", 30.0, times=1)
        result, _ = traced_send(sender, tracer)
    assert isinstance(result, SmtpTimeout)
    assert len(smtp_server.wait_for(1)) == 1


def test_the_password_never_leaks(
    tls_certs: TlsCerts, smtp_config: MakeConfig, tracer: trace.Tracer, spans: InMemorySpanExporter
) -> None:
    with LocalSmtpServer(
        tls_context=tls_certs.server_context(), auth={"mailer": PASSWORD}
    ) as server:
        config = smtp_config(server, username="mailer", password=PASSWORD)
        with SmtpSender(config, tracer=tracer, ssl_context=tls_certs.client_context()) as sender:
            ok, _ = traced_send(sender, tracer)
            server.fail("data", 554, f"5.7.1 rejected {PASSWORD}", times=1)  # a relay echoing it
            bounced, _ = traced_send(sender, tracer)
            server.drop_connection("data", times=1)
            dropped, _ = traced_send(sender, tracer)
    assert isinstance(ok, SmtpReceipt)
    assert isinstance(bounced, SmtpPermanentReply)
    assert isinstance(dropped, TransientDeliveryError)
    for error in (bounced, dropped):
        assert PASSWORD not in exception_text(error)  # the chained smtplib error too
        assert PASSWORD not in (error.reply_message or "")
        assert PASSWORD not in error.summary()
    assert PASSWORD not in all_span_text(spans)
    assert "s3cret" not in all_span_text(spans)


def test_send_after_close_is_a_programming_error(
    smtp_server: LocalSmtpServer, smtp_config: MakeConfig
) -> None:
    sender = SmtpSender(smtp_config(smtp_server))
    sender.close()
    with pytest.raises(RuntimeError, match="after close"):
        sender.send(mail_from="a@example.com", recipients=["b@example.com"], message=SIMPLE)
