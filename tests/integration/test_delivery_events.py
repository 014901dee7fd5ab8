"""Delivery events end to end (docs/events.md), with real parts only.

Google's Pub/Sub emulator over gRPC, a real aiosmtpd server (scripted replies for the bounce and
the deferral), the publisher over HTTP and the streaming-pull subscriber (``pipeline_factory``
with ``events=True``). The events are read back from a subscription of the events topic, as an
integrator's would be, and with ``mailpipe events tail`` in a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from emulator import RunningEmulator, publisher_client, subscriber_client
from mailpipe.config import AddressStyle
from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.pubsub import publisher_client as tracing_publisher_client
from ops.replay import DeadLetterReplayer, Selection
from tests.fixtures.pipeline import Pipeline, PipelineFactory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EventReader:
    """A pull subscription on the events topic, made before the mails are sent."""

    def __init__(self, emulator: RunningEmulator, project: str, topic: str) -> None:
        self.client = subscriber_client(emulator.host)
        self.subscription = f"projects/{project}/subscriptions/events-test-{uuid.uuid4().hex[:8]}"
        self.client.create_subscription(
            request={"name": self.subscription, "topic": f"projects/{project}/topics/{topic}"}
        )
        self.received: list[tuple[dict[str, Any], dict[str, str]]] = []

    def until(self, mail_id: str, last: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The events of ``mail_id`` in publish order, once one of type ``last`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mine = [e for e, _ in self.received if e["mail_id"] == mail_id]
            if any(e["type"] == last for e in mine):
                return sorted(mine, key=lambda e: (e["occurred_at"], e["attempt"]))
            response = self.client.pull(
                request={
                    "subscription": self.subscription,
                    "max_messages": 100,
                    "return_immediately": True,
                },
                timeout=10,
            )
            if response.received_messages:
                self.client.acknowledge(
                    subscription=self.subscription,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
            for m in response.received_messages:
                self.received.append((json.loads(m.message.data), dict(m.message.attributes)))
            time.sleep(0.1)
        seen = [e["type"] for e, _ in self.received if e["mail_id"] == mail_id]
        raise AssertionError(f"no {last} event for {mail_id}; saw {seen}")

    def attributes_of(self, event: dict[str, Any]) -> dict[str, str]:
        [attributes] = [a for e, a in self.received if e["event_id"] == event["event_id"]]
        return attributes

    def close(self) -> None:
        self.client.delete_subscription(subscription=self.subscription)
        self.client.close()


@pytest.fixture
def events_pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    return pipeline_factory("pull", events=True)


@pytest.fixture
def reader(
    events_pipeline: Pipeline, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> Iterator[EventReader]:
    reader = EventReader(
        pubsub_emulator, pubsub_project, events_pipeline.topology.events_topic.name
    )
    yield reader
    reader.close()


def send(pipeline: Pipeline, to: str, **extra: Any) -> dict[str, Any]:
    response = pipeline.send(to=[to], metadata={"campaign": "spring", "n": 3}, **extra)
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_in_the_mails_trace(
    pipeline: Pipeline, reader: EventReader, events: list[dict[str, Any]], trace_id: str
) -> None:
    """Each event names the mail's trace, carries a traceparent of it, and its publish span
    (``<events topic> create``) is a child of a span of that trace."""
    topic = pipeline.topology.events_topic.name
    spans = pipeline.wait_for_spans(trace_id, {f"{topic} create"})
    by_id = {s.context.span_id: s for s in spans}
    creates = [s for s in spans if s.name == f"{topic} create"]
    assert len(creates) == len(events), [s.name for s in spans]
    for event in events:
        assert event["trace_id"] == trace_id, event
        traceparent = reader.attributes_of(event)["googclient_traceparent"]
        _, trace_hex, span_hex, _ = traceparent.split("-")
        assert trace_hex == trace_id
        [create] = [s for s in creates if format(s.context.span_id, "016x") == span_hex]
        assert create.kind is SpanKind.PRODUCER
        assert create.parent is not None and create.parent.span_id in by_id, create.parent


def test_delivered_mail_emits_accepted_then_delivered_in_its_trace(
    events_pipeline: Pipeline, reader: EventReader
) -> None:
    accepted = send(events_pipeline, "alice@example.org")
    events = reader.until(accepted["mail_id"], EventType.DELIVERED)
    assert [e["type"] for e in events] == ["accepted", "delivered"]
    accepted_event, delivered = events
    assert accepted_event["attempt"] == 0 and delivered["attempt"] == 1
    assert delivered["reply_code"] == 250
    for event in events:
        assert event["mail_id"] == accepted["mail_id"]
        assert event["recipient_domains"] == ["example.org"]
        # The default address policy (domain) keeps no full address anywhere in the event.
        assert "alice@" not in json.dumps(event)
        assert event["recipients"] == ["@example.org"]
        assert event["metadata"] == {"campaign": "spring", "n": 3}
        assert event["schema_version"] == 1
        assert reader.attributes_of(event)["event_type"] == event["type"]
    assert_in_the_mails_trace(events_pipeline, reader, events, accepted["trace_id"])
    # accepted is published inside the HTTP request's span, delivered inside `mail deliver`.
    spans = events_pipeline.wait_for_spans(accepted["trace_id"], {"mail deliver"})
    names = {s.context.span_id: s.name for s in spans}
    creates = [s for s in spans if s.name == f"{events_pipeline.topology.events_topic.name} create"]
    assert sorted(names[s.parent.span_id] for s in creates if s.parent) == [
        "POST /v1/messages",
        "mail deliver",
    ]


def test_bounce_emits_bounced_with_the_relays_reply(
    events_pipeline: Pipeline, reader: EventReader
) -> None:
    events_pipeline.smtp.fail("rcpt", 550, "5.1.1 <nobody@example.net>: no such user")
    accepted = send(events_pipeline, "nobody@example.net")
    events = reader.until(accepted["mail_id"], EventType.BOUNCED)
    assert [e["type"] for e in events] == ["accepted", "bounced"]
    bounced = events[1]
    assert (bounced["reply_code"], bounced["enhanced_status"]) == (550, "5.1.1")
    assert "no such user" in bounced["reply"] and "nobody@" not in bounced["reply"]
    assert bounced["recipient_domains"] == ["example.net"]
    assert_in_the_mails_trace(events_pipeline, reader, events, accepted["trace_id"])


def test_deferral_emits_deferred_with_attempt_and_reply_then_delivered(
    events_pipeline: Pipeline, reader: EventReader
) -> None:
    events_pipeline.smtp.fail("rcpt", 451, "4.3.0 try again later", times=1)
    accepted = send(events_pipeline, "later@example.com")
    events = reader.until(accepted["mail_id"], EventType.DELIVERED)
    assert [(e["type"], e["attempt"]) for e in events] == [
        ("accepted", 0),
        ("deferred", 1),
        ("delivered", 2),
    ]
    deferred = events[1]
    assert (deferred["reply_code"], deferred["enhanced_status"]) == (451, "4.3.0")
    assert "try again later" in deferred["reply"]
    assert len({e["event_id"] for e in events}) == 3
    assert_in_the_mails_trace(events_pipeline, reader, events, accepted["trace_id"])


def test_emission_failure_loses_nothing(
    pipeline_factory: PipelineFactory,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the events topic gone, every publish of an event fails: the mail is still accepted
    and delivered exactly once, and each failure is logged."""
    pipeline = pipeline_factory("pull", events=True)
    admin = publisher_client(pubsub_emulator.host)
    topic = f"projects/{pubsub_project}/topics/{pipeline.topology.events_topic.name}"
    admin.delete_topic(topic=topic)
    accepted = send(pipeline, "bob@example.org")
    record = pipeline.wait_for_record(accepted["mail_id"], lambda r: r.status == "delivered")
    assert record.attempt_count == 1
    assert len(pipeline.smtp.wait_for(1)) == 1
    # Events are not waited for: each failure is logged when Pub/Sub answers the publish.
    wanted = [f"{kind} event of mail {accepted['mail_id']}" for kind in ("accepted", "delivered")]
    deadline = time.monotonic() + 15
    while True:
        failures = [r.getMessage() for r in caplog.records if r.name == "mailpipe.events"]
        found = all(any(w in m for m in failures) for w in wanted)
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, failures
    # Nothing was retried: a nack would have made a second attempt.
    time.sleep(2.0)
    assert pipeline.record.get(accepted["mail_id"]).attempt_count == 1  # type: ignore[union-attr]
    assert len(pipeline.smtp.messages) == 1


def test_events_tail_shows_events_and_exits_on_count_and_on_ctrl_c(
    events_pipeline: Pipeline, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> None:
    env = {
        **os.environ,
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "GOOGLE_CLOUD_PROJECT": pubsub_project,
        "MAILPIPE_EVENTS_TOPIC": events_pipeline.topology.events_topic.name,
    }
    command = [sys.executable, "-m", "ops", "events", "tail"]
    counted = subprocess.Popen(
        [*command, "--count", "2", "--timeout", "60", "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    follower = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for process in (counted, follower):  # its subscription exists once it says so
            assert process.stderr is not None
            assert "tailing" in process.stderr.readline()
        accepted = send(events_pipeline, "carol@example.org")
        out, err = counted.communicate(timeout=60)
        assert counted.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [(x["event"]["type"], x["event"]["mail_id"]) for x in lines] == [
            ("accepted", accepted["mail_id"]),
            ("delivered", accepted["mail_id"]),
        ]
        assert (
            lines[0]["attributes"]["googclient_traceparent"].split("-")[1] == (accepted["trace_id"])
        )
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert "stopped after" in err
        assert f"delivered     {accepted['mail_id']}" in out
    finally:
        for process in (counted, follower):
            if process.poll() is None:
                process.kill()
                process.wait()
    # Both tails deleted their own subscriptions on the way out.
    topic = f"projects/{pubsub_project}/topics/{events_pipeline.topology.events_topic.name}"
    admin = publisher_client(pubsub_emulator.host)
    left = [s for s in admin.list_topic_subscriptions(topic=topic) if "events-tail" in s]
    assert left == []


def test_dead_letter_and_replay_emit_their_events_in_their_traces(
    events_pipeline: Pipeline, reader: EventReader, pubsub_emulator: RunningEmulator
) -> None:
    """Five deferrals, then Pub/Sub dead-letters the mail (the test topology's 5 attempts):
    ``dead_lettered`` in the mail's trace; ``dlq replay`` emits ``replayed`` in the replay's new
    trace, and the replayed mail's ``delivered`` follows in that trace."""
    events_pipeline.smtp.fail("rcpt", 451, "4.3.0 Mailbox temporarily unavailable")  # until cleared
    accepted = send(events_pipeline, "dora@example.org")
    mail_id = accepted["mail_id"]
    events = reader.until(mail_id, EventType.DEAD_LETTERED, timeout=90)
    assert [(e["type"], e["attempt"]) for e in events] == [
        ("accepted", 0),
        *[("deferred", n) for n in range(1, 6)],
        ("dead_lettered", 5),
    ]
    dead = events[-1]
    assert (dead["reply_code"], dead["enhanced_status"]) == (451, "4.3.0")
    assert dead["metadata"] == {"campaign": "spring", "n": 3}
    assert_in_the_mails_trace(events_pipeline, reader, events, accepted["trace_id"])

    events_pipeline.smtp.clear_faults()
    pubsub = events_pipeline.publisher_config.pubsub
    publisher = tracing_publisher_client(pubsub_emulator.host, tracing=True)
    subscriber = subscriber_client(pubsub_emulator.host)
    try:
        report = DeadLetterReplayer(
            subscriber=subscriber,
            publisher=publisher,
            record=events_pipeline.record,
            tracer=events_pipeline.telemetry.tracer("mailpipe.cli.dlq"),
            dead_letter_subscription=subscriber.subscription_path(
                pubsub.project, events_pipeline.topology.dead_letter_subscription.name
            ),
            topic=pubsub.topic_path,
            return_immediately=True,
            events=events_pipeline.events,
        ).replay(Selection(mail_ids=frozenset({mail_id})))
    finally:
        publisher.stop()
        subscriber.close()
    [outcome] = report.outcomes
    assert outcome.status == "replayed", outcome
    events = reader.until(mail_id, EventType.DELIVERED, timeout=60)
    replayed, delivered = events[-2:]
    assert (replayed["type"], delivered["type"]) == ("replayed", "delivered")
    assert replayed["trace_id"] == delivered["trace_id"] == outcome.trace_id
    assert replayed["trace_id"] != accepted["trace_id"]
    assert (replayed["attempt"], delivered["attempt"]) == (5, 6)
    assert_in_the_mails_trace(events_pipeline, reader, events[-2:], outcome.trace_id or "")


@pytest.mark.parametrize(
    ("style", "shown"),
    [("full", "erin@example.org"), ("hashed", "sha256:"), ("domain", "@example.org")],
)
def test_recipients_in_events_follow_the_address_policy(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    apply_mail_topology: Any,
    style: AddressStyle,
    shown: str,
) -> None:
    topology = apply_mail_topology()
    reader = EventReader(pubsub_emulator, pubsub_project, topology.events_topic.name)
    emitter = EventEmitter(
        tracing_publisher_client(pubsub_emulator.host, tracing=True),
        f"projects/{pubsub_project}/topics/{topology.events_topic.name}",
        address_style=style,
    )
    try:
        mail = QueuedMail.accept(
            MailRequest.model_validate(
                {"from": "a@example.com", "to": ["erin@example.org"], "subject": "s", "text": "t"}
            )
        )
        reply = "550 5.1.1 <erin@example.org>: no such user"
        emitter.emit(EventType.BOUNCED, mail.mail_id, mail=mail, attempt=1, reply=reply)
        [event] = reader.until(mail.mail_id, EventType.BOUNCED)
    finally:
        emitter.close()
        reader.close()
    assert event["recipient_domains"] == ["example.org"]
    [recipient] = event["recipients"]
    assert recipient.startswith(shown)
    if style != "full":
        assert "erin@" not in json.dumps(event)
    else:
        assert "<erin@example.org>" in event["reply"]


def test_each_mail_of_a_batch_is_accepted_in_its_own_trace(
    events_pipeline: Pipeline, reader: EventReader
) -> None:
    mails = [
        {"from": "sender@example.com", "to": [f"r{n}@example.org"], "subject": "s", "text": "t"}
        for n in range(3)
    ]
    response = events_pipeline.http.post("/v1/messages:batch", json={"messages": mails})
    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert len({item["trace_id"] for item in items}) == 3
    for item in items:
        events = reader.until(item["mail_id"], EventType.DELIVERED)
        assert [e["type"] for e in events] == ["accepted", "delivered"]
        assert_in_the_mails_trace(events_pipeline, reader, events, item["trace_id"])
