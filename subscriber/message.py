"""Build the RFC 5322 message and the SMTP envelope of a queued mail.

The body is built with the standard library's :mod:`email` package (``EmailMessage`` and its
policies); no MIME is assembled by hand. The result is stable across retries: ``Date`` comes from
``accepted_at`` and ``Message-ID`` from the mail id, so a relay or a recipient can recognise a
duplicate of the same mail.

Structure of the body::

    text only                 text/plain
    html only                 text/html
    text and html             multipart/alternative (text/plain, text/html)
    with attachments          multipart/mixed (the body above, then one part per attachment)

Headers built from the client's data (From, To, Cc, Reply-To, Subject and the custom headers)
are written here from structured values, never given to the ``email`` package as text to parse:
its parser decodes RFC 2047 encoded words and its folder writes decoded text back unencoded, so
a display name or subject made of encoded words would reach the relay as other addresses or
other headers. Each such header is a :class:`_WrittenHeader`, which the package stores and writes
as is. What any reader decodes from it is exactly what the client sent:

* display name — atoms as they are; other plain ASCII as one quoted-string; text that is not
  plain ASCII or holds ``=?`` as encoded words, each covering a run of such words (never two
  encoded words side by side: Python's parser keeps the space between them, RFC 2047 drops it);
* subject and custom header values — plain ASCII as is (folded at spaces); anything else
  (non-ASCII, ``=?``, tabs, surrounding spaces that a reader would trim, a word too long for a
  line) as encoded words, which decode to the exact text;
* addresses — the local part as is (UTF-8 when non-ASCII: the mail then needs SMTPUTF8), the
  domain in its ASCII (IDNA) form.

Control characters and line boundaries never get here: the mail model refuses them.

Errors (the ``email`` package's own translated in one place, :func:`_unbuildable`)::

    subscriber.errors.UndeliverableMail   the mail cannot be made into a message (step "build"):
                                          bounce it, retrying cannot help
    ValueError                            the Message-ID domain is not a valid domain (config)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from email import base64mime, policy
from email.charset import Charset
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime

from email_validator import EmailNotValidError, validate_email

from mailpipe.attributes import MAIL_TRACEPARENT_HEADER
from mailpipe.mail import ENCODED_WORD_START, Mailbox, QueuedMail
from subscriber.errors import UndeliverableMail

log = logging.getLogger(__name__)


class _FoldOnceHeader(BaseHeader):
    """A header that folds once per policy: header objects are immutable, and so are policies.

    A message is folded once to check whether it needs SMTPUTF8 and once to write it, and the
    shared headers of :class:`_CachedHeaderRegistry` are folded for every mail.
    """

    _folded: tuple[Policy, str] | None = None

    def fold(self, *, policy: Policy) -> str:
        folded = self._folded
        if folded is None or folded[0] is not policy:
            folded = self._folded = (policy, super().fold(policy=policy))
        return folded[1]


class _CachedHeaderRegistry(HeaderRegistry):
    """The standard header registry, creating each header class once instead of per header, and
    each header the ``email`` package sets to the same value on every mail (``MIME-Version``,
    ``Content-Type``, ``Content-Transfer-Encoding``) once.

    ``HeaderRegistry.__getitem__`` builds a new class with ``type()`` on every lookup (CPython
    3.11-3.13), twice per header set: a third of the time it takes to build a message. Keyed by
    the registered class, not the header name: mails may carry any custom header name, so the
    cache stays as small as the registry. Two threads racing to fill it store equivalent classes.
    A header object is never changed once made (setting a parameter makes a new one), so one
    object can serve every message; the values cache is emptied when full (multipart boundaries
    and attachment names differ per mail).
    """

    _SHARED = frozenset({"mime-version", "content-type", "content-transfer-encoding"})
    _MAX_SHARED = 256

    def __init__(self) -> None:
        super().__init__(base_class=_FoldOnceHeader)
        self._classes: dict[type, type[BaseHeader]] = {}
        self._headers: dict[tuple[str, str], BaseHeader] = {}

    def map_to_type(self, name: str, cls: type) -> None:
        super().map_to_type(name, cls)
        self._classes.clear()
        self._headers.clear()

    def __getitem__(self, name: str) -> type[BaseHeader]:
        registered = self.registry.get(name.lower(), self.default_class)
        cached = self._classes.get(registered)
        if cached is None:
            cached = self._classes[registered] = super().__getitem__(name)
        return cached

    def __call__(self, name: str, value: str) -> BaseHeader:
        if name.lower() not in self._SHARED:
            return self[name](name, value)
        header = self._headers.get((name, value))
        if header is None:
            if len(self._headers) >= self._MAX_SHARED:
                self._headers.clear()
            header = self._headers[name, value] = self[name](name, value)
        return header


# Bodies are encoded 7-bit clean when they are set, and headers are folded with RFC 2047: the
# message then crosses any relay, whether or not it offers 8BITMIME.
SMTP_7BIT = policy.SMTP.clone(cte_type="7bit", header_factory=_CachedHeaderRegistry())
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")  # RFC 5322 atext
_PLAIN = re.compile(r"[\x20-\x7e]*")  # printable ASCII and space
_VISIBLE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")  # words of printable ASCII
_PLAIN_ID = re.compile(r"<[A-Za-z0-9-]+@[A-Za-z0-9.-]+>")  # a msg-id its parser keeps as it is
_UTF8 = Charset("utf-8")  # encoded words in base64: exact for any text
LINE_LENGTH = 78  # RFC 5322 2.1.1: SHOULD
MAX_LINE_LENGTH = 998  # and MUST
ENCODED_WORD_LENGTH = 75  # RFC 2047 2


class _WrittenHeader(str):
    """A header written here from structured parts; ``str()`` is its decoded text (for logs).

    The ``email`` package stores a value that has a ``name`` as it is (``header_store_parse``)
    and writes it with the value's own ``fold`` (``EmailPolicy.fold``): never parsed, never
    refolded.
    """

    name: str
    lines: tuple[str, ...]

    def __new__(cls, name: str, decoded: str, lines: Sequence[str]) -> _WrittenHeader:
        header = super().__new__(cls, decoded)
        header.name = name
        header.lines = tuple(lines)
        return header

    def fold(self, *, policy: Policy) -> str:
        if self.lines == ("",):
            return f"{self.name}:{policy.linesep}"
        return f"{self.name}: {policy.linesep.join(self.lines)}{policy.linesep}"


def _fold(name: str, pieces: Sequence[str]) -> list[str]:
    """The lines of ``" ".join(pieces)`` after ``name: ``, folded before a piece where a line
    would pass 78 characters. Unfolding (removing each CRLF) gives the text back exactly; a fold
    is never next to another space, so no line ends in or holds only whitespace."""
    lines = [pieces[0]]
    width = len(name) + 2 + len(pieces[0])
    for previous, piece in itertools.pairwise(pieces):
        if piece and previous and width + 1 + len(piece) > LINE_LENGTH:
            lines.append(" " + piece)
            width = 1 + len(piece)
        else:
            lines[-1] += " " + piece
            width += 1 + len(piece)
    return lines


def _encoded_words(text: str, first_room: int) -> list[str]:
    """``text`` as RFC 2047 encoded words (UTF-8; B or Q, whichever is shorter) of at most 75
    characters each."""
    rooms = itertools.chain([max(first_room, 24)], itertools.repeat(ENCODED_WORD_LENGTH))
    return [word for word in _UTF8.header_encode_lines(text, rooms) if word]


def _encoded_word(text: str) -> str:
    """``text`` as one encoded word (longer than 75 characters if the text needs it)."""
    return base64mime.header_encode(text.encode("utf-8"), charset="utf-8")


def text_header(name: str, value: str) -> _WrittenHeader:
    """An unstructured header (Subject, a custom header) that reads back as exactly ``value``."""
    plain = (
        _PLAIN.fullmatch(value) is not None
        and ENCODED_WORD_START not in value
        and value == value.strip(" ")
    )
    if plain:
        lines = _fold(name, value.split(" "))
        if len(name) + 2 + max(len(line) for line in lines) <= MAX_LINE_LENGTH:
            return _WrittenHeader(name, value, lines)
    # Whitespace between encoded words is not part of the text: the words decode to ``value``.
    return _WrittenHeader(
        name, value, _fold(name, _encoded_words(value, LINE_LENGTH - len(name) - 2))
    )


def _one_line(name: str, value: str) -> _WrittenHeader | str:
    """A header of mailpipe's own (Date, Message-ID, traceparent) written as the ``email`` package
    would write it, without parsing and refolding it per mail: as it is when it is printable ASCII
    that fits on one line; else ``value``, for the package to write."""
    fits = len(name) + 2 + len(value) <= LINE_LENGTH and ENCODED_WORD_START not in value
    return _WrittenHeader(name, value, [value]) if fits and _VISIBLE.fullmatch(value) else value


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _is_atom(word: str) -> bool:
    return _ATOM.fullmatch(word) is not None and ENCODED_WORD_START not in word


def phrase(name: str) -> list[str]:
    """The words of a display name, written so that any reader decodes exactly ``name``."""
    words = name.split(" ")
    if _PLAIN.fullmatch(name) and ENCODED_WORD_START not in name:
        return words if all(_is_atom(w) for w in words) else [_quoted(name)]
    # Runs of words that are not atoms become one encoded word each, so encoded words are always
    # separated by an atom: the space between two of them is dropped by RFC 2047 decoders but
    # kept by Python's (3.11-3.13) address parser.
    pieces: list[str] = []
    run: list[str] = []
    for word in words:
        if _is_atom(word):
            if run:
                pieces.append(_encoded_word(" ".join(run)))
                run = []
            pieces.append(word)
        else:
            run.append(word)
    if run:
        pieces.append(_encoded_word(" ".join(run)))
    return pieces


def ascii_address(address: str) -> str:
    """``a@bücher.de`` → ``a@xn--bcher-kva.de``; unchanged if ASCII or the domain is not valid."""
    if address.isascii():
        return address
    try:
        checked = validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return address
    return checked.ascii_email or f"{checked.local_part}@{checked.ascii_domain}"


def address_header(name: str, mailboxes: Sequence[Mailbox]) -> _WrittenHeader:
    """An address-list header (From, To, Cc, Reply-To) from structured mailboxes."""
    pieces: list[str] = []
    shown: list[str] = []
    for index, mailbox in enumerate(mailboxes):
        address = ascii_address(mailbox.address)
        comma = "," if index < len(mailboxes) - 1 else ""
        if mailbox.name:
            pieces += phrase(mailbox.name)
            pieces.append(f"<{address}>{comma}")
            shown.append(f"{mailbox.name} <{address}>")
        else:
            pieces.append(f"{address}{comma}")
            shown.append(address)
    return _WrittenHeader(name, ", ".join(shown), _fold(name, pieces))


def message_id(mail_id: str, domain: str) -> str:
    """``<mail_id@domain>``: the same for every attempt of the same mail."""
    if not _DOMAIN.match(domain):
        raise ValueError(
            f"MAILPIPE_MESSAGE_ID_DOMAIN must be a domain such as mail.example.com, got {domain!r}"
        )
    return f"<{mail_id}@{domain}>"


@contextlib.contextmanager
def _unbuildable() -> Iterator[None]:
    """The one place a failure to build becomes :class:`UndeliverableMail` (a bounce).

    Building is a pure function of the mail: what fails once fails on every redelivery, so any
    exception means the mail can never be sent. The ``email`` package raises more than its own
    errors (ValueError, TypeError, even AttributeError for some content types), hence the
    broad catch; the reason is recorded with the exception's type.
    """
    try:
        yield
    except Exception as exc:
        log.exception("a mail could not be built")
        raise UndeliverableMail(
            f"the message cannot be built: {type(exc).__name__}: {exc}", step="build"
        ) from exc


def build_message(
    mail: QueuedMail, *, message_id_domain: str, traceparent: str | None
) -> EmailMessage:
    """The message as the recipients will see it (never a ``Bcc`` header).

    Raises :class:`UndeliverableMail` if it cannot be built, ValueError for a bad domain.
    """
    msg_id = message_id(mail.mail_id, message_id_domain)
    with _unbuildable():
        return _build(mail, msg_id, traceparent)


def _build(mail: QueuedMail, msg_id: str, traceparent: str | None) -> EmailMessage:
    request = mail.request
    msg = EmailMessage(policy=SMTP_7BIT)
    msg["From"] = address_header("From", [request.from_])
    msg["To"] = address_header("To", request.to)
    if request.cc:
        msg["Cc"] = address_header("Cc", request.cc)
    if request.reply_to:
        msg["Reply-To"] = address_header("Reply-To", request.reply_to)
    msg["Subject"] = text_header("Subject", request.subject)
    accepted_at = mail.accepted_at
    if accepted_at.tzinfo is None:  # QueuedMail.accept uses UTC; be explicit for older records
        accepted_at = accepted_at.replace(tzinfo=dt.UTC)
    msg["Date"] = _one_line("Date", format_datetime(accepted_at))
    msg["Message-ID"] = _one_line("Message-ID", msg_id) if _PLAIN_ID.fullmatch(msg_id) else msg_id
    if traceparent:
        msg[MAIL_TRACEPARENT_HEADER] = _one_line(MAIL_TRACEPARENT_HEADER, traceparent)
    msg["MIME-Version"] = "1.0"

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
    # After the body: making it multipart moves every Content-* header into the first part.
    for name, value in request.headers.items():
        msg[name] = text_header(name, value)
    return msg


def requires_smtputf8(msg: EmailMessage) -> bool:
    """True when a header holds UTF-8 (a non-ASCII local part): RFC 6531 is needed.

    Such a message can only be sent to a relay that offers SMTPUTF8 (the sender declares it).
    """
    # A header whose name and decoded text are ASCII folds to ASCII: only the others are folded.
    return any(
        not (name.isascii() and value.isascii()) and not msg.policy.fold(name, value).isascii()
        for name, value in msg.raw_items()
    )


def message_bytes(msg: EmailMessage) -> bytes:
    """The message as sent in DATA: CRLF line ends, 7-bit unless SMTPUTF8 is needed."""
    with _unbuildable():
        return msg.as_bytes(policy=policy.SMTPUTF8 if requires_smtputf8(msg) else SMTP_7BIT)


def envelope(mail: QueuedMail) -> tuple[str, list[str]]:
    """``(MAIL FROM, [RCPT TO, ...])``: bare addresses, bcc included, duplicates removed."""
    request = mail.request
    recipients: dict[str, None] = {}
    for address in request.recipients:
        recipients.setdefault(ascii_address(address), None)
    return ascii_address(request.from_.address), list(recipients)
