"""Every header-bound field survives the trip request → Pub/Sub data → built message → parser.

For every request the API's model accepts, the message the subscriber builds, parsed back the
way a receiving program reads it (``BytesParser(policy=email.policy.default)``), names exactly
the requested From/To/Cc/Reply-To addresses and display names, carries the same Subject, custom
header values and attachment file names, and has the same set of header names: nothing added,
split off or lost. Every accepted request can be built.

The generators aim at what the ``email`` package would decode, split or fold into another
meaning: RFC 2047 encoded words (Q and B, any case, carrying addresses, quotes and line breaks),
every ``str.splitlines()`` boundary, quotes, commas, backslashes, semicolons, angle brackets,
non-ASCII text, IDN domains and non-ASCII local parts. No ``@example`` is needed: run against
the code before issue 16, these tests find the spoofed From, the injected Reply-To and the
unbuildable mails by themselves.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections import Counter
from email import base64mime, quoprimime
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import idna
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mailpipe.mail import MailRequest, QueuedMail
from subscriber.message import build_message, message_bytes

ACCEPTED_AT = dt.datetime(2026, 11, 23, 19, 25, 2, tzinfo=dt.UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# Enough examples to find the encoded-word and line-boundary cases without help (each one is a
# build and a parse, about a millisecond): measured against the code before the fix.
ROUND_TRIP = settings(
    max_examples=1500,
    deadline=None,  # the machine is shared: no timing assertions
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every boundary str.splitlines() knows, and the other controls.
LINE_BOUNDARIES = (
    "\n",
    "\r",
    "\r\n",
    "\v",
    "\f",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
)
CONTROLS = ("\x00", "\x01", "\x08", "\x1b", "\x1f", "\x7f", "\x9b")
PUNCTUATION = ('"', ",", "\\", ";", "<", ">", "(", ")", ":", "@", ".", "[", "]", "'", "?", "=")
WORDS = ("Ada", "Lovelace", "Zoë", "Ünal", "東京", "Bob,", "Jr.", "O'Brien", "日本語", "x", "=?")
# What an attacker hides inside an encoded word.
HIDDEN = (
    "evil@attacker.example",
    "<evil@attacker.example>",
    "Eve <evil@attacker.example>",
    ", evil@attacker.example",
    "\r\nReply-To: evil@attacker.example",
    "\nBcc: hidden@attacker.example",
    'a "quoted" word',
    "=?utf-8?q?nested?=",
    "Zoë",
)


def encoded_word(text: str, encoding: str, upper: bool) -> str:
    data = text.encode("utf-8")
    if encoding == "b":
        word = base64mime.header_encode(data, "utf-8")
    else:
        word = quoprimime.header_encode(data, "utf-8")
    return (
        word.replace("=?utf-8?b?", "=?UTF-8?B?").replace("=?utf-8?q?", "=?UTF-8?Q?")
        if upper
        else word
    )


encoded_words = st.builds(
    encoded_word,
    st.sampled_from(HIDDEN) | st.text(max_size=8),
    st.sampled_from("bq"),
    st.booleans(),
)
printable = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))


def text(*, hostile: bool, max_pieces: int = 8) -> st.SearchStrategy[str]:
    """Header text: words, punctuation, spaces, encoded words; with hostile, also line breaks."""
    pieces = [
        st.sampled_from(WORDS),
        st.sampled_from(PUNCTUATION),
        st.sampled_from((" ", "  ", "\t")),
        encoded_words,
        st.text(alphabet=printable, max_size=6),
    ]
    if hostile:
        pieces += [st.sampled_from(LINE_BOUNDARIES), st.sampled_from(CONTROLS), st.text(max_size=4)]
    return st.lists(st.one_of(pieces), max_size=max_pieces).map("".join)


local_parts = st.sampled_from(
    ("ada", "bob.smith", "o'brien", "a+tag", "Ada", "x_y", "zoë", "用户", "üser", "a=b", "q?x")
) | st.from_regex(r"\A[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}\Z")
hostile_local_parts = local_parts | st.sampled_from(
    ("=?utf-8?q?evil=40attacker.example?=", "a=?b?=", "=?x?q?y?=")
)
domains = st.sampled_from(
    (
        "example.com",
        "example.org",
        "Example.NET",
        "bücher.de",
        "例え.jp",
        "münchen.de",
        "xn--bcher-kva.de",
    )
)


def ascii_domain(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii")


def render(name: str, local: str, domain: str, style: str) -> Any:
    """The mailbox as a client sends it: bare, ``Name <a@b>``, quoted name, or an object."""
    address = f"{local}@{domain}"
    if style == "bare":
        return address
    if style == "object":
        return {"name": name, "address": address}
    if style == "angle" and not any(c in name for c in '"<>'):
        return f"{name} <{address}>"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


def expected(name: str, local: str, domain: str, style: str) -> tuple[str, str]:
    """(display name, addr-spec) the recipient must see: the domain in ASCII, the name exact
    but for its blanks: each run of spaces and tabs is one space, none around it (documented)."""
    shown = "" if style == "bare" else re.sub("[ \t]+", " ", name).strip(" ")
    return shown, f"{local}@{ascii_domain(domain).lower()}"


@st.composite
def mailboxes(draw: st.DrawFn, *, hostile: bool) -> tuple[Any, tuple[str, str]]:
    if hostile:
        name = draw(text(hostile=True))
    else:  # display names are at most 128 characters
        name = draw(text(hostile=False, max_pieces=4).filter(lambda n: len(n.strip(" \t")) <= 128))
    local = draw(hostile_local_parts if hostile else local_parts)
    domain = draw(domains)
    style = draw(st.sampled_from(("bare", "angle", "quoted", "object")))
    return render(name, local, domain, style), expected(name, local, domain, style)


header_names = st.sampled_from(
    (
        "X-Campaign",
        "x-campaign",
        "X-Tag",
        "Keywords",
        "Comments",
        "In-Reply-To",
        "References",
        "List-Id",
        "Content-Language",
        "Orig-Date",
        "Resent-Date",
    )
) | st.from_regex(r"\AX-[A-Za-z0-9-]{1,12}\Z")
content_types = st.sampled_from(
    ("application/pdf", "text/plain", "multipart/mixed", "message/delivery-status", "image/png")
)


@st.composite
def requests(draw: st.DrawFn, *, hostile: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request body and what the recipient must see if it is accepted."""
    sender = draw(mailboxes(hostile=hostile))
    to = draw(st.lists(mailboxes(hostile=hostile), min_size=1, max_size=3))
    cc = draw(st.lists(mailboxes(hostile=hostile), max_size=2))
    reply_to = draw(st.lists(mailboxes(hostile=hostile), max_size=2))
    headers = draw(st.dictionaries(header_names, text(hostile=hostile), max_size=3))
    if not hostile:  # names that repeat ignoring case, and reserved ones, are refused
        unique = {k.lower(): k for k in headers if k.lower() not in ("orig-date", "resent-date")}
        headers = {k: headers[k] for k in unique.values()}
    body: dict[str, Any] = {
        "from": sender[0],
        "to": [m[0] for m in to],
        "subject": draw(text(hostile=hostile, max_pieces=12)),
        "text": draw(st.text(max_size=30)) if hostile else "Hello\n",
    }
    if cc:
        body["cc"] = [m[0] for m in cc]
    if reply_to:
        body["reply_to"] = [m[0] for m in reply_to]
    if headers:
        body["headers"] = headers
    attachments = draw(
        st.lists(st.tuples(text(hostile=hostile, max_pieces=4), content_types), max_size=1)
    )
    if not hostile:
        attachments = [
            (f.strip(" \t") or "file", "application/pdf") for f, _ in attachments if "=?" not in f
        ]
    if attachments:
        body["attachments"] = [
            {"filename": f, "content_type": c, "content": base64.b64encode(b"\x00data").decode()}
            for f, c in attachments
        ]
    want = {
        "from": [sender[1]],
        "to": [m[1] for m in to],
        "cc": [m[1] for m in cc],
        "reply-to": [m[1] for m in reply_to],
        "subject": body["subject"],
        "headers": headers,
        "filenames": [f.strip(" \t") for f, _ in attachments],
    }
    return body, want


def built(request: MailRequest) -> bytes:
    """The bytes the subscriber sends, after the mail crossed Pub/Sub as JSON."""
    queued = QueuedMail(
        mail_id="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", accepted_at=ACCEPTED_AT, request=request
    )
    data, attributes = queued.to_pubsub()
    received = QueuedMail.from_pubsub(data, attributes)
    return message_bytes(
        build_message(received, message_id_domain="mail.example.net", traceparent=TRACEPARENT)
    )


def _utf8(text: str) -> str:
    # The parser keeps a UTF-8 header's bytes as surrogate escapes (policy.default is not utf8).
    return text.encode("utf-8", "surrogateescape").decode("utf-8")


def mailboxes_in(message: EmailMessage, name: str) -> list[tuple[str, str]]:
    values = message.get_all(name) or []
    return [
        (_utf8(a.display_name), _utf8(a.addr_spec)) for value in values for a in value.addresses
    ]


def lower_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}"


def assert_recipient_sees_the_request(raw: bytes, want: dict[str, Any]) -> None:
    message = BytesParser(policy=email_policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    for name in ("From", "To", "Cc", "Reply-To"):
        found = [(shown, lower_domain(address)) for shown, address in mailboxes_in(message, name)]
        assert found == want[name.lower()], f"{name}: {raw!r}"
    assert str(message["Subject"]) == want["subject"], raw
    for name, value in want["headers"].items():
        assert [str(v) for v in message.get_all(name) or []] == [value], (name, raw)
    names = Counter(k.lower() for k in message)
    for mime in ("mime-version", "content-type", "content-transfer-encoding"):
        names.pop(mime, None)
    wanted_names = Counter(["from", "to", "subject", "date", "message-id", "traceparent"])
    wanted_names.update(k.lower() for k in want["headers"])
    wanted_names.update(n for n in ("cc", "reply-to") if want[n])
    assert names == wanted_names, raw
    filenames = [part.get_filename() for part in message.iter_attachments()]
    assert filenames == want["filenames"], raw


@ROUND_TRIP
@given(case=requests(hostile=True))
def test_every_accepted_request_is_built_and_seen_as_requested(
    case: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    body, want = case
    try:
        request = MailRequest.model_validate(body)
    except ValidationError:
        return  # refused with a 400: nothing is built (the API tests check the answer)
    assert_recipient_sees_the_request(built(request), want)


@settings(ROUND_TRIP, max_examples=600)
@given(case=requests(hostile=False))
def test_header_text_without_control_characters_is_accepted_and_seen_as_requested(
    case: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """Encoded words, quotes, commas, angle brackets, non-ASCII: accepted, and round-tripped."""
    body, want = case
    request = MailRequest.model_validate(body)
    assert_recipient_sees_the_request(built(request), want)
