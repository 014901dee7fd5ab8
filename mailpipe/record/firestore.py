"""The Firestore delivery record (``MAILPIPE_RECORD=firestore://DATABASE``), for GCP.

Layout:

- ``<collection>/<mail_id>`` (default ``mailpipe_mails``): one document per mail, the fields of
  :class:`MailRecord` (attempts as an array of maps) plus ``expire_at`` = ``accepted_at`` +
  ``ttl_days``.
- ``<idempotency_collection>/<sha256(scope, key)>`` (default ``mailpipe_idempotency``): one
  document per idempotency key in its caller's scope, ``{mail_id, expire_at}``. It is created in
  the same transaction as the mail document, so a key can only ever be held by one mail; a
  completed key is remembered until the TTL policy deletes it with its mail (``ttl_days``).

Every read-modify-write is a ``@firestore.transactional`` function: Firestore aborts a
transaction whose documents changed underneath it and the client retries it, which makes claims
atomic. Terraform sets a TTL policy on ``expire_at`` for both collection groups, and composite
indexes for :meth:`FirestoreRecord.list` (``status``, ``accepted_at``, ``__name__``). The
emulator enforces neither: it keeps expired documents and runs every query without an index.

With ``FIRESTORE_EMULATOR_HOST`` set, ``firestore.Client`` talks to the emulator with anonymous
credentials. google.api_core's exceptions are translated into the record's in
:func:`_translate_errors` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

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

T = TypeVar("T")
_BACKOFF_BASE = 0.05  # seconds; doubled per try, full jitter
_BACKOFF_CAP = 2.0
_TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.Aborted,
    gexc.InternalServerError,
    gexc.TooManyRequests,  # includes ResourceExhausted (429)
    gexc.Unknown,
    gexc.RetryError,
    auth_exc.TransportError,
)


@contextlib.contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """The one place where the Google client's exceptions become the record's."""
    try:
        yield
    except _TRANSIENT as exc:
        raise RecordUnavailable(f"firestore record: {operation} failed: {exc}") from exc
    except UnicodeEncodeError as exc:
        # A string Firestore cannot carry (a lone surrogate): no retry can store it.
        raise RecordError(f"firestore record: {operation} failed: {exc}") from exc
    except ValueError as exc:
        # The client reports a transaction that kept aborting as ValueError("Failed to commit
        # transaction in N attempts") caused by Aborted: contention, so retryable.
        if isinstance(exc.__cause__, gexc.Aborted):
            raise RecordUnavailable(f"firestore record: {operation} failed: {exc}") from exc
        raise
    except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError) as exc:
        raise RecordError(f"firestore record: {operation} failed: {exc}") from exc


class FirestoreRecord:
    """The delivery record in Firestore; safe to share between threads (the client is)."""

    def __init__(
        self,
        *,
        database: str = "(default)",
        project: str | None = None,
        collection: str = "mailpipe_mails",
        client: firestore.Client | None = None,
        ttl_days: int = 30,
        idempotency_collection: str = "mailpipe_idempotency",
        max_attempts: int = 10,
        clock: Callable[[], dt.datetime] = lifecycle.utc_now,
    ) -> None:
        if ttl_days < 1:
            raise ValueError("ttl_days must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        with _translate_errors("open"):
            self._client = client or firestore.Client(project=project, database=database)
        self._owns_client = client is None
        self.collection = collection
        self.idempotency_collection = idempotency_collection
        self._mails = self._client.collection(collection)
        self._keys = self._client.collection(idempotency_collection)
        self._ttl = dt.timedelta(days=ttl_days)
        # How often a transaction is tried when Firestore aborts it because of contention.
        self._max_attempts = max_attempts
        self._clock = clock

    # --- helpers -----------------------------------------------------------------------------

    def _fields(self, record: MailRecord) -> dict[str, Any]:
        fields = lifecycle.to_fields(record, lambda d: d)
        fields["expire_at"] = record.accepted_at + self._ttl
        return fields

    @staticmethod
    def _decode(snapshot: Any) -> MailRecord | None:
        if not snapshot.exists:
            return None
        return lifecycle.from_fields(snapshot.to_dict(), lambda v: v)

    def _read(self, transaction: Any, mail_id: str) -> MailRecord | None:
        return self._decode(self._mails.document(mail_id).get(transaction=transaction))

    def _transact(self, operation: str, body: Callable[[Any], T]) -> T:
        """Run ``body(transaction)`` atomically, retrying contention; ``body`` may run again."""
        with _translate_errors(operation):
            for attempt in range(1, self._max_attempts + 1):
                # One try per transaction object, and our own backoff between tries: the client
                # retries an aborted commit at once and never an aborted read, so contenders that
                # aborted together (the emulator aborts every waiter after a ~2 s lock timeout)
                # would collide again. Random, growing gaps let one of them go first.
                transaction = self._client.transaction(max_attempts=1)
                try:
                    return firestore.transactional(body)(transaction)
                except (gexc.Aborted, ValueError) as exc:
                    aborted = isinstance(exc, gexc.Aborted) or isinstance(
                        exc.__cause__, gexc.Aborted
                    )
                    if not aborted or attempt == self._max_attempts:
                        raise
                time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)))  # noqa: S311
        raise AssertionError("unreachable")  # pragma: no cover

    # --- the DeliveryRecord interface ----------------------------------------------------------

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
        mail_ref = self._mails.document(mail_id)
        key_ref = (
            self._keys.document(lifecycle.key_hash(idempotency_key, idempotency_scope))
            if idempotency_key is not None
            else None
        )

        def body(transaction: Any) -> Reservation:
            now = self._clock()
            key_is_stale = False
            expired_holder = None
            if key_ref is not None:
                key = key_ref.get(transaction=transaction)
                if key.exists:
                    holder = self._read(transaction, key.get("mail_id"))
                    if holder is not None and not lifecycle.reservation_expired(holder, now):
                        return Reservation(created=False, record=holder)
                    # Its mail expired first or was deleted, or it is a reservation left by a
                    # crash (accepting past reserved_until): take the key over.
                    key_is_stale = True
                    expired_holder = holder
            existing = self._read(transaction, mail_id)
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
            if expired_holder is not None:
                transaction.delete(self._mails.document(expired_holder.mail_id))
            transaction.create(mail_ref, self._fields(record))
            if key_ref is not None:
                key_fields = {"mail_id": mail_id, "expire_at": record.accepted_at + self._ttl}
                if key_is_stale:
                    transaction.set(key_ref, key_fields)
                else:
                    transaction.create(key_ref, key_fields)
            return Reservation(created=True, record=record)

        return self._transact("reserve", body)

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

        def body(transaction: Any) -> None:
            record = lifecycle.queued(
                self._read(transaction, mail_id),
                mail_id,
                message_id=message_id,
                trace_id=trace_id,
                now=self._clock(),
                accepted_at=accepted_at,
                recipient_domains=recipient_domains,
            )
            transaction.set(self._mails.document(mail_id), self._fields(record))

        self._transact("mark_queued", body)

    def release(self, mail_id: str) -> None:
        if lifecycle.mail_id_problem(mail_id):
            return  # no record can have this id

        def body(transaction: Any) -> None:
            record = self._read(transaction, mail_id)
            if record is None or not lifecycle.releasable(record):
                return
            self._delete_reservation(transaction, record)

        self._transact("release", body)

    def _delete_reservation(self, transaction: Any, record: MailRecord) -> None:
        """Delete ``record`` and its key document if the key still points at it (reads first:
        Firestore transactions read everything before they write)."""
        key_ref = None
        key_hash = lifecycle.record_key_hash(record)
        if key_hash is not None:
            key_ref = self._keys.document(key_hash)
            key = key_ref.get(transaction=transaction)
            if not key.exists or key.get("mail_id") != record.mail_id:
                key_ref = None  # not ours (any more): leave it alone
        transaction.delete(self._mails.document(record.mail_id))
        if key_ref is not None:
            transaction.delete(key_ref)

    def release_expired_reservation(self, mail_id: str) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(transaction: Any) -> MailRecord | None:
            record = self._read(transaction, mail_id)
            if record is None or not lifecycle.reservation_expired(record, self._clock()):
                return None
            self._delete_reservation(transaction, record)
            return record

        return self._transact("release_expired_reservation", body)

    def mark_unconfirmed(self, mail_id: str, *, grace_seconds: float) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(transaction: Any) -> MailRecord | None:
            record = self._read(transaction, mail_id)
            now = self._clock()
            if record is None or not lifecycle.delivery_stalled(record, now, grace_seconds):
                return None
            new = lifecycle.unconfirmed(record, now=now)
            transaction.set(self._mails.document(mail_id), self._fields(new))
            return new

        return self._transact("mark_unconfirmed", body)

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

        def body(transaction: Any) -> Claim:
            claim, new = lifecycle.claimed(
                self._read(transaction, mail_id),
                mail_id,
                message_id=message_id,
                trace_id=trace_id,
                lease_seconds=lease_seconds,
                now=self._clock(),
                accepted_at=accepted_at,
                recipient_domains=recipient_domains,
            )
            if new is not None:
                transaction.set(self._mails.document(mail_id), self._fields(new))
            return claim

        return self._transact("claim", body)

    def renew_lease(
        self, mail_id: str, *, attempt_number: int, lease_seconds: float
    ) -> LeaseRenewal:
        def body(transaction: Any) -> LeaseRenewal:
            renewal, new = lifecycle.lease_renewed(
                self._read(transaction, mail_id),
                mail_id,
                attempt_number=attempt_number,
                lease_seconds=lease_seconds,
                now=self._clock(),
            )
            if new is not None:
                transaction.set(self._mails.document(mail_id), self._fields(new))
            return renewal

        return self._transact("renew_lease", body)

    def finish(self, mail_id: str, attempt: Attempt) -> MailRecord:
        lifecycle.check_mail_id(mail_id)

        def body(transaction: Any) -> MailRecord:
            record = lifecycle.finished(
                self._read(transaction, mail_id), mail_id, attempt, now=self._clock()
            )
            transaction.set(self._mails.document(mail_id), self._fields(record))
            return record

        return self._transact("finish", body)

    def mark_dead_lettered(self, mail_id: str, *, last_error: str | None) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id

        def body(transaction: Any) -> MailRecord | None:
            record = self._read(transaction, mail_id)
            if record is None:
                return None
            new = lifecycle.dead_lettered(record, last_error=last_error, now=self._clock())
            if new is not record:
                transaction.set(self._mails.document(mail_id), self._fields(new))
            return new

        return self._transact("mark_dead_lettered", body)

    def mark_replayed(self, mail_id: str, *, trace_id: str | None) -> MailRecord:
        lifecycle.check_mail_id(mail_id)

        def body(transaction: Any) -> MailRecord:
            record = lifecycle.replayed(
                self._read(transaction, mail_id), mail_id, trace_id=trace_id, now=self._clock()
            )
            transaction.set(self._mails.document(mail_id), self._fields(record))
            return record

        return self._transact("mark_replayed", body)

    def get(self, mail_id: str) -> MailRecord | None:
        if lifecycle.mail_id_problem(mail_id):
            return None  # no record can have this id (and Firestore would refuse the path)
        with _translate_errors("get"):
            return self._decode(self._mails.document(mail_id).get())

    def get_by_idempotency_key(self, key: str, *, scope: str | None = None) -> MailRecord | None:
        with _translate_errors("get_by_idempotency_key"):
            held = self._keys.document(lifecycle.key_hash(key, scope)).get()
            if not held.exists:
                return None
            return self._decode(self._mails.document(held.get("mail_id")).get())

    def list(
        self,
        *,
        status: MailStatus | None = None,
        since: dt.datetime | None = None,
        limit: int = 100,
        page_token: str | None = None,
    ) -> Page:
        lifecycle.check_limit(limit)
        query: Any = self._mails
        if status is not None:
            query = query.where(filter=FieldFilter("status", "==", str(MailStatus(status))))
        if since is not None:
            query = query.where(filter=FieldFilter("accepted_at", ">=", lifecycle.utc(since)))
        query = query.order_by("accepted_at").order_by("__name__")
        if page_token is not None:
            after_at, after_id = lifecycle.parse_page_token(page_token)
            query = query.start_after([after_at, after_id])
        query = query.limit(limit + 1)  # one more tells whether there is a next page
        with _translate_errors("list"):
            records = [self._decode(snapshot) for snapshot in query.stream()]
        items = [r for r in records[:limit] if r is not None]
        token = lifecycle.page_token(items[-1]) if len(records) > limit else None
        return Page(items=items, next_page_token=token)

    def oldest_undelivered(self) -> MailRecord | None:
        query = (
            self._mails.where(
                filter=FieldFilter("status", "in", [str(s) for s in lifecycle.UNDELIVERED])
            )
            .order_by("accepted_at")
            .order_by("__name__")
            .limit(1)
        )
        with _translate_errors("oldest_undelivered"):
            for snapshot in query.stream():
                return self._decode(snapshot)
        return None

    def close(self) -> None:
        """Close the client if this record created it."""
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"FirestoreRecord(collection={self._mails.id!r})"
