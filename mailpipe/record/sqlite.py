"""The SQLite delivery record: the embedded default (``MAILPIPE_RECORD=sqlite:///PATH``).

One file shared by the processes of a local stack, in WAL mode; every transaction is ``BEGIN
IMMEDIATE`` (the write lock up front), so a claim is atomic across threads and processes. A
lock held past ``busy_timeout`` or an I/O failure is :class:`RecordUnavailable`.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`): a table per :class:`Kind`, one row per
document: ``id``, a column per indexed field (times as microseconds since the epoch, so they
sort), and the whole document as JSON in ``body``. SQLite has no expiry: a completed idempotency
key is remembered as long as its mail.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mailpipe.record.base import DeliveryRecord, RecordError, RecordUnavailable
from mailpipe.record.store import KINDS, Clock, Condition, Cursor, Document, Kind, utc, utc_now

SCHEMA_VERSION = 3
T = TypeVar("T")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SQL_OPS = {"==": "=", ">=": ">=", "in": "IN"}


def _schema() -> Iterator[str]:
    """The tables and indexes of :data:`KINDS` (a new kind: bump :data:`SCHEMA_VERSION`)."""
    for kind in KINDS:
        columns = "".join(f", {field}" for field in kind.indexed)
        yield f"CREATE TABLE IF NOT EXISTS {kind.name} (id TEXT PRIMARY KEY{columns}, body TEXT)"
        for order in kind.orders:
            name = f"{kind.name}_by_{'_'.join(order)}"
            yield f"CREATE INDEX IF NOT EXISTS {name} ON {kind.name} ({', '.join(order)}, id)"


# Version 1 kept one table of mails with the idempotency key's hash in a UNIQUE column.
_FROM_V1 = (
    "ALTER TABLE mails RENAME TO mails_v1",
    *_schema(),
    "INSERT INTO mails SELECT mail_id, status, accepted_us, body FROM mails_v1",
    "INSERT INTO idempotency SELECT key_hash, json_object('mail_id', mail_id) FROM mails_v1"
    " WHERE key_hash IS NOT NULL",
    "DROP TABLE mails_v1",
)


@contextlib.contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """The one place where sqlite3's exceptions become the record's."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked, busy, disk I/O, cannot open
        raise RecordUnavailable(f"sqlite record: {operation} failed: {exc}") from exc
    except sqlite3.Error as exc:
        raise RecordError(f"sqlite record: {operation} failed: {exc}") from exc


def _column(value: Any) -> Any:
    """An indexed field's value as stored in its column (times as sortable microseconds)."""
    if isinstance(value, dt.datetime):
        return (utc(value) - _EPOCH) // dt.timedelta(microseconds=1)
    return value


class _Connection:
    """One thread's connection (freed with it when the thread ends); inside ``BEGIN IMMEDIATE``
    its ``get``, ``put`` and ``delete`` are the :class:`Transaction` primitives."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def get(self, kind: Kind, doc_id: str) -> Document | None:
        sql = f"SELECT body FROM {kind.name} WHERE id = ?"  # noqa: S608 (names are ours)
        row = self.conn.execute(sql, (doc_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(
        self, kind: Kind, doc_id: str, doc: Document, retain_from: dt.datetime | None, new: bool
    ) -> None:
        body = json.dumps(doc, default=dt.datetime.isoformat, separators=(",", ":"))
        values = (doc_id, *(_column(doc.get(field)) for field in kind.indexed), body)
        marks = ", ".join("?" for _ in values)  # the columns: id, the indexed fields, body
        verb = "INSERT" if new else "INSERT OR REPLACE"
        self.conn.execute(f"{verb} INTO {kind.name} VALUES ({marks})", values)

    def delete(self, kind: Kind, doc_id: str) -> None:
        self.conn.execute(f"DELETE FROM {kind.name} WHERE id = ?", (doc_id,))  # noqa: S608


class SqliteStore:
    """Documents in an SQLite file; safe across threads and processes."""

    def __init__(self, path: Path, *, busy_timeout: float) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._holders: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._closed = False
        with _translate_errors("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.transact("open", self._migrate)

    def _connection(self) -> _Connection:
        if self._closed:
            raise RecordError("sqlite record is closed")
        holder: _Connection | None = getattr(self._local, "holder", None)
        # A connection must not cross a fork: a child process opens its own.
        if holder is None or holder.pid != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # autocommit; transactions are explicit BEGIN IMMEDIATE
                check_same_thread=False,  # only so close() may close it from another thread
            )
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL mode
            holder = _Connection(conn)
            self._local.holder = holder
            with self._lock:
                self._holders.add(holder)
        return holder

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, retrying within the busy timeout while another process holds the lock.

        Turning a new database file to WAL takes an exclusive lock, and SQLite answers "database
        is locked" at once instead of waiting on the busy handler: the publisher and the
        subscriber opening the same new record at the same moment hit it.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _migrate(self, txn: _Connection) -> None:
        (version,) = txn.conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RecordError(
                f"{self.path} has record schema {version}; this mailpipe knows up to "
                f"{SCHEMA_VERSION}: upgrade mailpipe"
            )
        if version < SCHEMA_VERSION:
            for statement in _FROM_V1 if version == 1 else _schema():
                txn.conn.execute(statement)
            txn.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def transact(self, operation: str, body: Callable[[_Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken first)."""
        with _translate_errors(operation):
            connection = self._connection()
            connection.conn.execute("BEGIN IMMEDIATE")
            with connection.conn:  # COMMIT, or ROLLBACK on any exception (and a failed COMMIT)
                return body(connection)

    def get_many(self, kind: Kind, doc_ids: Sequence[str]) -> dict[str, Document]:
        marks = ", ".join("?" for _ in doc_ids)
        sql = f"SELECT id, body FROM {kind.name} WHERE id IN ({marks})"  # noqa: S608
        with _translate_errors("get_many"):
            rows = self._connection().conn.execute(sql, list(doc_ids)).fetchall()
        return {doc_id: json.loads(body) for doc_id, body in rows}

    def query(
        self, kind: Kind, where: Sequence[Condition], order: str, after: Cursor, limit: int
    ) -> list[Document]:
        clauses, params = [], []
        for field, op, value in where:
            values = value if op == "in" else [value]
            clauses.append(f"{field} {_SQL_OPS[op]} ({', '.join('?' for _ in values)})")
            params += [_column(v) for v in values]
        if after is not None:
            clauses.append(f"({order}, id) > (?, ?)")
            params += [_column(after[0]), after[1]]
        where_sql = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT body FROM {kind.name}{where_sql} ORDER BY {order}, id LIMIT ?"  # noqa: S608
        with _translate_errors("query"):
            rows = self._connection().conn.execute(sql, [*params, limit]).fetchall()
        return [json.loads(row[0]) for row in rows]

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        with self._lock:
            self._closed = True
            holders = list(self._holders)
        for holder in holders:
            with contextlib.suppress(sqlite3.Error):
                holder.conn.close()


class SqliteRecord(DeliveryRecord):
    """The delivery record in an SQLite file."""

    def __init__(
        self, path: str | Path, *, busy_timeout: float = 5.0, clock: Clock = utc_now
    ) -> None:
        self.path = Path(path)
        super().__init__(SqliteStore(self.path, busy_timeout=busy_timeout), clock=clock)
