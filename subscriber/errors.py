"""Delivery errors: what can go wrong between the subscriber and the SMTP relay.

Every ``smtplib``, ``ssl`` and socket exception is translated into this tree in one place
(:func:`subscriber.smtp_translation.translate_errors`), so the delivery core decides ack or
nack from the class alone::

    DeliveryError                      base; carries step, reply code, enhanced status, server
    ├── TransientDeliveryError         retry later: Pub/Sub nack (push: 503)
    │   ├── SmtpTransientReply         a 4xx reply (421, 450, 451, 452, …)
    │   ├── SmtpConnectionError        refused, reset, dropped mid-transaction, DNS failure
    │   ├── SmtpTimeout                the server did not answer within MAILPIPE_SMTP_TIMEOUT
    │   │   └── DeliveryTimeout        the delivery's budget (MAILPIPE_DELIVERY_TIMEOUT) ran out
    │   ├── SmtpPoolTimeout            no pooled connection was free within MAILPIPE_SMTP_POOL_WAIT
    │   │                              (or the budget): nothing was sent
    │   └── SmtpTlsError               STARTTLS unsupported or the certificate failed verification
    └── PermanentDeliveryError         never retried: ack and record as bounced
        ├── SmtpPermanentReply         a 5xx reply (550, 553, 554, …)
        └── UndeliverableMail          the mail itself cannot be sent (undecodable, no recipient)
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


def parse_enhanced_status(message: str | bytes | None) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, e.g. ``"4.3.0"``."""
    if message is None:
        return None
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    match = _ENHANCED.match(text.strip())
    return ".".join(match.groups()) if match else None


class DeliveryError(Exception):
    """A delivery attempt failed. ``step`` is the SMTP step that failed (``"rcpt to"``, …)."""

    transient: bool = True

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        reply_code: int | None = None,
        reply_message: str | None = None,
        server: str | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.reply_code = reply_code
        self.reply_message = reply_message
        self.enhanced_status = parse_enhanced_status(reply_message)
        self.server = server
        # Per-recipient 5xx refusals at RCPT {address: (code, redacted reply)}, when all were.
        self.refused: dict[str, tuple[int, str]] = {}

    def summary(self) -> str:
        """One line for the record and logs: ``"451 4.3.0 try later (at rcpt to)"``."""
        parts = [str(self.reply_code)] if self.reply_code is not None else []
        parts.append(self.reply_message or str(self))
        if self.step:
            parts.append(f"(at {self.step})")
        return " ".join(parts)


class TransientDeliveryError(DeliveryError):
    """Worth retrying: Pub/Sub's retry policy spaces the retries."""

    transient = True


class SmtpTransientReply(TransientDeliveryError):
    """The server answered 4xx."""


class SmtpConnectionError(TransientDeliveryError):
    """Connection refused, reset or dropped."""


class SmtpTimeout(TransientDeliveryError):
    """The server did not answer in time."""


class DeliveryTimeout(SmtpTimeout):
    """The delivery's time budget (``MAILPIPE_DELIVERY_TIMEOUT``) ran out before the relay's reply.

    The budget covers the whole delivery: the wait for a pooled connection and every SMTP step
    (each step's socket timeout is the smaller of ``MAILPIPE_SMTP_TIMEOUT`` and the time left).
    """


class SmtpPoolTimeout(TransientDeliveryError):
    """Every pooled SMTP connection stayed busy for ``MAILPIPE_SMTP_POOL_WAIT`` (or the rest of the
    delivery's budget): the mail is deferred without any SMTP command sent for it."""


class SmtpTlsError(TransientDeliveryError):
    """TLS could not be established or verified (retried: a certificate may be fixed)."""


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help: the mail is bounced."""

    transient = False


class SmtpPermanentReply(PermanentDeliveryError):
    """The server answered 5xx."""


class UndeliverableMail(PermanentDeliveryError):
    """The mail itself cannot be delivered (no valid recipient, undecodable message)."""
