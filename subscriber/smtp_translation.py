"""Translate ``smtplib``, ``ssl`` and socket errors into the tree of :mod:`subscriber.errors`.

The only place where the SMTP client's lower-level exceptions become mailpipe's
(:func:`translate_errors`, ``raise ... from exc``); the sender (:mod:`subscriber.smtp`) wraps
every SMTP step in it::

    smtplib.SMTPResponseException 4xx       → SmtpTransientReply
    smtplib.SMTPResponseException 5xx       → SmtpPermanentReply (MAIL FROM, RCPT TO, DATA)
                                              SmtpTransientReply (connect, EHLO, STARTTLS, AUTH)
    any reply or SMTPNotSupportedError at STARTTLS → SmtpTlsError
    ssl.SSLError at connect/STARTTLS         → SmtpTlsError
    TimeoutError (also inside a disconnect)  → SmtpTimeout
                                               DeliveryTimeout when the send's deadline passed
    SMTPServerDisconnected, OSError          → SmtpConnectionError

A 5xx during the session set-up (greeting, EHLO, STARTTLS, AUTH — including 535 "authentication
credentials invalid") says the relay refuses *this client*, not this mail: a wrong password or
an unauthorised IP. Bouncing would throw away every mail until an operator fixes the relay
settings, so these are transient: the mail is retried and, if the problem lasts, lands in the
dead-letter topic where it can be replayed.

Every message (and the chained original's text) passes through the caller's
:class:`subscriber.redaction.ReplyRedactor` first: no password, addresses only as configured.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Callable, Iterator

from subscriber.errors import (
    DeliveryError,
    DeliveryTimeout,
    SmtpConnectionError,
    SmtpPermanentReply,
    SmtpTimeout,
    SmtpTlsError,
    SmtpTransientReply,
    TransientDeliveryError,
)

# Steps that set up the session rather than send this mail: a 5xx there is not about the mail.
SESSION_STEPS = frozenset({"connect", "ehlo", "starttls", "auth"})
_TLS_STEPS = frozenset({"connect", "starttls"})


def reply_text(reply: bytes | str | None) -> str:
    """A reply's text as ``str`` (smtplib gives bytes)."""
    if reply is None:
        return ""
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if ``exc`` or an exception it was raised from/during is a ``kind``."""
    seen: BaseException | None = exc
    for _ in range(10):  # smtplib chains at most one level; the bound guards against cycles
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reply_error(step: str, code: int) -> type[DeliveryError]:
    if step == "starttls":
        return SmtpTlsError  # e.g. 454 "TLS not available": never continue in clear
    if 400 <= code < 500:
        return SmtpTransientReply
    if 500 <= code < 600:
        return SmtpTransientReply if step in SESSION_STEPS else SmtpPermanentReply
    return TransientDeliveryError  # not a valid reply at this point: a protocol error, retry


class OutOfTime(TimeoutError):
    """The send's deadline has passed: no further socket operation may start."""


@contextlib.contextmanager
def translate_errors(
    step: str,
    *,
    server: str,
    redact: Callable[[str], str],
    out_of_time: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Translate ``smtplib``, ``ssl`` and socket errors raised in ``step`` into DeliveryErrors.

    The only place where lower-level exceptions become mailpipe's. The messages (and the
    chained original's) pass through ``redact``, the sender's
    :class:`~subscriber.redaction.ReplyRedactor`; a timeout or lost
    connection when ``out_of_time()`` says the send's deadline has passed is a
    :class:`DeliveryTimeout`.
    """
    try:
        yield
    except DeliveryError:
        raise
    except Exception as exc:
        _scrub(exc, redact)  # the original stays chained (``from exc``): clean it too
        error = _translated(exc, step, server, redact, out_of_time)
        if error is None:
            raise  # not an SMTP, TLS or network error: a bug, let it show
        raise error from exc


def _scrub(exc: Exception, redact: Callable[[str], str]) -> None:
    """Remove secrets (and addresses, as configured) from an exception's own text, in place."""
    if isinstance(exc, smtplib.SMTPResponseException):
        exc.smtp_error = redact(reply_text(exc.smtp_error)).encode("utf-8")
        if isinstance(exc, smtplib.SMTPSenderRefused):  # it carries the sender's address
            exc.sender = redact(exc.sender)
            exc.args = (exc.smtp_code, exc.smtp_error, exc.sender)
        else:
            exc.args = (exc.smtp_code, exc.smtp_error, *exc.args[2:])
    else:
        exc.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)


def _translated(
    exc: Exception,
    step: str,
    server: str,
    redact: Callable[[str], str],
    out_of_time: Callable[[], bool] | None = None,
) -> DeliveryError | None:
    code: int | None = None
    text: str | None = None
    detail = redact(str(exc))
    cls: type[DeliveryError]
    # smtplib's own errors are OSErrors too: only a lost or silent connection can be the budget's.
    network = isinstance(exc, smtplib.SMTPServerDisconnected) or (
        isinstance(exc, OSError) and not isinstance(exc, smtplib.SMTPException)
    )
    if _caused_by(exc, OutOfTime) or (network and out_of_time is not None and out_of_time()):
        message = (
            f"SMTP {step} with {server}: the delivery's time budget (MAILPIPE_DELIVERY_TIMEOUT) "
            "ran out before the relay answered"
        )
        return DeliveryTimeout(message, step=step, server=server)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        cls = SmtpTlsError if step == "starttls" else TransientDeliveryError
        message = f"SMTP {step} with {server} failed: {detail}"
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, text = exc.smtp_code, redact(reply_text(exc.smtp_error))
        cls = _reply_error(step, code)
        message = f"SMTP {step} with {server} failed: {code} {text}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib turns every socket error while reading a reply into this; look inside.
        if _caused_by(exc, TimeoutError):
            cls, message = SmtpTimeout, f"SMTP {step} with {server}: no reply in time"
        else:
            tls_failed = _caused_by(exc, ssl.SSLError) and step in _TLS_STEPS
            cls = SmtpTlsError if tls_failed else SmtpConnectionError
            message = f"SMTP {step} with {server}: connection lost ({detail})"
    elif isinstance(exc, smtplib.SMTPException):  # "No suitable authentication method found"
        cls, message = TransientDeliveryError, f"SMTP {step} with {server} failed: {detail}"
    elif isinstance(exc, ssl.SSLError):  # before OSError: SSLError is one
        if step in _TLS_STEPS or isinstance(exc, ssl.SSLCertVerificationError):
            cls, message = SmtpTlsError, f"TLS with {server} failed at {step}: {detail}"
        else:
            cls = SmtpConnectionError
            message = f"SMTP {step} with {server}: TLS connection lost ({detail})"
    elif isinstance(exc, TimeoutError):  # before OSError: socket.timeout is one
        cls, message = SmtpTimeout, f"SMTP {step} with {server}: no reply in time"
    elif isinstance(exc, OSError):  # refused, reset, unreachable, DNS failure
        cls, message = SmtpConnectionError, f"SMTP {step} with {server} failed: {detail}"
    else:
        return None
    return cls(message, step=step, reply_code=code, reply_message=text, server=server)
