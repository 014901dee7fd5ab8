"""The mail: what a client sends (:class:`MailRequest`) and what travels on Pub/Sub
(:class:`QueuedMail`: the request plus the ids the publisher assigned; ``data`` is its JSON, the
attributes ``mail_id``, ``schema_version`` and ``deliver_by``). Both services validate with this
one model, the subscriber again at its trust boundary; mailboxes are parsed once, here
(:class:`Mailbox`). What header-bound text is refused or encoded and why, and the schema versions
(1: mailboxes as text, 2: as objects): docs/headers.md; why ``deliver_by`` is an attribute:
docs/deliver-by.md.

Errors::

    pydantic.ValidationError   a request or a queued mail is invalid (HTTP 400 / dead on arrival)
    MailDecodeError            a Pub/Sub message is not a mailpipe mail of a known schema version
    └── UnsendableMail         it is a mailpipe mail (its id is readable) that this version
                               refuses, e.g. one published before a rule tightened: bounce it
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import re
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from uuid6 import uuid7

from mailpipe.attributes import PUBSUB_DELIVER_BY, PUBSUB_MAIL_ID, PUBSUB_SCHEMA_VERSION

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})

MAX_RECIPIENTS = 100
MAX_SUBJECT_CHARS = 998
# A display name must fit one header line (998) even as a single encoded word of 4-byte
# characters: 128 * 4 bytes of UTF-8 → 684 characters of base64.
MAX_DISPLAY_NAME_CHARS = 128

_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name: printable ASCII but ':'
# Control characters (but TAB), every str.splitlines() boundary (\n \r \v \f \x1c-\x1e \x85
# \u2028 \u2029) and lone surrogates: the email package splits a header on the former, and the
# latter cannot be encoded at all.
_FORBIDDEN_IN_HEADERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_UNICODE = "is not valid Unicode: lone surrogate"
_BLANKS = re.compile("[ \t]+")
_ESCAPED_CHAR = re.compile(r"\\(.)", re.DOTALL)  # a quoted-pair of RFC 5322
# How an RFC 2047 encoded word starts: the email package decodes one wherever it finds it.
ENCODED_WORD_START = "=?"
# Headers mailpipe sets itself, or that change who receives the mail: a client may not set them.
# Orig-Date is parsed as a date by the email package (a client's text would be dropped or refused).
RESERVED_HEADERS = frozenset(
    """from to cc bcc reply-to subject date message-id mime-version content-type
    content-transfer-encoding content-disposition sender return-path received traceparent
    tracestate dkim-signature orig-date""".split()  # noqa: SIM905 - a word list, lower-case
)
RESERVED_HEADER_PREFIXES = ("resent-",)  # RFC 5322 resent blocks are added by whoever resends


class MailDecodeError(ValueError):
    """A Pub/Sub message that is not a decodable mailpipe mail (retrying cannot help)."""


class UnsendableMail(MailDecodeError):
    """A mailpipe mail this version refuses to build (``reason`` says why): bounce, not retry."""

    def __init__(self, mail_id: str, accepted_at: dt.datetime, reason: str) -> None:
        super().__init__(f"mail {mail_id} cannot be sent: {reason}")
        self.mail_id = mail_id
        self.accepted_at = accepted_at
        self.reason = reason


def _refuse(pattern: re.Pattern[str], value: str, problem: str) -> str:
    """``value``, unless ``pattern`` finds a character in it: then ``problem`` names it."""
    if found := pattern.search(value):
        raise ValueError(f"{problem} U+{ord(found.group()):04X} at position {found.start()}")
    return value


def header_text(value: str) -> str:
    """``value`` if it may go into a header: no control character, line boundary or surrogate."""
    problem = "must not contain control characters or line breaks (header injection): found"
    return _refuse(_FORBIDDEN_IN_HEADERS, value, problem)


def valid_unicode(value: str) -> str:
    """``value`` if it can be encoded as UTF-8 (JSON allows lone surrogates; Pub/Sub does not)."""
    return _refuse(_SURROGATE, value, _NOT_UNICODE)


def display_name(value: str) -> str:
    """A display name as the recipient will see it: each run of spaces and tabs made one space,
    none around it (mail programs, Python's parser among them, show an encoded name so)."""
    name = _BLANKS.sub(" ", header_text(value)).strip(" ")
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        raise ValueError(
            f"display name is longer than {MAX_DISPLAY_NAME_CHARS} characters ({len(name)})"
        )
    return name


@functools.lru_cache(maxsize=4096)  # a pure check, asked again and again for the same senders
def addr_spec(value: str) -> str:
    """A validated, normalised address (``local@domain``; the domain lower-case, IDN as Unicode);
    ``=?`` in the local part is refused: mail programs decode it (docs/headers.md)."""
    header_text(value)
    try:
        checked = validate_email(
            value.strip(" \t"),
            check_deliverability=False,
            allow_smtputf8=True,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
        )
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from exc
    if ENCODED_WORD_START in checked.local_part:
        raise ValueError(
            f"is not a valid email address: its local part contains {ENCODED_WORD_START!r}, "
            "which mail programs decode as an RFC 2047 encoded word"
        )
    return checked.normalized


def _unquote(quoted: str) -> str:
    """The text of an RFC 5322 quoted-string (``"Bob \\"B\\" Smith"`` → ``Bob "B" Smith``)."""
    if len(quoted) < 2 or not quoted.endswith('"'):
        raise ValueError("has a display name with an opening '\"' but no closing one")
    unescaped = _ESCAPED_CHAR.sub("", quoted[1:-1])  # what is left outside the escape pairs
    if '"' in unescaped:
        raise ValueError("has a '\"' inside a quoted display name: escape it as '\\\"'")
    if unescaped.endswith("\\"):
        raise ValueError("has a quoted display name ending in a lone backslash")
    return _ESCAPED_CHAR.sub(r"\1", quoted[1:-1])


def split_mailbox(text: str) -> tuple[str, str]:
    """``(display name, address)`` of ``addr@example.com``, ``Name <addr@example.com>`` or
    ``"Quoted, Name" <addr@example.com>``: the one place mailbox text is parsed."""
    header_text(text)  # before stripping: a line boundary is refused, not trimmed away
    text = text.strip(" \t")
    if not text.endswith(">"):
        if "<" in text or ">" in text:
            raise ValueError(
                "is not a valid mailbox: use 'Name <addr@example.com>' or 'addr@example.com'"
            )
        return "", text
    start = text.rfind("<")
    if start < 0:
        raise ValueError("is not a valid mailbox: '>' without '<'")
    name = text[:start].strip(" \t")
    if name.startswith('"'):
        name = _unquote(name)
    elif any(c in name for c in '"<>'):
        raise ValueError(
            """has '"', '<' or '>' in its display name: quote the name """
            """("Name <x>" <addr@example.com>) or send {"name": ..., "address": ...}"""
        )
    return name, text[start + 1 : -1]


class Mailbox(BaseModel):
    """A mailbox, parsed once at the API: the display name and the address, kept apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, AfterValidator(display_name)] = Field(
        default="",
        description="Display name, shown exactly as given (runs of spaces and tabs become one "
        f"space, none around it); at most {MAX_DISPLAY_NAME_CHARS} characters, no control "
        "characters or line breaks. Any other text is allowed (quotes, commas, '<>', non-ASCII, "
        "even '=?...?='): mailpipe sends it as an RFC 2047 encoded word when it is not plain ASCII",
    )
    address: Annotated[str, AfterValidator(addr_spec)] = Field(
        description="The address (addr-spec). Non-ASCII domains are sent in their ASCII (IDNA) "
        "form; a non-ASCII local part makes the mail need SMTPUTF8. No quoted local parts, no "
        "domain literals, no '=?' in the local part"
    )

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]


def _mailbox_input(value: Any) -> Any:
    """The text form of a mailbox, parsed into a :class:`Mailbox` (errors at the field itself);
    an object is left to Mailbox's own validation (errors at ``.name`` / ``.address``)."""
    if isinstance(value, str):
        name, address = split_mailbox(value)
        return Mailbox.model_construct(name=display_name(name), address=addr_spec(address))
    if not isinstance(value, dict | Mailbox):
        raise ValueError(
            "must be a string such as 'Ada <ada@example.com>' or 'ada@example.com', or an "
            'object {"name": "Ada", "address": "ada@example.com"}'
        )
    return value


MailboxText = Annotated[
    str,
    Field(
        description="'addr@example.com', 'Name <addr@example.com>' or '\"Quoted, Name\" "
        "<addr@example.com>' (a name holding '\"', '<' or '>' must be quoted)"
    ),
]
MailboxField = Annotated[
    Mailbox, BeforeValidator(_mailbox_input, json_schema_input_type=MailboxText | Mailbox)
]
HeaderText = Annotated[str, AfterValidator(header_text)]
UnicodeText = Annotated[str, AfterValidator(valid_unicode)]


class Attachment(BaseModel):
    """A file attached to the mail; ``content`` is base64 (standard alphabet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: HeaderText = Field(
        min_length=1,
        max_length=255,
        description="No control characters, line breaks or '=?' (refused, not encoded); "
        "surrounding spaces are removed",
    )
    content_type: str = Field(
        default="application/octet-stream",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$",
        description="A leaf MIME type: multipart/* and message/* are refused",
    )
    content: str = Field(description="Base64-encoded bytes")

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        # A file name is a MIME parameter: the email package writes ASCII as a quoted string, in
        # which readers (Python's among them) decode encoded words. Refused rather than encoded.
        # Readers drop the spaces around a parameter value: so does the API, visibly.
        if ENCODED_WORD_START in value:
            raise ValueError(
                f"must not contain {ENCODED_WORD_START!r}: mail programs would decode it as an "
                "RFC 2047 encoded word and show something else"
            )
        name = value.strip(" \t")
        if not name:
            raise ValueError("must not be empty or only spaces")
        if len(name) > 1 and (pair := name[0] + name[-1]) in ('""', "<>"):
            # email.utils.unquote, which readers apply to a parameter, strips either pair.
            raise ValueError(f"must not be wrapped in {pair}: mail programs strip them")
        return name

    @field_validator("content_type")
    @classmethod
    def _leaf_type(cls, value: str) -> str:
        if value.split("/", 1)[0].lower() in ("multipart", "message"):
            raise ValueError(
                "must be a leaf type: a multipart/* or message/* attachment cannot be built from "
                "bytes (send a mail as application/octet-stream)"
            )
        return value

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except ValueError as exc:  # binascii.Error too
            raise ValueError("must be valid base64") from exc
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content)


MetadataValue = str | int | float | bool | None


def _time_or_seconds(value: Any) -> Any:
    if value is None or (isinstance(value, str | int) and not isinstance(value, bool)):
        return value
    raise ValueError(
        "must be an RFC 3339 time with an offset (2026-12-01T09:00:00Z) or Unix seconds"
    )


class MailRequest(BaseModel):
    """A request to send one mail, as accepted by ``POST /v1/messages``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    from_: MailboxField = Field(alias="from")
    to: list[MailboxField] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    cc: list[MailboxField] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[MailboxField] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    reply_to: list[MailboxField] = Field(default_factory=list, max_length=10)
    subject: HeaderText = Field(
        default="",
        max_length=MAX_SUBJECT_CHARS,
        description="Sent exactly as given: no control characters or line breaks; text that is "
        "not plain ASCII, or holds '=?', is sent as RFC 2047 encoded words",
    )
    text: UnicodeText | None = None
    html: UnicodeText | None = None
    headers: dict[str, HeaderText] = Field(
        default_factory=dict,
        max_length=50,
        description="Extra headers, sent as unstructured text. Names: RFC 5322 field names, "
        "unique ignoring case, not one mailpipe sets (From, To, Subject, Date, Message-ID, "
        "Content-*, Resent-*, ...). Values: as the subject",
    )
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"
    )
    metadata: dict[UnicodeText, MetadataValue] = Field(default_factory=dict, max_length=50)
    sandbox: StrictBool | None = Field(
        default=None,
        description="true: run everything but end the SMTP transaction after RCPT TO (RSET): the "
        "relay's replies are recorded, status `sandboxed`, nothing is sent. Unset: the caller's "
        "default",
    )
    # Checked by the publisher (publisher/deliver_by.py); QueuedMail.deliver_by carries the time.
    deliver_by: Annotated[str | int | None, BeforeValidator(_time_or_seconds)] = Field(
        default=None,
        exclude=True,
        description="Give up (status expired) if not delivered by then: RFC 3339 with an offset "
        "(2026-12-01T09:00:00Z) or Unix seconds; default and maximum: docs/deliver-by.md",
    )

    @field_validator("reply_to", mode="before")
    @classmethod
    def _reply_to_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | dict) else value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid RFC 5322 field name")
            folded = name.lower()
            if folded in RESERVED_HEADERS or folded.startswith(RESERVED_HEADER_PREFIXES):
                raise ValueError(f"header {name!r} is set by mailpipe or its own field; remove it")
            if (first := seen.setdefault(folded, name)) != name:
                raise ValueError(
                    f"headers {first!r} and {name!r} are the same header (names ignore case): "
                    "send it once"
                )
            if len(value) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return headers

    @field_validator("metadata")
    @classmethod
    def _metadata_text(cls, metadata: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        for key, value in metadata.items():
            if isinstance(value, str):
                _refuse(_SURROGATE, value, f"value of {key!r} {_NOT_UNICODE}")
        return metadata

    @model_validator(mode="after")
    def _has_body_and_recipients(self) -> MailRequest:
        if self.text is None and self.html is None:
            raise ValueError("at least one of 'text' or 'html' is required")
        if len(self.to) + len(self.cc) + len(self.bcc) > MAX_RECIPIENTS:
            raise ValueError(
                f"to, cc and bcc together may name at most {MAX_RECIPIENTS} recipients"
            )
        return self

    @property
    def recipients(self) -> list[str]:
        """Every envelope recipient (to, cc, bcc), bare addresses, de-duplicated, in order."""
        return list(dict.fromkeys(mailbox.address for mailbox in (*self.to, *self.cc, *self.bcc)))

    @property
    def recipient_domains(self) -> tuple[str, ...]:
        """The recipients' domains, lower-case and sorted (what the record keeps: no addresses)."""
        return tuple(sorted({r.rsplit("@", 1)[-1].lower() for r in self.recipients}))


class _MailIdentity(BaseModel):
    """What identifies a queued mail, readable even when its request no longer validates."""

    model_config = ConfigDict(extra="ignore")

    mail_id: str = Field(min_length=1, max_length=200)
    accepted_at: dt.datetime
    request: dict[str, Any]


def _problems(exc: ValidationError) -> str:
    """``"request.subject: must not contain …; request.to.0: …"``: no input values (addresses)."""
    return "; ".join(
        ".".join(str(part) for part in error["loc"])
        + ": "
        + error["msg"].removeprefix("Value error, ")
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    )


class QueuedMail(BaseModel):
    """The mail as published to Pub/Sub: the request plus what the publisher assigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    mail_id: str
    accepted_at: dt.datetime
    request: MailRequest
    deliver_by: dt.datetime | None = Field(default=None, exclude=True)  # an attribute on Pub/Sub

    @classmethod
    def accept(cls, request: MailRequest) -> QueuedMail:
        """``request``, accepted now under a new time-sortable id (UUIDv7, canonical text)."""
        return cls(mail_id=str(uuid7()), accepted_at=dt.datetime.now(dt.UTC), request=request)

    def to_pubsub(self) -> tuple[bytes, dict[str, str]]:
        """``(data, attributes)`` for ``PublisherClient.publish``."""
        # `sandbox` only when on: a subscriber older than the field still decodes every other mail.
        exclude = None if self.request.sandbox else {"request": {"sandbox"}}
        data = self.model_dump_json(by_alias=True, exclude=exclude).encode("utf-8")
        attributes = {PUBSUB_MAIL_ID: self.mail_id, PUBSUB_SCHEMA_VERSION: str(self.schema_version)}
        if self.deliver_by is not None:
            attributes[PUBSUB_DELIVER_BY] = self.deliver_by.isoformat()
        return data, attributes

    @classmethod
    def from_pubsub(cls, data: bytes, attributes: dict[str, str] | None = None) -> QueuedMail:
        """Decode a Pub/Sub message of any supported schema version; :class:`UnsendableMail` for
        a mailpipe mail this version refuses (bounce it), :class:`MailDecodeError` for the rest."""
        attributes = attributes or {}
        version = attributes.get(PUBSUB_SCHEMA_VERSION, str(SCHEMA_VERSION))
        if version not in {str(v) for v in SUPPORTED_SCHEMA_VERSIONS}:
            raise MailDecodeError(f"unsupported schema_version {version!r}")
        try:
            mail = cls.model_validate_json(data)
            if by := attributes.get(PUBSUB_DELIVER_BY):
                mail = mail.model_copy(update={"deliver_by": dt.datetime.fromisoformat(by)})
            return mail
        except ValueError as exc:
            problem = _problems(exc) if isinstance(exc, ValidationError) else str(exc)
            try:
                identity = _MailIdentity.model_validate(json.loads(data))
            except ValueError:
                raise MailDecodeError(
                    f"message data is not a valid mailpipe mail: {problem}"
                ) from exc
            raise UnsendableMail(identity.mail_id, identity.accepted_at, problem) from exc
