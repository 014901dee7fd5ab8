"""``mailpipe dlq replay --due`` (ops/replay.py) on a copy whose record has no ``deliver_by`` (a
record from before issue 19): the give-up time comes from the copy's ``deliver_by`` attribute,
and the copy is decoded once for that and the event together, on the expire path and on the
replay path.

Real parts: Google's Pub/Sub emulator (the dead-letter copy, the republish, the events topic),
an SQLite record. The one stand-in is a spy around ``QueuedMail.from_pubsub`` that counts the
decodes made by this thread (the replay pass): the number of decodes is what is under test, and
nothing else shows it. It calls the real decoder.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from emulator import RunningEmulator, publisher_client, subscriber_client
from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.pubsub import publisher_client as tracing_publisher_client
from mailpipe.record.sqlite import SqliteRecord
from mailpipe.topology import Topology
from ops.replay import DeadLetterReplayer, Selection
from tests.integration.test_delivery_events import EventReader


@pytest.fixture
def record(tmp_path: Path) -> Iterator[SqliteRecord]:
    opened = SqliteRecord(tmp_path / "record.sqlite3")
    yield opened
    opened.close()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The mail ids decoded by this thread from now on."""
    seen: list[str] = []
    real = QueuedMail.from_pubsub
    here = threading.get_ident()

    def counting(cls: type[QueuedMail], data: bytes, attributes: Any = None) -> QueuedMail:
        mail = real(data, attributes)
        if threading.get_ident() == here:
            seen.append(mail.mail_id)
        return mail

    monkeypatch.setattr(QueuedMail, "from_pubsub", classmethod(counting))
    return seen


@pytest.mark.parametrize(
    ("deliver_by", "next_attempt_at", "status", "event"),
    [
        # Offsets from the test's start (not collection's: a full run can take over an hour).
        (-dt.timedelta(seconds=1), None, "expired", EventType.EXPIRED),
        (dt.timedelta(hours=1), -dt.timedelta(seconds=1), "replayed", "replayed"),
    ],
    ids=["expired", "replayed"],
)
def test_a_due_pass_decodes_each_copy_once(
    apply_mail_topology: Any,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    record: SqliteRecord,
    decodes: list[str],
    deliver_by: dt.timedelta,
    next_attempt_at: dt.timedelta | None,
    status: str,
    event: str,
) -> None:
    now = dt.datetime.now(dt.UTC)
    topology: Topology = apply_mail_topology()
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["erin@example.org"], "text": "t"}
        )
    ).model_copy(update={"deliver_by": now + deliver_by})
    record.reserve(
        mail_id=mail.mail_id,
        accepted_at=mail.accepted_at,
        recipient_domains=("example.org",),
        idempotency_key=None,
    )
    record.mark_queued(mail.mail_id, message_id="1", trace_id=None)
    due = None if next_attempt_at is None else now + next_attempt_at
    record.mark_dead_lettered(mail.mail_id, last_error="451", next_attempt_at=due)
    assert record.get(mail.mail_id).deliver_by is None  # type: ignore[union-attr]
    data, attributes = mail.to_pubsub()
    copies = publisher_client(pubsub_emulator.host)
    topics = f"projects/{pubsub_project}/topics"
    dead_letter_topic = f"{topics}/{topology.dead_letter_topic.name}"
    copies.publish(dead_letter_topic, data, **attributes).result(timeout=10)
    copies.stop()
    reader = EventReader(pubsub_emulator, pubsub_project, topology.events_topic.name)
    publisher = tracing_publisher_client(pubsub_emulator.host, tracing=True)
    subscriber = subscriber_client(pubsub_emulator.host)
    emitter = EventEmitter(publisher, f"{topics}/{topology.events_topic.name}")
    try:
        decodes.clear()
        report = DeadLetterReplayer(
            subscriber=subscriber,
            publisher=publisher,
            record=record,
            tracer=TracerProvider().get_tracer("test"),
            dead_letter_subscription=subscriber.subscription_path(
                pubsub_project, topology.dead_letter_subscription.name
            ),
            topic=f"{topics}/{topology.mail_topic.name}",
            return_immediately=True,
            events=emitter,
        ).replay(Selection(due=True))
        emitted = reader.until(mail.mail_id, event)[-1]
    finally:
        emitter.close()  # stops its publisher, the replay's too
        subscriber.close()
        reader.close()

    [outcome] = report.outcomes
    assert (outcome.mail_id, str(outcome.status)) == (mail.mail_id, status)
    assert record.get(mail.mail_id).status == status  # type: ignore[union-attr]
    assert emitted["recipient_domains"] == ["example.org"]  # from the decoded copy
    assert decodes == [mail.mail_id]
