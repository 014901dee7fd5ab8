"""Build the RFC 5322 message and the SMTP envelope of a queued mail.

Everything is built with the standard library's :mod:`email` package (``EmailMessage`` and its
policies); no MIME is assembled by hand. The result is stable across retries: ``Date`` comes from
``accepted_at`` and ``Message-ID`` from the mail id, so a relay or a recipient can recognise a
duplicate of the same mail.

Structure of the body::

    text only                 text/plain
    html only                 text/html
    text and html             multipart/alternative (text/plain, text/html)
    with attachments          multipart/mixed (the body above, then one part per attachment)

Internationalised addresses: a non-ASCII *domain* is written in its ASCII (IDNA) form, so a mail
needs ``SMTPUTF8`` only when a *local part* is non-ASCII (:func:`requires_smtputf8`). Non-ASCII
display names, subjects and header values are encoded as RFC 2047 encoded words; bodies are
encoded 7-bit clean (quoted-printable or base64), so no ``8BITMIME`` is needed either.

Errors::

    ValueError    the Message-ID domain is not a valid domain (a configuration error)
"""

from __future__ import annotations

import datetime as dt
import re
from email import policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

from email_validator import EmailNotValidError, validate_email

from mailpipe.mail import QueuedMail, addr_spec


class _CachedHeaderRegistry(HeaderRegistry):
    """The standard header registry, creating each header class once instead of per header.

    ``HeaderRegistry.__getitem__`` builds a new class with ``type()`` on every lookup (CPython
    3.11-3.13), twice per header set: a third of the time it takes to build a message. Keyed by
    the registered class, not the header name: mails may carry any custom header name, so the
    cache stays as small as the registry. Two threads racing to fill it store equivalent classes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type[BaseHeader]] = {}

    def map_to_type(self, name: str, cls: type) -> None:
        super().map_to_type(name, cls)
        self._classes.clear()

    def __getitem__(self, name: str) -> type[BaseHeader]:
        registered = self.registry.get(name.lower(), self.default_class)
        cached = self._classes.get(registered)
        if cached is None:
            cached = self._classes[registered] = super().__getitem__(name)
        return cached


# Bodies are encoded 7-bit clean when they are set, and headers are folded with RFC 2047: the
# message then crosses any relay, whether or not it offers 8BITMIME.
SMTP_7BIT = policy.SMTP.clone(cte_type="7bit", header_factory=_CachedHeaderRegistry())
_ADDRESS_HEADERS = ("From", "Sender", "To", "Cc", "Reply-To")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def ascii_address(address: str) -> str:
    """``a@bücher.de`` → ``a@xn--bcher-kva.de``; unchanged if ASCII or the local part is not."""
    if address.isascii():
        return address
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return address
    return checked.ascii_email or f"{checked.local_part}@{checked.ascii_domain}"


def _header_mailbox(mailbox: str) -> str:
    """A validated mailbox (``Name <a@b>`` or ``a@b``) for a header, with an ASCII domain."""
    name, bare = parseaddr(mailbox)
    address = ascii_address(bare or addr_spec(mailbox))
    return str(Address(display_name=name, addr_spec=address)) if name else address


def message_id(mail_id: str, domain: str) -> str:
    """``<mail_id@domain>``: the same for every attempt of the same mail."""
    if not _DOMAIN.match(domain):
        raise ValueError(
            f"MAILPIPE_MESSAGE_ID_DOMAIN must be a domain such as mail.example.com, got {domain!r}"
        )
    return f"<{mail_id}@{domain}>"


def build_message(
    mail: QueuedMail, *, message_id_domain: str, traceparent: str | None
) -> EmailMessage:
    """The message as the recipients will see it (never a ``Bcc`` header)."""
    request = mail.request
    msg = EmailMessage(policy=SMTP_7BIT)
    msg["From"] = _header_mailbox(request.from_)
    msg["To"] = ", ".join(_header_mailbox(m) for m in request.to)
    if request.cc:
        msg["Cc"] = ", ".join(_header_mailbox(m) for m in request.cc)
    if request.reply_to:
        msg["Reply-To"] = ", ".join(_header_mailbox(m) for m in request.reply_to)
    msg["Subject"] = request.subject
    accepted_at = mail.accepted_at
    if accepted_at.tzinfo is None:  # QueuedMail.accept uses UTC; be explicit for older records
        accepted_at = accepted_at.replace(tzinfo=dt.UTC)
    msg["Date"] = format_datetime(accepted_at)
    msg["Message-ID"] = message_id(mail.mail_id, message_id_domain)
    if traceparent:
        msg["traceparent"] = traceparent
    msg["MIME-Version"] = "1.0"
    for name, value in request.headers.items():
        msg[name] = value

    if request.text is not None:
        msg.set_content(request.text)
        if request.html is not None:
            msg.add_alternative(request.html, subtype="html")
    elif request.html is not None:
        msg.set_content(request.html, subtype="html")

    for attachment in request.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(
            attachment.decoded(),
            maintype=maintype,
            subtype=subtype,
            filename=attachment.filename,
        )
    return msg


def requires_smtputf8(msg: EmailMessage) -> bool:
    """True when an address in the headers has a non-ASCII local part (RFC 6531 is needed)."""
    for name in _ADDRESS_HEADERS:
        for header in msg.get_all(name, []):
            for address in getattr(header, "addresses", ()):
                if not address.addr_spec.isascii():
                    return True
    return False


def message_bytes(msg: EmailMessage) -> bytes:
    """The message as sent in DATA: CRLF line ends, 7-bit unless SMTPUTF8 is needed."""
    return msg.as_bytes(policy=policy.SMTPUTF8 if requires_smtputf8(msg) else SMTP_7BIT)


def envelope(mail: QueuedMail) -> tuple[str, list[str]]:
    """``(MAIL FROM, [RCPT TO, ...])``: bare addresses, bcc included, duplicates removed."""
    request = mail.request
    recipients: dict[str, None] = {}
    for address in request.recipients:
        recipients.setdefault(ascii_address(address), None)
    return ascii_address(addr_spec(request.from_)), list(recipients)
