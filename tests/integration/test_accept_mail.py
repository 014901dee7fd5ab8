"""publisher.app.accept_mail on its own, without HTTP: real Pub/Sub emulator, SQLite record."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator import RunningEmulator
from mailpipe.mail import QueuedMail
from mailpipe.record import DeliveryRecord, MailStatus
from mailpipe.record.sqlite import SqliteRecord
from publisher.app import Answer, ApiError, ApiServices, accept_mail, accept_mails
from tests.fixtures.publishing import Publishing, publishing

MAIL: dict[str, Any] = {
    "from": "Ada <ada@example.com>",
    "to": ["bob@example.org"],
    "subject": "Hello",
    "text": "Hi Bob",
}


@dataclass
class Accepting:
    services: ApiServices
    parts: Publishing

    @property
    def record(self) -> DeliveryRecord:
        return self.parts.record

    def published(self, expect: int) -> list[QueuedMail]:
        """Mails on the topic since the last call; polls until ``expect`` arrived (or 10 s)."""
        return self.parts.published(expect)


@pytest.fixture(scope="module")
def accepting(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Accepting]:
    record_dir = tmp_path_factory.mktemp("accept")
    with publishing(pubsub_emulator, pubsub_project, record_dir) as parts:
        services = ApiServices(
            config=parts.config,
            publisher=parts.publisher,
            record=parts.record,
            now=lambda: dt.datetime.now(dt.UTC),
        )
        yield Accepting(services, parts)


def test_an_accepted_mail_is_published_and_recorded_queued(accepting: Accepting) -> None:
    answer = accept_mail(accepting.services, dict(MAIL))

    assert answer.status == 202
    mail_id = answer.body["mail_id"]
    assert answer.body["status"] == "queued"
    assert answer.headers == {"Location": f"/v1/messages/{mail_id}"}
    assert [m.mail_id for m in accepting.published(expect=1)] == [mail_id]
    found = accepting.record.get(mail_id)
    assert found is not None and found.status == MailStatus.QUEUED
    assert found.message_id == answer.body["message_id"]


def test_a_retry_with_the_same_key_is_answered_from_the_record(accepting: Accepting) -> None:
    key = f"order-{uuid.uuid4().hex}"
    first = accept_mail(accepting.services, dict(MAIL), key_in_header=key, scope=lambda: "team-a")
    assert len(accepting.published(expect=1)) == 1

    again = accept_mail(accepting.services, dict(MAIL), key_in_header=key, scope=lambda: "team-a")

    assert again.status == 202
    assert again.body == first.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert accepting.published(expect=0) == []  # not published twice
    # Another caller's scope: the same key is a new mail.
    other = accept_mail(accepting.services, dict(MAIL), key_in_header=key, scope=lambda: "team-b")
    assert other.body["mail_id"] != first.body["mail_id"]
    assert len(accepting.published(expect=1)) == 1


def test_a_key_reused_for_another_mail_is_refused(accepting: Accepting) -> None:
    key = f"order-{uuid.uuid4().hex}"
    accept_mail(accepting.services, {**MAIL, "idempotency_key": key})
    accepting.published(expect=1)

    with pytest.raises(ApiError) as info:
        accept_mail(accepting.services, {**MAIL, "subject": "Other", "idempotency_key": key})

    assert info.value.status == 422
    assert info.value.code == "idempotency_key_reused"
    assert accepting.published(expect=0) == []


def test_an_invalid_mail_is_refused_with_its_fields_and_nothing_is_published(
    accepting: Accepting,
) -> None:
    with pytest.raises(ApiError) as info:
        accept_mail(accepting.services, {**MAIL, "to": ["not an address"]})

    assert info.value.status == 400
    assert info.value.code == "invalid_request"
    assert "to.0" in info.value.fields
    assert accepting.published(expect=0) == []


def test_header_and_body_keys_must_agree(accepting: Accepting) -> None:
    with pytest.raises(ApiError) as info:
        accept_mail(accepting.services, {**MAIL, "idempotency_key": "a"}, key_in_header="b")

    assert info.value.status == 400
    assert info.value.fields == {"idempotency_key": "differs from the Idempotency-Key header"}


def test_a_batch_is_recorded_queued_in_one_write_and_accepted_even_when_that_write_fails(
    accepting: Accepting, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    answers = accept_mails(accepting.services, [dict(MAIL), {"to": []}, dict(MAIL)])
    assert [getattr(a, "status", None) for a in answers] == [202, 400, 202]
    for answer in (answers[0], answers[2]):
        assert isinstance(answer, Answer)
        found = accepting.record.get(answer.body["mail_id"])
        assert found is not None and found.status is MailStatus.QUEUED
        assert (found.message_id, found.trace_id) == (
            answer.body["message_id"],
            answer.body["trace_id"],
        )
    assert len(accepting.published(expect=2)) == 2

    # The record's write lock held elsewhere past its busy timeout: the mails are on Pub/Sub,
    # so they are accepted all the same (the subscriber's claim records them).
    locked = SqliteRecord(tmp_path / "record.sqlite3", busy_timeout=0.1)
    holder = sqlite3.connect(tmp_path / "record.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        services = dataclasses.replace(accepting.services, record=locked)
        answers = accept_mails(services, [dict(MAIL), dict(MAIL)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    mail_ids = [a.body["mail_id"] for a in answers if isinstance(a, Answer) and a.status == 202]
    assert len(mail_ids) == 2
    assert sorted(m.mail_id for m in accepting.published(expect=2)) == sorted(mail_ids)
    warned = [r.getMessage() for r in caplog.records if "could not mark" in r.getMessage()]
    assert warned == [f"could not mark mail {m} queued; the subscriber will" for m in mail_ids]
    assert [locked.get(m) for m in mail_ids] == [None, None]
    locked.close()


class _GroupsSeen(DeliveryRecord):
    """The real record, noting the size of each `mark_queued_many` call."""

    groups: list[int]

    def mark_queued_many(self, mails: Any) -> Any:
        self.groups.append(len(mails))
        return super().mark_queued_many(mails)


def test_a_large_batch_is_recorded_a_group_at_a_time(accepting: Accepting) -> None:
    # One contended Firestore transaction must not cost a whole 500-mail request its record.
    record = _GroupsSeen(accepting.record.store)
    record.groups = []
    services = dataclasses.replace(accepting.services, record=record)

    answers = accept_mails(services, [dict(MAIL) for _ in range(250)])

    assert [getattr(a, "status", None) for a in answers] == [202] * 250
    assert record.groups == [100, 100, 50]
    statuses = {record.get(a.body["mail_id"]).status for a in answers if isinstance(a, Answer)}
    assert statuses == {MailStatus.QUEUED}
    assert len(accepting.published(expect=250)) == 250
