"""The SQLite delivery record: the embedded default (``MAILPIPE_RECORD=sqlite:///PATH``).

One file shared by the publisher and subscriber processes of a local stack. WAL mode lets
readers run beside the one writer; every read-modify-write runs in a ``BEGIN IMMEDIATE``
transaction, which takes the write lock up front, so a claim is atomic across threads and
processes. Each thread (and each process after a fork) gets its own connection. A lock held
longer than ``busy_timeout`` or an I/O failure surfaces as :class:`RecordUnavailable`
(translated in :func:`_translate_errors` only).

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`): one row per mail with the columns
queries need and the whole record as JSON in ``body``; the idempotency key is stored hashed (with
its scope) in a UNIQUE column, so releasing (deleting) the row frees it. A completed key is
remembered as long as its row: SQLite has no expiry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mailpipe.record import lifecycle
from mailpipe.record.base import (
    DEFAULT_RESERVATION_SECONDS,
    Attempt,
    Claim,
    LeaseRenewal,
    MailRecord,
    MailStatus,
    Page,
    RecordError,
    RecordUnavailable,
    Reservation,
)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS mails (
    mail_id      TEXT PRIMARY KEY,
    status       TEXT NOT NULL,
    accepted_us  INTEGER NOT NULL,   -- accepted_at, microseconds since the epoch (UTC)
    key_hash     TEXT UNIQUE,        -- sha256 of the idempotency key
    body         TEXT NOT NULL       -- the whole MailRecord as JSON
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mails_by_accepted ON mails (accepted_us, mail_id);
CREATE INDEX IF NOT EXISTS mails_by_status ON mails (status, accepted_us, mail_id);
"""
T = TypeVar("T")


class _Holder:
    """Owns one thread's connection; when the thread ends, it and the connection are freed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()


@contextlib.contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """The one place where sqlite3's exceptions become the record's."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked, busy, disk I/O, cannot open
        raise RecordUnavailable(f"sqlite record: {operation} failed: {exc}") from exc
    except sqlite3.Error as exc:
        raise RecordError(f"sqlite record: {operation} failed: {exc}") from exc


def _micros(value: dt.datetime) -> int:
    delta = lifecycle.utc(value) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _encode(record: MailRecord) -> str:
    return json.dumps(lifecycle.to_fields(record, lambda d: d.isoformat()), separators=(",", ":"))


def _decode(body: str) -> MailRecord:
    return lifecycle.from_fields(json.loads(body), dt.datetime.fromisoformat)


class SqliteRecord:
    """The delivery record in an SQLite file; safe across threads and processes."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 5.0,
        clock: Callable[[], dt.datetime] = lifecycle.utc_now,
    ) -> None:
        self.path = Path(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._holders: weakref.WeakSet[_Holder] = weakref.WeakSet()
        self._closed = False
        with _translate_errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._migrate(self._connection())

    # --- connections and transactions ------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise RecordError("sqlite record is closed")
        holder: _Holder | None = getattr(self._local, "holder", None)
        # A connection must not cross a fork: a child process opens its own.
        if holder is None or holder.pid != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_ms / 1000,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # only so close() may close it from another thread
            )
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL mode
            holder = _Holder(conn)
            self._local.holder = holder
            with self._lock:
                self._holders.add(holder)
        return holder.conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, retrying within the busy timeout while another process holds the lock.

        Turning a new database file to WAL takes an exclusive lock, and SQLite answers "database
        is locked" at once instead of waiting on the busy handler: the publisher and the
        subscriber opening the same new record at the same moment hit it.
        """
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RecordError(
                    f"{self.path} has record schema {version}; this mailpipe knows up to "
                    f"{SCHEMA_VERSION}: upgrade mailpipe"
                )
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write(self, operation: str, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken first)."""
        with _translate_errors(operation):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    @staticmethod
    def _load(conn: sqlite3.Connection, mail_id: str) -> MailRecord | None:
        row = conn.execute("SELECT body FROM mails WHERE mail_id = ?", (mail_id,)).fetchone()
        return _decode(row[0]) if row else None

    @staticmethod
    def _store(conn: sqlite3.Connection, record: MailRecord) -> None:
        key = lifecycle.record_key_hash(record)
        conn.execute(
            "INSERT INTO mails (mail_id, status, accepted_us, key_hash, body)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (mail_id) DO UPDATE SET status = excluded.status,"
            " accepted_us = excluded.accepted_us, key_hash = excluded.key_hash,"
            " body = excluded.body",
            (record.mail_id, str(record.status), _micros(record.accepted_at), key, _encode(record)),
        )

    # --- the DeliveryRecord interface ------------------------------------------------------

    def reserve(
        self,
        *,
        mail_id: str,
        accepted_at: dt.datetime,
        recipient_domains: tuple[str, ...],
        idempotency_key: str | None,
        idempotency_scope: str | None = None,
        request_hash: str | None = None,
        reservation_seconds: float = DEFAULT_RESERVATION_SECONDS,
    ) -> Reservation:
        lifecycle.check_mail_id(mail_id)

        def body(conn: sqlite3.Connection) -> Reservation:
            now = self._clock()
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT body FROM mails WHERE key_hash = ?",
                    (lifecycle.key_hash(idempotency_key, idempotency_scope),),
                ).fetchone()
                if row:
                    holder = _decode(row[0])
                    if not lifecycle.reservation_expired(holder, now):
                        return Reservation(created=False, record=holder)
                    # Left by a crash: its publish never completed in time. The key is ours.
                    conn.execute("DELETE FROM mails WHERE mail_id = ?", (holder.mail_id,))
            existing = self._load(conn, mail_id)
            if existing is not None:
                return Reservation(created=False, record=existing)
            record = lifecycle.reserved(
                mail_id=mail_id,
                accepted_at=accepted_at,
                recipient_domains=recipient_domains,
                idempotency_key=idempotency_key,
                now=now,
                idempotency_scope=idempotency_scope,
                request_hash=request_hash,
                reservation_seconds=reservation_seconds,
            )
            self._store(conn, record)
            return Reservation(created=True, record=record)

        return self._write("reserve", body)

    def mark_queued(
        self,
        mail_id: str,
        *,
        message_id: str,
        trace_id: str | None,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
    ) -> None:
        lifecycle.check_mail_id(mail_id)

        def body(conn: sqlite3.Connection) -> None:
            record = lifecycle.queued(
                self._load(conn, mail_id),
                mail_id,
                message_id=message_id,
                trace_id=trace_id,
                now=self._clock(),
                accepted_at=accepted_at,
                recipient_domains=recipient_domains,
            )
            self._store(conn, record)

        self._write("mark_queued", body)

    def release(self, mail_id: str) -> None:
        if lifecycle.mail_id_problem(mail_id):
            return  # no record can have this id

        def body(conn: sqlite3.Connection) -> None:
            if lifecycle.releasable(self._load(conn, mail_id)):
                conn.execute("DELETE FROM mails WHERE mail_id = ?", (mail_id,))

        self._write("release", body)

    def release_expired_reservation(self, mail_id: str) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(conn: sqlite3.Connection) -> MailRecord | None:
            record = self._load(conn, mail_id)
            if record is None or not lifecycle.reservation_expired(record, self._clock()):
                return None
            conn.execute("DELETE FROM mails WHERE mail_id = ?", (mail_id,))
            return record

        return self._write("release_expired_reservation", body)

    def mark_unconfirmed(self, mail_id: str, *, grace_seconds: float) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(conn: sqlite3.Connection) -> MailRecord | None:
            record = self._load(conn, mail_id)
            now = self._clock()
            if record is None or not lifecycle.delivery_stalled(record, now, grace_seconds):
                return None
            new = lifecycle.unconfirmed(record, now=now)
            self._store(conn, new)
            return new

        return self._write("mark_unconfirmed", body)

    def claim(
        self,
        mail_id: str,
        *,
        message_id: str | None,
        trace_id: str | None,
        lease_seconds: float,
        accepted_at: dt.datetime | None = None,
        recipient_domains: tuple[str, ...] = (),
    ) -> Claim:
        lifecycle.check_mail_id(mail_id)

        def body(conn: sqlite3.Connection) -> Claim:
            claim, new = lifecycle.claimed(
                self._load(conn, mail_id),
                mail_id,
                message_id=message_id,
                trace_id=trace_id,
                lease_seconds=lease_seconds,
                now=self._clock(),
                accepted_at=accepted_at,
                recipient_domains=recipient_domains,
            )
            if new is not None:
                self._store(conn, new)
            return claim

        return self._write("claim", body)

    def renew_lease(
        self, mail_id: str, *, attempt_number: int, lease_seconds: float
    ) -> LeaseRenewal:
        def body(conn: sqlite3.Connection) -> LeaseRenewal:
            renewal, new = lifecycle.lease_renewed(
                self._load(conn, mail_id),
                mail_id,
                attempt_number=attempt_number,
                lease_seconds=lease_seconds,
                now=self._clock(),
            )
            if new is not None:
                self._store(conn, new)
            return renewal

        return self._write("renew_lease", body)

    def finish(self, mail_id: str, attempt: Attempt) -> MailRecord:
        lifecycle.check_mail_id(mail_id)

        def body(conn: sqlite3.Connection) -> MailRecord:
            record = lifecycle.finished(
                self._load(conn, mail_id), mail_id, attempt, now=self._clock()
            )
            self._store(conn, record)
            return record

        return self._write("finish", body)

    def mark_dead_lettered(self, mail_id: str, *, last_error: str | None) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(conn: sqlite3.Connection) -> MailRecord | None:
            record = self._load(conn, mail_id)
            if record is None:
                return None
            new = lifecycle.dead_lettered(record, last_error=last_error, now=self._clock())
            if new is not record:
                self._store(conn, new)
            return new

        return self._write("mark_dead_lettered", body)

    def mark_replayed(self, mail_id: str, *, trace_id: str | None) -> MailRecord:
        lifecycle.check_mail_id(mail_id)

        def body(conn: sqlite3.Connection) -> MailRecord:
            record = lifecycle.replayed(
                self._load(conn, mail_id), mail_id, trace_id=trace_id, now=self._clock()
            )
            self._store(conn, record)
            return record

        return self._write("mark_replayed", body)

    def get(self, mail_id: str) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id (and Firestore would refuse the path)
        with _translate_errors("get"):
            return self._load(self._connection(), mail_id)

    def get_by_idempotency_key(self, key: str, *, scope: str | None = None) -> MailRecord | None:
        with _translate_errors("get_by_idempotency_key"):
            row = (
                self._connection()
                .execute(
                    "SELECT body FROM mails WHERE key_hash = ?", (lifecycle.key_hash(key, scope),)
                )
                .fetchone()
            )
            return _decode(row[0]) if row else None

    def list(
        self,
        *,
        status: MailStatus | None = None,
        since: dt.datetime | None = None,
        limit: int = 100,
        page_token: str | None = None,
    ) -> Page:
        lifecycle.check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if status is not None:
            where.append("status = ?")
            params.append(str(MailStatus(status)))
        if since is not None:
            where.append("accepted_us >= ?")
            params.append(_micros(since))
        if page_token is not None:
            after_at, after_id = lifecycle.parse_page_token(page_token)
            where.append("(accepted_us, mail_id) > (?, ?)")
            params += [_micros(after_at), after_id]
        sql = "SELECT body FROM mails"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY accepted_us, mail_id LIMIT ?"
        params.append(limit + 1)  # one more tells whether there is a next page
        with _translate_errors("list"):
            rows = self._connection().execute(sql, params).fetchall()
        items = [_decode(row[0]) for row in rows[:limit]]
        token = lifecycle.page_token(items[-1]) if len(rows) > limit else None
        return Page(items=items, next_page_token=token)

    def oldest_undelivered(self) -> MailRecord | None:
        marks = ", ".join("?" for _ in lifecycle.UNDELIVERED)
        with _translate_errors("oldest_undelivered"):
            row = (
                self._connection()
                .execute(
                    f"SELECT body FROM mails WHERE status IN ({marks})"  # noqa: S608 (only ?s)
                    " ORDER BY accepted_us, mail_id LIMIT 1",
                    [str(s) for s in lifecycle.UNDELIVERED],
                )
                .fetchone()
            )
        return _decode(row[0]) if row else None

    def close(self) -> None:
        """Close every thread's connection; the record cannot be used afterwards."""
        with self._lock:
            self._closed = True
            holders = list(self._holders)
        for holder in holders:
            with contextlib.suppress(sqlite3.Error):
                holder.conn.close()

    def __repr__(self) -> str:
        return f"SqliteRecord({str(self.path)!r})"
