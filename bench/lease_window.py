"""``python -m bench.lease_window``: how long a delivery runs on its claim after checking it.

The delivery core renews its claim in the record just before MAIL FROM (once it holds a pooled
SMTP connection). From then on the mail is sent on that claim's lease; a second copy could only
be sent if the lease ran out before the outcome is recorded. This measures, on loopback, with the
real parts in one process (DeliveryService, SmtpSender, the SQLite record, aiosmtpd):

- renewal → relay's 250: the time the relay has the mail while only the lease protects it;
- renewal → record written: until a redelivered copy would find the mail delivered;
- the wait for a pooled connection (the window issue 16 found, now bounded).

Each against the lease (``MAILPIPE_DELIVERY_LEASE_SECONDS``, 120 s by default) and the delivery
timeout (60 s), which bounds the first two by construction. Numbers in docs/guarantees.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from emulator.smtp import LocalSmtpServer, ReceivedMail
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import Attempt, MailRecord
from mailpipe.record.base import Claim
from mailpipe.record.sqlite import SqliteRecord
from subscriber.config import SmtpConfig
from subscriber.delivery import DeliveryService, Outcome, ReceivedMessage
from subscriber.smtp import SmtpSender


class _Stamps:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.at: dict[str, dict[str, float]] = {}

    def note(self, mail_id: str, what: str) -> None:
        now = time.time()
        with self.lock:
            self.at.setdefault(mail_id, {})[what] = now


class _StampedRecord(SqliteRecord):
    """The SQLite record, noting when each renewal and each final write returned."""

    def __init__(self, path: Path, stamps: _Stamps) -> None:
        super().__init__(path)
        self.stamps = stamps

    def renew_lease(self, mail_id: str, *, attempt_number: int, lease_seconds: float) -> Claim:
        renewal = super().renew_lease(
            mail_id, attempt_number=attempt_number, lease_seconds=lease_seconds
        )
        self.stamps.note(mail_id, "renewed")
        return renewal

    def finish(self, mail_id: str, attempt: Attempt) -> MailRecord:
        record = super().finish(mail_id, attempt)
        self.stamps.note(mail_id, "recorded")
        return record


class _StampedRelay(LocalSmtpServer):
    """The local SMTP server, noting when it accepted each mail (just before its 250)."""

    def __init__(self, stamps: _Stamps) -> None:
        self.stamps = stamps
        super().__init__(on_mail=self._stamp)

    def _stamp(self, received: ReceivedMail, queue_id: str) -> None:
        message_id = str(received.message["Message-ID"])  # <mail_id@bench.local>
        self.stamps.note(message_id.strip("<>").partition("@")[0], "accepted")


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"median {statistics.median(ordered) * 1000:.2f} ms · p99 {p99 * 1000:.2f} ms · "
        f"max {ordered[-1] * 1000:.2f} ms"
    )


def measure(
    mails: int, threads: int, pool_size: int, lease: float, timeout: float
) -> dict[str, Any]:
    stamps = _Stamps()
    waits: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, _StampedRelay(stamps) as relay:
        record = _StampedRecord(Path(tmp) / "record.sqlite3", stamps)
        sender = SmtpSender(
            SmtpConfig(host=relay.host, port=relay.port, tls="none", pool_size=pool_size)
        )
        delivery = DeliveryService(
            sender=sender,
            record=record,
            tracer=TracerProvider().get_tracer("bench.lease_window"),
            message_id_domain="bench.local",
            lease_seconds=lease,
            delivery_timeout=timeout,
        )

        def one(i: int) -> Outcome:
            mail = QueuedMail.accept(
                MailRequest.model_validate(
                    {"from": "a@example.com", "to": ["b@example.org"], "subject": "x", "text": "t"}
                )
            )
            data, attributes = mail.to_pubsub()
            started = time.time()
            result = delivery.deliver(
                ReceivedMessage(data=data, attributes=attributes, message_id=str(i)), parent=None
            )
            renewed = stamps.at.get(mail.mail_id, {}).get("renewed")
            if renewed is not None:
                waits.append(renewed - started)
            return result.outcome

        try:
            with ThreadPoolExecutor(threads) as pool:
                outcomes = list(pool.map(one, range(mails)))
        finally:
            sender.close()
            record.close()
    to_250 = [s["accepted"] - s["renewed"] for s in stamps.at.values() if len(s) == 3]
    to_record = [s["recorded"] - s["renewed"] for s in stamps.at.values() if len(s) == 3]
    return {
        "mails": mails,
        "delivered": outcomes.count(Outcome.DELIVERED),
        "renewal → relay 250": _ms(to_250),
        "renewal → record written": _ms(to_record),
        "start → renewal (claim + pool wait)": _ms(waits),
        "lease": f"{lease:g} s",
        "delivery timeout": f"{timeout:g} s",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lease_window", description=__doc__)
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--lease", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    result = measure(args.mails, args.threads, args.pool_size, args.lease, args.timeout)
    for key, value in result.items():
        print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
