"""Mail ids the record cannot key, on both backends (SQLite and the Firestore emulator).

Firestore refuses some document ids outright ("..", "__x__", over 1,500 bytes), reads others as a
path into another collection ("a/b/c"), and the client cannot even encode a lone surrogate. Every
backend applies the same rules before any path is built: reads of such an id find nothing,
writes raise InvalidMailId (a RecordError), and a page token naming one is malformed — never a
raw client error, never a document outside the record's collection.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import firestore

from mailpipe.record import (
    Attempt,
    DeliveryRecord,
    InvalidMailId,
    MailRecord,
    MailStatus,
    RecordError,
)
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.record.sqlite import SqliteRecord
from ops.replay import mark_replayed
from publisher.listing import list_mails, token_after

INVALID_IDS = [
    "",
    ".",
    "..",
    "a/b",
    "a/b/c",  # Firestore would read mailpipe_mails/a/b/c: a document in another collection
    "__x__",
    "__id5__",
    "x" * 1501,
    "é" * 751,  # 1,502 bytes of UTF-8
    "lone \ud800 surrogate",
]
VALID_ODD_IDS = ["_x_", "a.b", "é" * 750, "with space", "__x"]
NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "firestore"])
def record(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeliveryRecord]:
    opened: DeliveryRecord
    if request.param == "sqlite":
        opened = SqliteRecord(tmp_path / "record.sqlite3")
    else:
        request.getfixturevalue("firestore_emulator")
        suffix = uuid.uuid4().hex[:10]
        opened = FirestoreRecord(
            project=request.getfixturevalue("pubsub_project"),
            collection=f"ids-{suffix}",
            idempotency_collection=f"ids-keys-{suffix}",
        )
    yield opened
    opened.close()


def reserve(record: DeliveryRecord, mail_id: str) -> None:
    record.reserve(
        mail_id=mail_id, accepted_at=NOW, recipient_domains=("example.org",), idempotency_key=None
    )


@pytest.mark.parametrize("mail_id", INVALID_IDS, ids=lambda i: repr(i[:12]))
def test_reads_of_an_invalid_id_find_nothing(record: DeliveryRecord, mail_id: str) -> None:
    assert record.get(mail_id) is None
    assert record.mark_dead_lettered(mail_id, last_error="x") is None
    record.release(mail_id)  # nothing to release


@pytest.mark.parametrize("mail_id", INVALID_IDS, ids=lambda i: repr(i[:12]))
def test_writes_of_an_invalid_id_raise_invalid_mail_id(
    record: DeliveryRecord, mail_id: str
) -> None:
    writes = [
        lambda: reserve(record, mail_id),
        lambda: record.mark_queued(mail_id, message_id="1", trace_id=None, accepted_at=NOW),
        lambda: record.claim(mail_id, message_id="1", trace_id=None, lease_seconds=60),
        lambda: record.finish(mail_id, Attempt(number=1, started_at=NOW, outcome="delivered")),
        lambda: mark_replayed(record, mail_id, trace_id=None),
    ]
    for write in writes:
        with pytest.raises(InvalidMailId) as caught:
            write()
        assert isinstance(caught.value, RecordError)
        assert "mail id" in str(caught.value)


@pytest.mark.parametrize("mail_id", VALID_ODD_IDS)
def test_unusual_but_valid_ids_are_kept(record: DeliveryRecord, mail_id: str) -> None:
    reserve(record, mail_id)
    stored = record.get(mail_id)
    assert stored is not None
    assert stored.mail_id == mail_id


@pytest.mark.parametrize("mail_id", ["a/b", "..", "__x__", "x" * 1501, "\udc00"])
def test_a_page_token_naming_an_invalid_id_is_malformed(
    record: DeliveryRecord, mail_id: str
) -> None:
    token = page_token_for(NOW.isoformat(), mail_id)
    with pytest.raises(ValueError, match="malformed page token"):
        list_mails(record, page_token=token)


@pytest.mark.parametrize(
    "accepted", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999-00:01"]
)
def test_a_page_token_at_the_calendars_edge_is_malformed(
    record: DeliveryRecord, accepted: str
) -> None:
    with pytest.raises(ValueError, match="malformed page token"):
        list_mails(record, page_token=page_token_for(accepted, "m-1"))


@pytest.mark.parametrize(
    "since", [dt.datetime.min.replace(tzinfo=dt.UTC), dt.datetime.max.replace(tzinfo=dt.UTC)]
)
def test_since_at_the_calendars_edge_lists(record: DeliveryRecord, since: dt.datetime) -> None:
    reserve(record, "m-1")
    items = list_mails(record, since=since).items
    assert [r.mail_id for r in items] == (["m-1"] if since.year == 1 else [])


def test_a_firestore_path_id_never_reaches_another_collection(
    firestore_emulator: object, pubsub_project: str
) -> None:
    """The case that is no error at all in Firestore: "x/sub/doc" names a document in the
    subcollection "sub" of document "x". The record must not write (or read) it."""
    suffix = uuid.uuid4().hex[:10]
    record = FirestoreRecord(
        project=pubsub_project, collection=f"ids-{suffix}", idempotency_collection=f"k-{suffix}"
    )
    client = firestore.Client(project=pubsub_project)
    try:
        with pytest.raises(InvalidMailId):
            reserve(record, "x/sub/doc")
        assert not client.collection(f"ids-{suffix}").document("x/sub/doc").get().exists
    finally:
        record.close()
        client.close()


def page_token_for(accepted: str, mail_id: str) -> str:
    """A page token of the record's own shape around any values."""
    raw = json.dumps([accepted, mail_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_page_token_for_matches_the_records_own_tokens() -> None:
    record = MailRecord(mail_id="m-1", status=MailStatus.QUEUED, accepted_at=NOW, updated_at=NOW)
    assert page_token_for(NOW.isoformat(), "m-1") == token_after(record.accepted_at, record.mail_id)


def test_a_value_firestore_cannot_encode_is_a_record_error(
    firestore_emulator: object, pubsub_project: str
) -> None:
    """A lone surrogate in a recorded value (an SMTP reply, say) cannot be sent to Firestore: the
    client's UnicodeEncodeError becomes a RecordError, which the callers handle."""
    suffix = uuid.uuid4().hex[:10]
    record = FirestoreRecord(
        project=pubsub_project, collection=f"ids-{suffix}", idempotency_collection=f"k-{suffix}"
    )
    try:
        reserve(record, "m-1")
        attempt = Attempt(number=1, started_at=NOW, outcome="deferred", reply_message="\ud800")
        with pytest.raises(RecordError):
            record.finish("m-1", attempt)
    finally:
        record.close()
