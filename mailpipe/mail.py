"""The mail: what a client sends (:class:`MailRequest`) and what travels on Pub/Sub.

:class:`QueuedMail` is the request plus the ids the publisher assigned.

The Pub/Sub message is ``data`` = ``QueuedMail`` as JSON, attributes ``mail_id`` and
``schema_version`` (plus ``googclient_traceparent``, added by the client library). Both services
import this module; it is the only contract between them besides the delivery record.

Errors::

    pydantic.ValidationError   a request or a queued mail is invalid (HTTP 400 / dead on arrival)
    MailDecodeError            a Pub/Sub message is not a mailpipe mail of a known schema version
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from email.headerregistry import Address
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from uuid6 import uuid7

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

# Pub/Sub's hard limit is 10,000,000 bytes per publish request; the client library counts the
# request envelope too, so keep a margin for attributes and framing.
MAX_PUBSUB_DATA_BYTES = 9_990_000
MAX_RECIPIENTS = 100
MAX_SUBJECT_CHARS = 998

_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name: printable ASCII but ':'
# Headers mailpipe sets itself, or that change who receives the mail: a client may not set them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Sender",
        "Return-Path",
        "Received",
        "traceparent",
        "tracestate",
        "Resent-To",
        "Resent-Cc",
        "Resent-Bcc",
        "Resent-From",
        "Resent-Sender",
        "DKIM-Signature",
    )
)


class MailDecodeError(ValueError):
    """A Pub/Sub message that is not a decodable mailpipe mail (retrying cannot help)."""


def new_mail_id() -> str:
    """A time-sortable, unique mail id (UUIDv7, canonical text form)."""
    return str(uuid7())


def _no_line_breaks(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("must not contain CR, LF or NUL characters (header injection)")
    return value


def _mailbox(value: Any) -> str:
    """Validate ``addr@example.com`` or ``Name <addr@example.com>``; return it normalised."""
    if not isinstance(value, str):
        raise ValueError("must be a string such as 'Ada <ada@example.com>' or 'ada@example.com'")
    _no_line_breaks(value)
    text = value.strip()
    name = ""
    match = re.fullmatch(r"\s*(?:\"?([^\"<>]*?)\"?\s*)?<([^<>]+)>\s*", text)
    address = text
    if match:
        name, address = (match.group(1) or "").strip(), match.group(2).strip()
    elif "<" in text or ">" in text:
        raise ValueError(
            "is not a valid mailbox: use 'Name <addr@example.com>' or 'addr@example.com'"
        )
    try:
        checked = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid email address: {exc}") from exc
    normalized = checked.normalized
    return str(Address(display_name=name, addr_spec=normalized)) if name else normalized


Mailbox = Annotated[str, BeforeValidator(_mailbox)]
HeaderText = Annotated[str, AfterValidator(_no_line_breaks)]


def addr_spec(mailbox: str) -> str:
    """The bare address of a validated mailbox (``Ada <a@x>`` → ``a@x``)."""
    match = re.search(r"<([^<>]+)>\s*$", mailbox)
    return match.group(1) if match else mailbox


class Attachment(BaseModel):
    """A file attached to the mail; ``content`` is base64 (standard alphabet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: HeaderText = Field(min_length=1, max_length=255)
    content_type: str = Field(
        default="application/octet-stream",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$",
    )
    content: str = Field(description="Base64-encoded bytes")

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("must be valid base64") from exc
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content)


MetadataValue = str | int | float | bool | None


class MailRequest(BaseModel):
    """A request to send one mail, as accepted by ``POST /v1/messages``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    from_: Mailbox = Field(alias="from")
    to: list[Mailbox] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    cc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    reply_to: list[Mailbox] = Field(default_factory=list, max_length=10)
    subject: HeaderText = Field(default="", max_length=MAX_SUBJECT_CHARS)
    text: str | None = None
    html: str | None = None
    headers: dict[str, HeaderText] = Field(default_factory=dict, max_length=50)
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"
    )
    metadata: dict[str, MetadataValue] = Field(default_factory=dict, max_length=50)

    @field_validator("reply_to", mode="before")
    @classmethod
    def _reply_to_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid RFC 5322 field name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by mailpipe or its own field; remove it")
            if len(value) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return headers

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
        seen: dict[str, None] = {}
        for mailbox in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(addr_spec(mailbox), None)
        return list(seen)

    @property
    def recipient_domains(self) -> tuple[str, ...]:
        """The recipients' domains, lower-case and sorted (what the record keeps: no addresses)."""
        return tuple(sorted({r.rsplit("@", 1)[-1].lower() for r in self.recipients}))


class QueuedMail(BaseModel):
    """The mail as published to Pub/Sub: the request plus what the publisher assigned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    mail_id: str
    accepted_at: dt.datetime
    request: MailRequest

    @classmethod
    def accept(cls, request: MailRequest, *, mail_id: str | None = None) -> QueuedMail:
        return cls(
            mail_id=mail_id or new_mail_id(),
            accepted_at=dt.datetime.now(dt.UTC),
            request=request,
        )

    def to_pubsub(self) -> tuple[bytes, dict[str, str]]:
        """``(data, attributes)`` for ``PublisherClient.publish``."""
        data = self.model_dump_json(by_alias=True).encode("utf-8")
        return data, {"mail_id": self.mail_id, "schema_version": str(self.schema_version)}

    @classmethod
    def from_pubsub(cls, data: bytes, attributes: dict[str, str] | None = None) -> QueuedMail:
        """Decode a Pub/Sub message; raise :class:`MailDecodeError` if it is not a known mail."""
        version = (attributes or {}).get("schema_version", str(SCHEMA_VERSION))
        if version not in {str(v) for v in SUPPORTED_SCHEMA_VERSIONS}:
            raise MailDecodeError(f"unsupported schema_version {version!r}")
        try:
            return cls.model_validate_json(data)
        except ValueError as exc:
            raise MailDecodeError(f"message data is not a valid mailpipe mail: {exc}") from exc
