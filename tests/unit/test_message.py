"""The message and envelope built from a queued mail (no server: parse the bytes back)."""

from __future__ import annotations

import base64
import datetime as dt
import email
import re
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from mailpipe.mail import Attachment, MailRequest, QueuedMail
from subscriber import message as message_module
from subscriber.errors import UndeliverableMail
from subscriber.message import (
    build_message,
    envelope,
    message_bytes,
    message_id,
    requires_smtputf8,
)

ACCEPTED_AT = dt.datetime(2026, 11, 23, 19, 25, 2, tzinfo=dt.UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PDF = b"%PDF-1.4\n\x00\x01\x02\xff binary \r\n.\r\n trailer"


def queued(**fields: object) -> QueuedMail:
    body: dict[str, object] = {"from": "Ada <ada@example.com>", "to": ["bob@example.com"]}
    body.update(fields)
    if "text" not in body and "html" not in body:
        body["text"] = "Hello"
    request = MailRequest.model_validate(body)
    return QueuedMail(
        mail_id="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", accepted_at=ACCEPTED_AT, request=request
    )


def roundtrip(
    mail: QueuedMail, traceparent: str | None = TRACEPARENT
) -> tuple[bytes, EmailMessage]:
    raw = message_bytes(
        build_message(mail, message_id_domain="mail.example.net", traceparent=traceparent)
    )
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def content(part: EmailMessage | None) -> object:
    assert part is not None
    value = part.get_content()
    return value.replace("\r\n", "\n") if isinstance(value, str) else value


def test_headers_a_recipient_sees() -> None:
    mail = queued(
        cc=["Carol <carol@example.org>"],
        bcc=["secret@example.com"],
        reply_to="support@example.com",
        subject="Quarterly report",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:unsub@example.com>"},
    )
    raw, msg = roundtrip(mail)
    assert msg["From"] == "Ada <ada@example.com>"
    assert msg["To"] == "bob@example.com"
    assert msg["Cc"] == "Carol <carol@example.org>"
    assert msg["Reply-To"] == "support@example.com"
    assert msg["Subject"] == "Quarterly report"
    assert msg["Message-ID"] == "<0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b@mail.example.net>"
    assert msg["traceparent"] == TRACEPARENT
    assert msg["MIME-Version"] == "1.0"
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert parsedate_to_datetime(msg["Date"]) == ACCEPTED_AT
    assert "Bcc" not in msg
    assert b"secret@example.com" not in raw


def test_bcc_is_only_in_the_envelope() -> None:
    mail = queued(
        to=["Bob <bob@example.com>"],
        cc=["carol@example.org"],
        bcc=["secret@example.com", "bob@example.com"],
    )
    assert envelope(mail) == (
        "ada@example.com",
        ["bob@example.com", "carol@example.org", "secret@example.com"],
    )


def test_message_id_and_date_are_stable_across_attempts() -> None:
    mail = queued(subject="same mail, built twice")
    _, first = roundtrip(mail, traceparent=None)
    _, second = roundtrip(mail, traceparent=TRACEPARENT)
    assert first["Message-ID"] == second["Message-ID"]
    assert first["Date"] == second["Date"]
    assert "traceparent" not in first


def test_non_ascii_subject_and_body_are_encoded_7bit() -> None:
    mail = queued(
        subject="Grüße aus Köln — 東京",
        text="Hallo Zoë, ça va? 東京\n",
        html="<p>Grüße</p>",
        headers={"X-Note": "naïve"},
    )
    raw, msg = roundtrip(mail)
    assert raw.isascii()
    assert b"=?utf-8?" in raw  # RFC 2047 encoded words
    assert msg["Subject"] == "Grüße aus Köln — 東京"
    assert msg["X-Note"] == "naïve"
    assert content(msg.get_body(("plain",))) == "Hallo Zoë, ça va? 東京\n"
    assert content(msg.get_body(("html",))) == "<p>Grüße</p>\n"
    assert not requires_smtputf8(
        build_message(mail, message_id_domain="x.example", traceparent=None)
    )


def test_lines_end_in_crlf_and_fit_the_smtp_limit() -> None:
    mail = queued(subject="long " * 150, text="x" * 5000, headers={"X-Long": "y " * 400})
    raw, msg = roundtrip(mail)
    lines = raw.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998
    assert content(msg.get_body(("plain",))) == "x" * 5000 + "\n"
    assert msg["Subject"] == "long " * 150


@pytest.mark.parametrize(
    ("fields", "content_type", "parts"),
    [
        ({"text": "plain"}, "text/plain", []),
        ({"html": "<b>html</b>"}, "text/html", []),
        (
            {"text": "plain", "html": "<b>html</b>"},
            "multipart/alternative",
            ["text/plain", "text/html"],
        ),
    ],
)
def test_body_structure(fields: dict[str, str], content_type: str, parts: list[str]) -> None:
    _, msg = roundtrip(queued(**fields))
    assert msg.get_content_type() == content_type
    assert [p.get_content_type() for p in msg.iter_parts()] == parts


def test_attachments_make_multipart_mixed_and_arrive_intact() -> None:
    mail = queued(
        text="see attached",
        html="<p>see attached</p>",
        attachments=[
            {
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(PDF).decode(),
            },
            {
                "filename": "notes ü.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(b"line 1\r\nline 2\r\n").decode(),
            },
        ],
    )
    _, msg = roundtrip(mail)
    assert msg.get_content_type() == "multipart/mixed"
    assert next(msg.iter_parts()).get_content_type() == "multipart/alternative"
    attachments = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content_type()) for a in attachments] == [
        ("report.pdf", "application/pdf"),
        ("notes ü.txt", "text/plain"),
    ]
    assert attachments[0].get_payload(decode=True) == PDF
    assert attachments[1].get_payload(decode=True) == b"line 1\r\nline 2\r\n"
    assert content(msg.get_body(("plain",))) == "see attached\n"


def test_international_domains_are_written_in_ascii() -> None:
    mail = queued(**{"from": "Zoë <zoe@exämple.com>"}, to=["u@bücher.de"])
    raw, msg = roundtrip(mail)
    assert envelope(mail) == ("zoe@xn--exmple-cua.com", ["u@xn--bcher-kva.de"])
    assert msg["To"] == "u@xn--bcher-kva.de"
    assert msg["From"].addresses[0].display_name == "Zoë"
    assert msg["From"].addresses[0].addr_spec == "zoe@xn--exmple-cua.com"
    assert raw.isascii()


@pytest.mark.parametrize("domain", ["", "bad domain", "x.example\r\nBcc: a@b", "a..b"])
def test_an_invalid_message_id_domain_is_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="MAILPIPE_MESSAGE_ID_DOMAIN"):
        message_id("id", domain)


def test_the_cached_header_registry_writes_what_the_standard_one_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # subscriber.message caches header classes for speed; the bytes on the wire must not change.
    mail = queued(
        **{"from": "Zoë Ünal <zoe@exämple.com>"},
        to=["Bob, Jr. <bob@example.com>", "u@bücher.de"],
        cc=["Carol <carol@example.org>"],
        reply_to="support@example.com",
        subject="Grüße — a long subject that has to be folded " * 3,
        text="Hallo Zoë\n",
        html="<p>Hallo</p>",
        headers={"X-Note": "naïve", "X-Campaign-Id": "c-42"},
        attachments=[
            {
                "filename": "notes ü.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(b"line 1\r\n").decode(),
            }
        ],
    )
    cached, _ = roundtrip(mail)
    monkeypatch.setattr(message_module, "SMTP_7BIT", policy.SMTP.clone(cte_type="7bit"))
    standard, _ = roundtrip(mail)
    random_boundary = re.compile(rb"={15}\d+==")
    assert random_boundary.sub(b"B", cached) == random_boundary.sub(b"B", standard)


@pytest.mark.parametrize("mail_id", ["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "x" * 120, 'a."b'])
@pytest.mark.parametrize(
    "accepted_at",
    [ACCEPTED_AT, dt.datetime(2026, 1, 2, 3, 4, 5, 678, dt.timezone(-dt.timedelta(hours=5.5)))],
)
def test_date_message_id_and_traceparent_are_written_as_the_email_package_writes_them(
    mail_id: str, accepted_at: dt.datetime
) -> None:
    # subscriber.message writes its own one-line headers without the package's parse and refold.
    mail = queued().model_copy(update={"mail_id": mail_id, "accepted_at": accepted_at})
    raw, _ = roundtrip(mail)
    standard = policy.SMTP.clone(cte_type="7bit")
    own = {
        "Date": format_datetime(accepted_at),
        "Message-ID": f"<{mail_id}@mail.example.net>",
        "traceparent": TRACEPARENT,
    }
    for name, value in own.items():
        assert standard.fold_binary(name, standard.header_factory(name, value)) in raw


def addresses(msg: EmailMessage, name: str) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for a in msg[name].addresses]


def test_encoded_words_in_display_names_and_subject_reach_the_reader_as_text() -> None:
    """Issue 16: what the client wrote is what a reader sees; nothing is decoded into headers."""
    spoof = "=?utf-8?q?ceo=40bank.example_=3Cceo=40bank.example=3E?="
    injection = "=?utf-8?q?Invoice=0D=0AReply-To:_evil=40attacker.example?="
    mail = queued(
        **{"from": f"{spoof} <ada@example.com>"},
        to=[{"name": "=?utf-8?b?YUBldmlsLmV4YW1wbGUsIGJAZXZpbC5leGFtcGxl?=", "address": "b@x.org"}],
        subject=injection,
        headers={"X-Note": "=?utf-8?q?a=0ABcc:_x=40evil.example?="},
    )
    raw, msg = roundtrip(mail)

    assert addresses(msg, "From") == [(spoof, "ada@example.com")]
    assert addresses(msg, "To") == [
        ("=?utf-8?b?YUBldmlsLmV4YW1wbGUsIGJAZXZpbC5leGFtcGxl?=", "b@x.org")
    ]
    assert msg["Subject"] == injection
    assert msg["X-Note"] == "=?utf-8?q?a=0ABcc:_x=40evil.example?="
    assert "Reply-To" not in msg and "Bcc" not in msg
    assert raw.isascii()


@pytest.mark.parametrize(
    "name",
    [
        'Bob "The Builder", Jr. <b@evil.example>; \\ (x)',
        "Zoë Ünal",
        "東京 =?utf-8?q?x?= Smith",
        "Jürgen Müller-Lüdenscheidt, Customer Success Manager EMEA",
        "株式会社東京海上日動火災保険カスタマーセンター営業部門",  # one long encoded word
    ],
)
def test_display_names_read_back_exactly(name: str) -> None:
    _, msg = roundtrip(queued(to=[{"name": name, "address": "bob@example.com"}]))
    assert addresses(msg, "To") == [(name, "bob@example.com")]


@pytest.mark.parametrize("subject", ["  leading and trailing  ", "tab\there", "a" * 990, "ü" * 500])
def test_subjects_read_back_exactly_and_fit_the_line_limit(subject: str) -> None:
    raw, msg = roundtrip(queued(subject=subject))
    assert msg["Subject"] == subject
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_a_non_ascii_local_part_anywhere_in_the_headers_needs_smtputf8() -> None:
    mail = queued(reply_to="zoë@example.org")
    msg = build_message(mail, message_id_domain="x.example", traceparent=None)

    assert requires_smtputf8(msg)
    assert envelope(mail) == ("ada@example.com", ["bob@example.com"])  # the envelope is ASCII
    parsed = email.message_from_bytes(message_bytes(msg), policy=policy.default)
    [address] = parsed["Reply-To"].addresses
    assert address.addr_spec.encode("utf-8", "surrogateescape").decode() == "zoë@example.org"


def test_a_mail_that_cannot_be_built_is_undeliverable_at_the_build_step() -> None:
    # A request no validation would let through (as a future bug might): the email package's
    # error is translated, so the delivery core bounces the mail instead of crashing.
    good = queued()
    attachment = Attachment(filename="report", content="eA==")
    container = attachment.model_copy(update={"content_type": "message/delivery-status"})
    bad = good.model_copy(
        update={"request": good.request.model_copy(update={"attachments": [container]})}
    )

    with pytest.raises(UndeliverableMail) as caught:
        message_bytes(build_message(bad, message_id_domain="x.example", traceparent=None))

    assert caught.value.step == "build"
    assert not caught.value.transient
