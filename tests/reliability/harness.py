"""What the reliability tests share: a time-stamping SMTP server, load, counts, process probes.

Everything here drives real parts (the services as processes, the emulator, aiosmtpd on
loopback); nothing is mocked. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emulator.smtp import LocalSmtpServer, ReceivedMail
from mailpipe.record import MailRecord, MailStatus, open_record
from mailpipe.topology import DeadLetterPolicy, RetryPolicy, Topology
from tests.fixtures.topology import unique_topology

# Filled by print_counts(); tests/reliability/conftest.py shows them in pytest's summary.
COUNT_LINES: list[str] = []

MESSAGE_ID_DOMAIN = "mailpipe.local"  # what emulator.pipeline.service_env configures


def reliability_topology(**delivery: Any) -> Topology:
    """The declared topology under unique names; ``delivery`` overrides its delivery settings."""
    settings: dict[str, Any] = {
        "ack_deadline_seconds": 10,
        "retry_policy": RetryPolicy("1s", "2s"),
        "dead_letter": DeadLetterPolicy("dead_letter", 5),
        **delivery,
    }
    return unique_topology(**settings)


def mail(tag: str, **overrides: Any) -> dict[str, Any]:
    """A small mail whose subject identifies it (``tag``)."""
    return {
        "from": "sender@example.com",
        "to": ["rcpt@example.org"],
        "subject": f"reliability {tag}",
        "text": f"body of {tag}\n",
        **overrides,
    }


def mail_id_of(message_id_header: str | None) -> str | None:
    """``<mail_id@mailpipe.local>`` → ``mail_id``."""
    if not message_id_header:
        return None
    value = str(message_id_header).strip().strip("<>")
    local, _, domain = value.partition("@")
    return local if domain == MESSAGE_ID_DOMAIN else None


class StampedSmtpServer(LocalSmtpServer):
    """The local SMTP server, also noting when it accepted each mail (just before its 250)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stamps_lock = threading.Lock()
        self.received_at: dict[str, list[float]] = {}
        super().__init__(*args, on_mail=self._stamp, **kwargs)

    def _stamp(self, received: ReceivedMail, queue_id: str) -> None:
        stamp = time.time()
        mail_id = mail_id_of(received.message["Message-ID"]) or f"?{queue_id}"
        with self._stamps_lock:
            self.received_at.setdefault(mail_id, []).append(stamp)

    def receipts(self) -> dict[str, list[float]]:
        with self._stamps_lock:
            return {k: list(v) for k, v in self.received_at.items()}


# -- posting ----------------------------------------------------------------------------------


@dataclass
class PostResult:
    """What one POST /v1/messages got: a 202 (``mail_id``), an HTTP error, or no answer."""

    tag: str
    status: int | None  # None: no HTTP answer (refused, reset)
    mail_id: str | None = None
    body: Any = None
    error: str | None = None


def post(base_url: str, body: Mapping[str, Any], *, timeout: float = 30.0) -> PostResult:
    """POST one mail on a fresh connection (no keep-alive, so each request stands alone)."""
    tag = str(body.get("subject", ""))
    request = urllib.request.Request(
        f"{base_url}/v1/messages",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Connection": "close"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
            return PostResult(tag, response.status, payload.get("mail_id"), payload)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return PostResult(tag, exc.code, None, payload)
    except (urllib.error.URLError, OSError) as exc:
        return PostResult(tag, None, None, None, error=f"{type(exc).__name__}: {exc}")


# -- the record -------------------------------------------------------------------------------


def read_records(record_path: Path, mail_ids: Iterable[str]) -> dict[str, MailRecord | None]:
    record = open_record(f"sqlite:///{record_path}")
    try:
        return {mail_id: record.get(mail_id) for mail_id in mail_ids}
    finally:
        record.close()


SETTLED = {MailStatus.DELIVERED, MailStatus.BOUNCED, MailStatus.DEAD_LETTERED}


def wait_settled(
    record_path: Path,
    mail_ids: Iterable[str],
    *,
    timeout: float,
    settled: set[MailStatus] = SETTLED,
    on_wait: Callable[[], None] | None = None,
) -> dict[str, MailRecord | None]:
    """Poll the record until every mail is delivered, bounced or dead-lettered (or time is up)."""
    ids = list(mail_ids)
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(record_path, ids)
        pending = [i for i, r in records.items() if r is None or r.status not in settled]
        if not pending or time.monotonic() > deadline:
            return records
        if on_wait is not None:
            on_wait()
        time.sleep(0.25)


# -- counts -----------------------------------------------------------------------------------


@dataclass
class Counts:
    """What happened to the accepted mails of one run. ``lost`` must be 0."""

    accepted: int
    delivered: int
    duplicated: int
    dead_lettered: int
    bounced: int
    lost: int
    not_accepted: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    lost_ids: list[str] = field(default_factory=list, repr=False)
    duplicate_ids: list[str] = field(default_factory=list, repr=False)


def tally(
    accepted_ids: Iterable[str],
    receipts: Mapping[str, list[float]],
    records: Mapping[str, MailRecord | None],
    *,
    not_accepted: int = 0,
) -> Counts:
    """Count each accepted mail once: delivered (received by SMTP and recorded), bounced,
    dead-lettered, or lost. ``duplicated`` = extra receipts of the same mail."""
    ids = list(dict.fromkeys(accepted_ids))
    delivered = bounced = dead = 0
    lost: list[str] = []
    for mail_id in ids:
        record = records.get(mail_id)
        status = record.status if record else None
        got = len(receipts.get(mail_id, []))
        if got and status is MailStatus.DELIVERED:
            delivered += 1
        elif status is MailStatus.BOUNCED and not got:
            bounced += 1
        elif status is MailStatus.DEAD_LETTERED and not got:
            dead += 1
        else:
            lost.append(mail_id)
    duplicate_ids = [m for m in ids if len(receipts.get(m, [])) > 1]
    duplicated = sum(len(receipts[m]) - 1 for m in duplicate_ids)
    return Counts(
        accepted=len(ids),
        delivered=delivered,
        duplicated=duplicated,
        dead_lettered=dead,
        bounced=bounced,
        lost=len(lost),
        not_accepted=not_accepted,
        lost_ids=lost,
        duplicate_ids=duplicate_ids,
    )


def print_counts(name: str, counts: Counts) -> None:
    """Print the run's counts (and keep them for the end-of-session summary)."""
    data = asdict(counts)
    data.pop("lost_ids")
    data.pop("duplicate_ids")
    notes = data.pop("notes")
    line = f"[{name}] " + " ".join(f"{k}={v}" for k, v in data.items())
    if notes:
        line += " | " + " ".join(f"{k}={v}" for k, v in notes.items())
    print(line)
    COUNT_LINES.append(line)


def record_window_ms(record: MailRecord | None, received_at: float) -> float | None:
    """Milliseconds from the SMTP server's acceptance to the record's delivered attempt."""
    if record is None:
        return None
    for attempt in record.attempts:
        if attempt.outcome == "delivered" and attempt.finished_at is not None:
            return (attempt.finished_at.timestamp() - received_at) * 1000
    return None


def describe_windows(windows: list[float]) -> dict[str, str]:
    if not windows:
        return {}
    ordered = sorted(windows)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "window_ms_median": f"{statistics.median(ordered):.1f}",
        "window_ms_p99": f"{p99:.1f}",
        "window_ms_max": f"{ordered[-1]:.1f}",
    }


# -- process probes (/proc, no psutil) ---------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. gunicorn's worker under its master)."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text()
            found.extend(int(p) for p in text.split())
    except OSError:
        return []
    return found


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return None


def tcp_connections(pid: int) -> int | None:
    """Open sockets of ``pid`` (fd links that name a socket)."""
    count = 0
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name.startswith("socket:"):
                    count += 1
            except OSError:
                continue
    except OSError:
        return None
    return count
