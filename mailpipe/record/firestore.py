"""The Firestore delivery record (``MAILPIPE_RECORD=firestore://DATABASE``), for GCP.

A collection per :class:`Kind` (``mailpipe_mails``, ``mailpipe_idempotency``), one document per
record document, its fields plus ``expire_at`` = its ``retain_from`` + :data:`TTL` (none when
``retain_from`` is None: ``mailpipe_suppressions``, whose TTL is on its own ``expires_at``).
Terraform sets a TTL policy on ``expire_at`` and the composite indexes of the queries; the emulator
enforces neither. A transaction is a ``@firestore.transactional`` function, tried again when
Firestore aborts it (which makes claims atomic). ``FIRESTORE_EMULATOR_HOST`` points the client
at the emulator. Google's exceptions are translated in :func:`_translate_errors` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from mailpipe.record import store as s
from mailpipe.record.base import DeliveryRecord, RecordError, RecordUnavailable
from mailpipe.record.store import Condition, Cursor, Document, Kind

T = TypeVar("T")
TTL = dt.timedelta(days=30)  # how long Firestore keeps a record (docs/guarantees.md)
MAX_TRIES = 10  # how often a transaction is tried while Firestore aborts it
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


def _aborted(exc: Exception) -> bool:
    # The client reports a transaction that kept aborting as ValueError("Failed to commit
    # transaction in N attempts") caused by Aborted: contention.
    return isinstance(exc, gexc.Aborted) or isinstance(exc.__cause__, gexc.Aborted)


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
        if _aborted(exc):
            raise RecordUnavailable(f"firestore record: {operation} failed: {exc}") from exc
        raise
    except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError) as exc:
        raise RecordError(f"firestore record: {operation} failed: {exc}") from exc


class _Transaction:
    def __init__(self, store: FirestoreStore, transaction: Any) -> None:
        self.store, self.transaction = store, transaction

    def get(self, kind: Kind, doc_id: str) -> Document | None:
        snapshot = self.store.ref(kind, doc_id).get(transaction=self.transaction)
        return snapshot.to_dict() if snapshot.exists else None

    def put(
        self, kind: Kind, doc_id: str, doc: Document, retain_from: dt.datetime | None, new: bool
    ) -> None:
        write = self.transaction.create if new else self.transaction.set
        ttl = {} if retain_from is None else {"expire_at": retain_from + TTL}
        write(self.store.ref(kind, doc_id), {**doc, **ttl})

    def delete(self, kind: Kind, doc_id: str) -> None:
        self.transaction.delete(self.store.ref(kind, doc_id))


class FirestoreStore:
    """Documents in Firestore: a collection per kind, ``collections`` names them by kind name."""

    def __init__(self, client: Any, collections: dict[str, str], owns_client: bool) -> None:
        self.client, self._owns_client = client, owns_client
        self._collections = {
            kind.name: client.collection(collections[kind.name]) for kind in s.KINDS
        }

    def ref(self, kind: Kind, doc_id: str) -> Any:
        return self._collections[kind.name].document(doc_id)

    def transact(self, operation: str, body: Callable[[s.Transaction], T]) -> T:
        """Run ``body`` atomically, retrying contention; ``body`` may run again."""
        with _translate_errors(operation):
            for attempt in range(1, MAX_TRIES + 1):
                # One try per transaction object, and our own backoff between tries: the client
                # retries an aborted commit at once and never an aborted read, so contenders that
                # aborted together (the emulator aborts every waiter after a ~2 s lock timeout)
                # would collide again. Random, growing gaps let one of them go first.
                transaction = self.client.transaction(max_attempts=1)
                try:
                    return firestore.transactional(lambda t: body(_Transaction(self, t)))(
                        transaction
                    )
                except (gexc.Aborted, ValueError) as exc:
                    if not _aborted(exc) or attempt == MAX_TRIES:
                        raise
                time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)))  # noqa: S311
        raise AssertionError("unreachable")  # pragma: no cover

    def get_many(self, kind: Kind, doc_ids: Sequence[str]) -> dict[str, Document]:
        refs = [self.ref(kind, doc_id) for doc_id in doc_ids]
        with _translate_errors("get_many"):  # one BatchGetDocuments call
            found = [snap for snap in self.client.get_all(refs) if snap.exists] if refs else []
        return {snapshot.id: snapshot.to_dict() for snapshot in found}

    def query(
        self, kind: Kind, where: Sequence[Condition], order: str, after: Cursor, limit: int
    ) -> list[Document]:
        query: Any = self._collections[kind.name]
        for field, op, value in where:
            query = query.where(filter=FieldFilter(field, op, value))
        query = query.order_by(order).order_by("__name__")
        if after is not None:
            query = query.start_after(list(after))
        with _translate_errors("query"):
            return [snapshot.to_dict() for snapshot in query.limit(limit).stream()]

    def close(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            self.client.close()


class FirestoreRecord(DeliveryRecord):
    """The delivery record in Firestore; safe to share between threads (the client is)."""

    def __init__(
        self,
        *,
        database: str = "(default)",
        project: str | None = None,
        collection: str = "mailpipe_mails",
        client: firestore.Client | None = None,
        idempotency_collection: str = "mailpipe_idempotency",
        suppressions_collection: str = "mailpipe_suppressions",
        clock: s.Clock = s.utc_now,
    ) -> None:
        with _translate_errors("open"):
            own = client is None
            client = client or firestore.Client(project=project, database=database)
        self.collection, self.idempotency_collection = collection, idempotency_collection
        names = {s.MAILS.name: collection, s.IDEMPOTENCY.name: idempotency_collection}
        names[s.SUPPRESSIONS.name] = suppressions_collection
        super().__init__(FirestoreStore(client, names, own), clock=clock)
