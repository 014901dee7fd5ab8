"""The delivery core's use of the suppression list (docs/suppressions.md).

Before MAIL FROM every recipient is looked up in one batched read; the suppressed ones are left
out of RCPT TO and recorded per recipient (``suppressed``). After the attempt, each recipient
the relay refused with a code that says its mailbox is gone
(:data:`MAILBOX_GONE`) is added with reason ``bounce``, the reply
and the mail id. A suppression list that cannot be read defers the mail (it is not sent to a
recipient that may be suppressed); one that cannot be written is logged, the mail unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mailpipe.config import AddressStyle
from mailpipe.logs import redact_address
from mailpipe.mail import QueuedMail
from mailpipe.record import (
    RecipientResult,
    RecordError,
    SuppressionList,
    SuppressionReason,
)
from mailpipe.record.suppressions import Suppression
from subscriber.errors import TransientDeliveryError, parse_enhanced_status
from subscriber.message import ascii_address

log = logging.getLogger(__name__)

CHECK_STEP = "suppression check"  # the failed_step of an attempt whose lookup failed
# RFC 3463 subjects and details that say the mailbox itself is gone for good: bad mailbox (1.1),
# bad system (1.2), bad syntax (1.3), moved without forwarding (1.6), null MX (1.10, RFC 7505),
# mailbox disabled (2.1). Not 2.2 (mailbox full: it empties), not 5.7.x (policy: spam, DMARC,
# a sender block: about the sender, not the mailbox), not 5.0.0 or a 5xx without a code.
MAILBOX_GONE = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})


def mailbox_gone(reply_code: int | None, enhanced_status: str | None) -> bool:
    """Whether a per-recipient refusal suppresses the recipient (see :data:`MAILBOX_GONE`)."""
    return reply_code is not None and 500 <= reply_code < 600 and enhanced_status in MAILBOX_GONE


@dataclass(frozen=True)
class Screened:
    """The envelope's recipients split by the suppression list."""

    send_to: list[str]  # envelope (ASCII) addresses still to send to
    suppressed: list[str]  # the mail's addresses left out
    results: tuple[RecipientResult, ...] = ()


class RecipientScreen:
    """Looks recipients up before a send and learns from the relay's refusals after it."""

    def __init__(self, suppressions: SuppressionList, address_style: AddressStyle) -> None:
        self._list, self._style = suppressions, address_style

    def screen(self, mail: QueuedMail, envelope_recipients: Sequence[str]) -> Screened:
        """Raises :class:`TransientDeliveryError` when the list cannot be read."""
        try:
            found = self._list.lookup(mail.request.recipients)
        except RecordError as exc:
            raise TransientDeliveryError(
                f"the suppression list could not be read: {exc}", step=CHECK_STEP
            ) from exc
        left_out = {ascii_address(address) for address in found}
        results = tuple(
            RecipientResult(redact_address(address, self._style), "suppressed") for address in found
        )
        send_to = [rcpt for rcpt in envelope_recipients if rcpt not in left_out]
        return Screened(send_to, list(found), results)

    def learn(
        self, mail: QueuedMail, refused: Mapping[str, tuple[int, str]]
    ) -> tuple[RecipientResult, ...]:
        """Suppress each refused recipient whose mailbox is gone; every refusal as a result."""
        originals = {ascii_address(address): address for address in mail.request.recipients}
        results, gone = [], list[tuple[Suppression, str]]()
        for rcpt, (code, text) in refused.items():
            enhanced = parse_enhanced_status(text)
            shown = redact_address(rcpt, self._style)
            results.append(RecipientResult(shown, "refused", code, enhanced))
            if mailbox_gone(code, enhanced):
                entry = self._list.entry(
                    originals.get(rcpt, rcpt),
                    SuppressionReason.BOUNCE,
                    reply_code=code,
                    enhanced_status=enhanced,
                    reply=f"{code} {text}",
                    mail_id=mail.mail_id,
                )
                gone.append((entry, shown))
        if gone:
            try:
                self._list.put(*(entry for entry, _ in gone))  # one write for all the refusals
            except RecordError as exc:
                shown = ", ".join(address for _, address in gone)
                log.error("could not suppress %s after their refusals: %s", shown, exc)
        return tuple(results)
