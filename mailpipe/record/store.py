"""The storage contract of the delivery record: the primitives a backend implements, over which
:class:`mailpipe.record.base.DeliveryRecord` writes the rules once.

A *document* is a dict of plain values (str, int, float, bool, None, datetime, lists and dicts
of them) under a string id in a :class:`Kind` (an SQLite table, a Firestore collection).
:meth:`Store.transact` runs a function atomically with a :class:`Transaction`; the function reads
everything before it writes (Firestore's rule) and may run again when the backend retries
contention. A new kind of document is one :class:`Kind` in :data:`KINDS`; a new field is a field
of its dataclass, which :func:`encode` and :func:`decode` follow by its type hints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Document = dict[str, Any]
# (field, op, value), op one of "==", ">=", "in": Firestore's spelling, which SQLite translates.
Condition = tuple[str, str, Any]
Cursor = tuple[Any, str] | None  # (order field's value, id) of the last document seen
Clock = Callable[[], dt.datetime]


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of document: its name and the fields queries filter or order on."""

    name: str  # the SQLite table; Firestore's collection is mailpipe_<name> unless configured
    indexed: tuple[str, ...] = ()
    # Orders SQLite indexes (each then by id). Firestore's composite indexes are in Terraform.
    orders: tuple[tuple[str, ...], ...] = ()


# One document per mail, id = mail id: the fields of MailRecord.
MAILS = Kind("mails", ("status", "accepted_at"), (("accepted_at",), ("status", "accepted_at")))
# One document per idempotency key in its scope, id = key_hash(): {"mail_id": …}. Written in the
# transaction that writes its mail, so a key is only ever held by one mail.
IDEMPOTENCY = Kind("idempotency")
# One document per suppressed recipient, id = its key (mailpipe.record.suppressions).
SUPPRESSIONS = Kind(
    "suppressions",
    ("reason", "domain", "created_at"),
    (("created_at",), ("reason", "created_at"), ("domain", "created_at")),
)
KINDS = (MAILS, IDEMPOTENCY, SUPPRESSIONS)


class Transaction(Protocol):
    """Reads and writes inside one :meth:`Store.transact`. ``put`` writes a document whole;
    with ``new`` it must not exist yet. ``retain_from``: when the document's retention starts
    (Firestore's TTL counts from it; SQLite keeps everything; None: kept until deleted)."""

    def get(self, kind: Kind, doc_id: str) -> Document | None: ...

    def put(
        self, kind: Kind, doc_id: str, doc: Document, retain_from: dt.datetime | None, new: bool
    ) -> None: ...

    def delete(self, kind: Kind, doc_id: str) -> None: ...


class Store(Protocol):
    """A backend. It raises :class:`mailpipe.record.RecordError` (``RecordUnavailable`` when a
    retry may succeed), translated from its client's errors in one place. ``get_many``: the
    documents of those ids that exist, by id, in one round trip; ``query``: the documents
    matching every condition, ordered by ``(order, id)``, after the cursor ``after``."""

    def transact(self, operation: str, body: Callable[[Transaction], T]) -> T: ...

    def get_many(self, kind: Kind, doc_ids: Sequence[str]) -> dict[str, Document]: ...

    def query(
        self, kind: Kind, where: Sequence[Condition], order: str, after: Cursor, limit: int
    ) -> list[Document]: ...

    def close(self) -> None: ...


# --- the stored form of a dataclass ---------------------------------------------------------


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def encode(value: Any, time: Callable[[dt.datetime], Any] = lambda d: d) -> Any:
    """A dataclass (and what it holds) as plain values; ``time`` converts each datetime."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name), time) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [encode(item, time) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return time(value) if isinstance(value, dt.datetime) else value


def decode(cls: type[T], doc: typing.Mapping[str, Any]) -> T:
    """The inverse of :func:`encode` (times as datetimes or ISO text); fields the document lacks
    (written before the field existed) take the dataclass' default, unknown ones are ignored."""
    converters = _CONVERTERS.get(cls) or _CONVERTERS.setdefault(cls, _converters(cls))
    return cls(**{name: to(doc[name]) for name, to in converters if doc.get(name) is not None})


# Per dataclass, once: (field, function from its stored value); reading a page stays cheap.
_CONVERTERS: dict[type, list[tuple[str, Callable[[Any], Any]]]] = {}


def _converters(cls: type) -> list[tuple[str, Callable[[Any], Any]]]:
    return [(name, _converter(hint)) for name, hint in typing.get_type_hints(cls).items()]


def _converter(hint: Any) -> Callable[[Any], Any]:
    if isinstance(hint, types.UnionType):  # X | None: the value is not None when converted
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is dt.datetime:
        return lambda v: utc(v if isinstance(v, dt.datetime) else dt.datetime.fromisoformat(v))
    if typing.get_origin(hint) is tuple:
        item = _converter(typing.get_args(hint)[0])
        return lambda v: tuple(map(item, v))
    if dataclasses.is_dataclass(hint):
        return lambda v: decode(typing.cast(type, hint), v)
    return typing.cast(Callable[[Any], Any], hint)  # str, int, enums


# --- ids and keys ---------------------------------------------------------------------------

# Firestore's document-id rules (firebase.google.com/docs/firestore/quotas, "Collections,
# documents, and fields"): the emulator and production refuse these ids, or (with "/") read them
# as a path into another collection. Every backend applies them, so a local run refuses what
# production would.
MAX_ID_BYTES = 1500
_RESERVED_ID = re.compile(r"__.*__", re.DOTALL)


def id_problem(doc_id: object) -> str | None:
    """Why ``doc_id`` cannot name a document, or ``None``."""
    if not isinstance(doc_id, str) or not doc_id:
        return "must be a non-empty string"
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    problems = (
        (size > MAX_ID_BYTES, f"is {size} bytes long in UTF-8; at most {MAX_ID_BYTES}"),
        ("/" in doc_id, "must not contain '/'"),
        (doc_id in (".", ".."), "must not be '.' or '..'"),
        (bool(_RESERVED_ID.fullmatch(doc_id)), "must not start and end with '__' (reserved)"),
    )
    return next((problem for broken, problem in problems if broken), None)


def key_hash(idempotency_key: str, scope: str | None = None) -> str:
    """The stored form of an idempotency key in its scope: fixed length, safe as a document id.

    The shared scope (``None``) hashes the key alone (as records written before scopes did); a
    caller's scope is length-prefixed and joined with a line feed, which no key the API accepts
    contains, so no two (scope, key) pairs share a hash.
    """
    text = idempotency_key if scope is None else f"{len(scope)}:{scope}\n{idempotency_key}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
