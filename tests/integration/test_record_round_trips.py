"""How many record round trips the subscriber's record writes take, on the real SQLite store.

The record's store is wrapped (injected, not patched) to count what reaches it: on Firestore each
call is a billed read or write and a network round trip, so one per operation is what a user of
the dead-letter consumer and the suppression list gets.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.trace import NoOpTracer

from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import DeliveryRecord, MailStatus, SuppressionPolicy
from mailpipe.record.sqlite import SqliteStore
from mailpipe.record.store import Document, Kind, Transaction
from subscriber.dead_letters import DeadLetterRecorder
from subscriber.delivery import ReceivedMessage
from subscriber.suppression import RecipientScreen

T = TypeVar("T")
POLICY = SuppressionPolicy("hashed", b"0123456789abcdef0123456789abcdef-test")


class CountingStore:
    """A store that notes each call that reaches the backend: ``(method, operation or kind)``."""

    def __init__(self, store: SqliteStore) -> None:
        self.store, self.calls = store, list[tuple[str, str]]()

    def transact(self, operation: str, body: Callable[[Transaction], T]) -> T:
        self.calls.append(("transact", operation))
        return self.store.transact(operation, body)

    def get_many(self, kind: Kind, doc_ids: Sequence[str]) -> dict[str, Document]:
        self.calls.append(("get_many", kind.name))
        return self.store.get_many(kind, doc_ids)

    def query(self, *args: Any) -> list[Document]:
        self.calls.append(("query", args[0].name))
        return self.store.query(*args)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    counting = CountingStore(SqliteStore(tmp_path / "record.sqlite3", busy_timeout=5.0))
    yield counting
    counting.close()


def queued(*recipients: str, deliver_by: dt.datetime | None = None) -> QueuedMail:
    request = {"from": "a@example.com", "to": list(recipients), "subject": "s", "text": "t"}
    mail = QueuedMail.accept(MailRequest.model_validate(request))
    return mail.model_copy(update={"deliver_by": deliver_by})


@pytest.mark.parametrize("past_deliver_by", [False, True])
def test_a_dead_letter_is_marked_in_one_transaction(
    store: CountingStore, past_deliver_by: bool
) -> None:
    record = DeliveryRecord(store)  # the SqliteStore, counted
    now = dt.datetime.now(dt.UTC)
    mail = queued(
        "b@example.org", deliver_by=now - dt.timedelta(minutes=1) if past_deliver_by else None
    )
    record.claim(mail.mail_id, message_id="1", trace_id=None, lease_seconds=60, accepted_at=now)
    data, attributes = mail.to_pubsub()
    recorder = DeadLetterRecorder(record=record, tracer=NoOpTracer())
    store.calls.clear()

    assert recorder.handle(ReceivedMessage(data, attributes, "2"), parent=None)

    assert store.calls == [("transact", "mark_dead_lettered")]
    marked = record.get(mail.mail_id)
    assert marked is not None
    if past_deliver_by:
        assert marked.status is MailStatus.EXPIRED
        assert marked.next_attempt_at is None and marked.lease_until is None
        assert marked.last_error is not None and "passed; last error" in marked.last_error
    else:
        assert marked.status is MailStatus.DEAD_LETTERED
        assert marked.next_attempt_at is not None and marked.next_attempt_at > now
        assert marked.lease_until is not None  # the claim's lease is left as it was


def test_a_dead_letter_without_a_record_or_with_an_impossible_id_is_acked(
    store: CountingStore,
) -> None:
    recorder = DeadLetterRecorder(record=DeliveryRecord(store), tracer=NoOpTracer())
    mail = queued("b@example.org")
    data, attributes = mail.to_pubsub()
    assert recorder.handle(ReceivedMessage(data, attributes, "1"), parent=None)
    assert recorder.handle(
        ReceivedMessage(data, {**attributes, "mail_id": "a/b"}, "2"), parent=None
    )


def test_a_mails_refusals_are_suppressed_in_one_write(store: CountingStore) -> None:
    record = DeliveryRecord(store)
    screen = RecipientScreen(record.suppressions(POLICY), "hashed")
    mail = queued("gone@example.org", "moved@example.org", "policy@example.org", "ok@example.org")
    refused = {
        "gone@example.org": (550, "5.1.1 no such user"),
        "moved@example.org": (551, "5.1.6 moved, no forwarding"),
        "policy@example.org": (550, "5.7.1 relaying denied"),
    }

    results = screen.learn(mail, refused)

    assert store.calls == [("transact", "suppress")]
    assert {(r.reply_code, r.enhanced_status) for r in results} == {
        (550, "5.1.1"),
        (551, "5.1.6"),
        (550, "5.7.1"),
    }
    listing = record.suppressions(POLICY)
    found = listing.lookup(["gone@example.org", "moved@example.org", "policy@example.org"])
    assert set(found) == {"gone@example.org", "moved@example.org"}
    assert {(e.reason, e.mail_id, e.reply) for e in found.values()} == {
        ("bounce", mail.mail_id, "550 5.1.1 no such user"),
        ("bounce", mail.mail_id, "551 5.1.6 moved, no forwarding"),
    }
