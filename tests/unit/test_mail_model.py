"""The mail model: mailboxes parsed once, header text checked once, the Pub/Sub schema versions.

No server: what ``POST /v1/messages`` answers is the ValidationError's fields (the publisher turns
each ``loc`` into the dotted field name of its 400), what the subscriber decodes is
``QueuedMail.from_pubsub``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from pydantic import ValidationError

from mailpipe.config import ConfigError
from mailpipe.mail import (
    MAX_DISPLAY_NAME_CHARS,
    SCHEMA_VERSION,
    Mailbox,
    MailDecodeError,
    MailRequest,
    QueuedMail,
    UnsendableMail,
)
from publisher.config import PublisherConfig

BASE: dict[str, Any] = {"from": "ada@example.com", "to": ["bob@example.org"], "text": "hi"}
LINE_BOUNDARIES = ["\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def request(**fields: Any) -> MailRequest:
    return MailRequest.model_validate({**BASE, **fields})


def refused(**fields: Any) -> dict[str, str]:
    """The fields a 400 would name, with their messages."""
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    return {
        ".".join(str(p) for p in e["loc"]): e["msg"].removeprefix("Value error, ")
        for e in caught.value.errors()
    }


@pytest.mark.parametrize(
    ("text", "name", "address"),
    [
        ("ada@example.com", "", "ada@example.com"),
        ("  Ada Lovelace   <ada@example.com> ", "Ada Lovelace", "ada@example.com"),
        ('"Lovelace, Ada" <ada@example.com>', "Lovelace, Ada", "ada@example.com"),
        ('"Bob \\"The\\" <Builder>" <bob@example.com>', 'Bob "The" <Builder>', "bob@example.com"),
        ('"back\\\\slash" <b@example.com>', "back\\slash", "b@example.com"),
        (
            "=?utf-8?q?ceo=40bank.example?= <ceo@example.com>",
            "=?utf-8?q?ceo=40bank.example?=",
            "ceo@example.com",
        ),
        ("Zoë  \t Ünal <zoë@Bücher.DE>", "Zoë Ünal", "zoë@bücher.de"),
        ("<ada@example.com>", "", "ada@example.com"),
    ],
)
def test_the_text_form_of_a_mailbox_is_parsed_once_into_its_parts(
    text: str, name: str, address: str
) -> None:
    assert request(to=[text]).to == [Mailbox(name=name, address=address)]


def test_the_object_form_carries_any_display_name() -> None:
    parsed = request(
        **{"from": {"name": ' "Eve" <eve@evil.example>, ', "address": "a@example.com"}}
    )
    assert parsed.from_ == Mailbox(name='"Eve" <eve@evil.example>,', address="a@example.com")


@pytest.mark.parametrize(
    ("mailbox", "field", "says"),
    [
        ('Bob "B" Smith <b@example.com>', "to.0", "quote the name"),
        ("Bob <x> <b@example.com>", "to.0", "quote the name"),
        ('"Bob <b@example.com>', "to.0", "no closing"),
        ('"a"b" <b@example.com>', "to.0", "escape it"),
        ("b@example.com>", "to.0", "'>' without '<'"),
        ("Bob <b@example.com", "to.0", "not a valid mailbox"),
        ('"Ada" <ada@example.com>, eve@evil.example', "to.0", "not a valid"),
        ("=?utf-8?q?eve?=@example.com", "to.0", "encoded word"),
        ({"name": "Ada", "address": "a=?b?=@example.com"}, "to.0.address", "encoded word"),
        ({"name": "Ada", "address": "Ada <ada@example.com>"}, "to.0.address", "not a valid"),
        ({"name": "x" * (MAX_DISPLAY_NAME_CHARS + 1), "address": "a@b.com"}, "to.0.name", "longer"),
        ({"address": "a@b.com", "email": "x"}, "to.0.email", "Extra inputs"),
        (42, "to.0", "must be a string"),
    ],
)
def test_a_malformed_mailbox_is_refused_naming_it(mailbox: Any, field: str, says: str) -> None:
    problems = refused(to=[mailbox])
    assert says in problems[field], problems


@pytest.mark.parametrize("boundary", [*LINE_BOUNDARIES, "\x00", "\x1b", "\x7f", "\x9b"])
def test_control_characters_and_line_boundaries_are_refused_in_every_header_field(
    boundary: str,
) -> None:
    attachment = {"filename": f"a{boundary}.pdf", "content": "eA=="}
    problems = refused(
        **{"from": f"Ada{boundary} <ada@example.com>"},
        to=[{"name": f"Bob{boundary}", "address": "bob@example.org"}],
        cc=[f"carol{boundary}@example.org"],
        reply_to=f"{boundary}support@example.com",
        subject=f"Hello{boundary}Bcc: x@evil.example",
        headers={"X-Note": f"a{boundary}b"},
        attachments=[attachment],
    )
    assert set(problems) == {
        "from",
        "to.0.name",
        "cc.0",
        "reply_to.0",
        "subject",
        "headers.X-Note",
        "attachments.0.filename",
    }
    assert all("header injection" in why for why in problems.values()), problems


def test_encoded_words_are_accepted_where_they_are_encoded_and_refused_in_file_names() -> None:
    word = "=?utf-8?b?RXZl?="
    accepted = request(subject=word, headers={"X-Note": word}, to=[f"{word} <b@example.org>"])
    assert (accepted.subject, accepted.headers["X-Note"], accepted.to[0].name) == (word,) * 3
    attachment = {"filename": f"{word}.pdf", "content": "eA=="}
    assert "encoded word" in refused(attachments=[attachment])["attachments.0.filename"]


@pytest.mark.parametrize("filename", ["<>", "<report.pdf>", '"report.pdf"', " <a> "])
def test_file_names_a_reader_would_unwrap_are_refused(filename: str) -> None:
    # Python's email (email.utils.unquote) reads filename="<a>" as "a": refused, not mis-shown.
    attachment = {"filename": filename, "content": "eA=="}
    assert "mail programs strip them" in refused(attachments=[attachment])["attachments.0.filename"]


def test_file_names_with_one_bracket_or_quote_inside_are_kept() -> None:
    names = ["<a", "a>", 'a"b', "r<1>.pdf"]
    attachments = [{"filename": name, "content": "eA=="} for name in names]
    assert [a.filename for a in request(attachments=attachments).attachments] == names


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"X-Campaign": "a", "x-campaign": "b"}, "same header"),
        ({"orig-date": "yesterday"}, "set by mailpipe"),
        ({"Resent-Date": "x"}, "set by mailpipe"),
        ({"Resent-Message-ID": "<x@y>"}, "set by mailpipe"),
        ({"REPLY-TO": "eve@evil.example"}, "set by mailpipe"),
        ({"X Bad": "x"}, "not a valid RFC 5322 field name"),
    ],
)
def test_header_names_are_unique_ignoring_case_and_not_reserved(
    headers: dict[str, str], says: str
) -> None:
    assert says in refused(headers=headers)["headers"]


@pytest.mark.parametrize(
    "content_type", ["multipart/mixed", "message/rfc822", "Message/Delivery-Status"]
)
def test_container_types_cannot_be_attachments(content_type: str) -> None:
    attachment = {"filename": "a", "content_type": content_type, "content": "eA=="}
    assert "leaf type" in refused(attachments=[attachment])["attachments.0.content_type"]


def test_lone_surrogates_are_refused_where_json_would_carry_them() -> None:
    problems = refused(text="a\ud800", html="\udfff", metadata={"k": "v\ud800"})
    assert set(problems) == {"text", "html", "metadata"}
    assert "lone surrogate" in problems["text"]


V1 = {
    "schema_version": 1,
    "mail_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "accepted_at": "2026-11-23T19:25:02Z",
    "request": {
        "from": '"Lovelace, Ada \\"Countess\\"" <ada@example.com>',
        "to": ["Bob <bob@example.org>", "carol@example.org"],
        "cc": [],
        "bcc": ["secret@example.org"],
        "reply_to": ["support@example.com"],
        "subject": "Grüße",
        "text": "hello",
        "html": None,
        "headers": {"X-Campaign": "spring"},
        "attachments": [],
        "idempotency_key": None,
        "metadata": {},
    },
}


def test_a_schema_1_mail_in_flight_decodes_to_the_same_mailboxes() -> None:
    mail = QueuedMail.from_pubsub(json.dumps(V1).encode(), {"schema_version": "1"})

    assert mail.request.from_ == Mailbox(name='Lovelace, Ada "Countess"', address="ada@example.com")
    assert mail.request.to == [
        Mailbox(name="Bob", address="bob@example.org"),
        Mailbox(address="carol@example.org"),
    ]
    assert mail.request.recipients == ["bob@example.org", "carol@example.org", "secret@example.org"]


def test_schema_2_carries_mailboxes_as_objects() -> None:
    mail = QueuedMail.accept(request(to=["Bob <bob@example.org>"]))
    data, attributes = mail.to_pubsub()

    assert attributes["schema_version"] == str(SCHEMA_VERSION) == "2"
    assert json.loads(data)["request"]["to"] == [{"name": "Bob", "address": "bob@example.org"}]
    assert QueuedMail.from_pubsub(data, attributes) == mail


def test_a_mail_this_version_refuses_is_unsendable_with_its_id_and_reason() -> None:
    old = {**V1, "request": {**V1["request"], "subject": "Hi\u2028Bcc: x@evil.example"}}

    with pytest.raises(UnsendableMail) as caught:
        QueuedMail.from_pubsub(json.dumps(old).encode(), {"schema_version": "1"})

    assert caught.value.mail_id == V1["mail_id"]
    assert caught.value.accepted_at == dt.datetime(2026, 11, 23, 19, 25, 2, tzinfo=dt.UTC)
    assert caught.value.reason.startswith("request.subject: must not contain control characters")
    assert "x@evil.example" not in str(caught.value)  # no input values in the record


@pytest.mark.parametrize(
    ("data", "attributes"),
    [
        (b"not json", {}),
        (json.dumps({"to": ["a@b.com"]}).encode(), {}),
        (json.dumps(V1).encode(), {"schema_version": "3"}),
    ],
)
def test_what_is_not_a_mailpipe_mail_stays_undecodable(
    data: bytes, attributes: dict[str, str]
) -> None:
    with pytest.raises(MailDecodeError) as caught:
        QueuedMail.from_pubsub(data, attributes)
    assert not isinstance(caught.value, UnsendableMail)


def test_allowed_sender_domains_are_read_in_ascii_and_compared_so() -> None:
    config = PublisherConfig.from_env(
        {"MAILPIPE_ALLOWED_SENDER_DOMAINS": " Example.com ,bücher.de"}
    )

    assert config.allowed_sender_domains == frozenset({"example.com", "xn--bcher-kva.de"})
    assert config.sender_allowed("EXAMPLE.COM")
    assert config.sender_allowed("bücher.de") and config.sender_allowed("xn--bcher-kva.de")
    assert not config.sender_allowed("mail.example.com")
    assert PublisherConfig.from_env({}).allowed_sender_domains is None
    assert PublisherConfig.from_env({}).sender_allowed("anything.example")


@pytest.mark.parametrize(
    "value", ["example.com,,example.org", "*.example.com", "exa mple.com", "a@b.com"]
)
def test_a_bad_allowed_sender_domains_value_fails_fast(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PublisherConfig.from_env({"MAILPIPE_ALLOWED_SENDER_DOMAINS": value, "PORT": "0"})
    assert set(caught.value.problems) == {"MAILPIPE_ALLOWED_SENDER_DOMAINS", "PORT"}
    assert "not a domain" in caught.value.problems["MAILPIPE_ALLOWED_SENDER_DOMAINS"]
