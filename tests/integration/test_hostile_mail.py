"""Hostile mail through the real pipeline: what the relay receives, or the 400 that refuses it.

Real parts only: the publisher over HTTP, Google's Pub/Sub emulator over gRPC, the push endpoint
or the streaming-pull worker, the delivery core, the SMTP sender and a real aiosmtpd server on
loopback (which offers SMTPUTF8, or not). Each test checks what a recipient or an operator would:
the headers of the mail the relay received, the record, the answer to the client.

Issue 16: encoded words in a From or To display name must not change who the header names, an
encoded-word subject must not inject headers, header text the ``email`` package would split is
refused at the API, a mail that can never be built (already on the topic, or replayed) bounces
with a recorded reason instead of staying ``sending``, a non-ASCII Reply-To declares SMTPUTF8,
and ``MAILPIPE_ALLOWED_SENDER_DOMAINS`` limits who may send.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.pubsub_v1.types import PublisherOptions
from opentelemetry.sdk.trace import TracerProvider

from emulator import RunningEmulator, publisher_client, subscriber_client
from emulator.smtp import LocalSmtpServer, ReceivedMail
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus, open_record
from mailpipe.topology import Topology
from ops.replay import DeadLetterReplayer, ReplayStatus, Selection
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.listing import list_mails
from publisher.pubsub import PubSubMailPublisher
from subscriber.delivery import DeliveryService, Outcome, ReceivedMessage
from subscriber.smtp import SmtpSender
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import Pipeline, PipelineFactory, local_push_endpoint, pipeline_env
from tests.fixtures.smtp import make_smtp_config

SENDER = "sender@example.com"
# An encoded word whose text is an address: decoded, the display name would name someone else.
SPOOFED_NAME = "=?utf-8?q?ceo=40bank.example_=3Cceo=40bank.example=3E?="
INJECTING_SUBJECT = "=?utf-8?q?Invoice=0D=0AReply-To:_evil=40attacker.example?="
RECIPIENT_NAME = "=?utf-8?q?a=40evil.example=2C_b=40evil.example?="
LINE_BOUNDARIES = ["\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def addresses(message: EmailMessage, name: str) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for h in message.get_all(name, []) for a in h.addresses]


def header_names(message: EmailMessage) -> list[str]:
    return sorted(name.lower() for name in message)


def received_case(pipeline: Pipeline, count: int, case: str) -> ReceivedMail:
    """The mail whose X-Case header is ``case``, once ``count`` mails have arrived."""
    [mail] = [m for m in pipeline.smtp.wait_for(count, timeout=30) if m.message["X-Case"] == case]
    return mail


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_encoded_words_neither_spoof_the_sender_nor_inject_headers(
    pipeline_factory: PipelineFactory, mode: str
) -> None:
    pipeline = pipeline_factory(mode)
    attacks = {
        "from": {"from": f"{SPOOFED_NAME} <{SENDER}>"},
        "subject": {"subject": INJECTING_SUBJECT},
        "to": {"to": [f"{RECIPIENT_NAME} <bob@example.org>"]},
    }
    for case, fields in attacks.items():
        response = pipeline.send(headers={"X-Case": case}, **fields)
        assert response.status_code == 202, response.text

    spoofed = received_case(pipeline, 3, "from").message
    assert addresses(spoofed, "From") == [(SPOOFED_NAME, SENDER)]

    injected = received_case(pipeline, 3, "subject").message
    assert injected["Subject"] == INJECTING_SUBJECT
    assert injected["Reply-To"] is None
    standard = ["content-transfer-encoding", "content-type", "date", "from", "message-id"]
    assert header_names(injected) == sorted(
        [*standard, "mime-version", "subject", "to", "traceparent", "x-case"]
    )

    renamed = received_case(pipeline, 3, "to")
    assert addresses(renamed.message, "To") == [(RECIPIENT_NAME, "bob@example.org")]
    assert renamed.recipients == ("bob@example.org",)

    # The same name given as a structured mailbox.
    fields = {"from": {"name": SPOOFED_NAME, "address": SENDER}}
    response = pipeline.send(headers={"X-Case": "object"}, **fields)
    assert response.status_code == 202, response.text
    by_object = received_case(pipeline, 4, "object").message
    assert addresses(by_object, "From") == [(SPOOFED_NAME, SENDER)]


def test_header_text_with_a_line_boundary_is_refused_naming_the_field(pipeline: Pipeline) -> None:
    def cases(b: str) -> list[tuple[dict[str, Any], str]]:
        return [
            ({"subject": f"Hello{b}Bcc: hidden@attacker.example"}, "subject"),
            ({"headers": {"X-Note": f"a{b}b"}}, "headers.X-Note"),
            ({"from": f"Ada{b}Lovelace <{SENDER}>"}, "from"),
            ({"to": [f"Bob{b} <bob@example.org>"]}, "to.0"),
            (
                {"attachments": [{"filename": f"a{b}.pdf", "content": "eA=="}]},
                "attachments.0.filename",
            ),
            ({"from": {"name": f"Ada{b}", "address": SENDER}}, "from.name"),
            ({"reply_to": {"name": f"{b}Eve", "address": "eve@example.org"}}, "reply_to.0.name"),
        ]

    # Field by field, every boundary: CR and LF were refused before issue 16, the others not.
    for index in range(len(cases(""))):
        for fields, field in (cases(b)[index] for b in LINE_BOUNDARIES):
            response = pipeline.send(**fields)

            assert response.status_code == 400, (fields, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_request"
            assert "header injection" in error["fields"][field], error
    assert list_mails(pipeline.record).items == []  # nothing accepted, nothing queued


def test_header_names_that_repeat_ignoring_case_are_refused(pipeline: Pipeline) -> None:
    response = pipeline.send(headers={"X-Campaign": "a", "x-campaign": "b"})

    assert response.status_code == 400, response.text
    assert "same header" in response.json()["error"]["fields"]["headers"]


def v1_data(mail_id: str, **request: Any) -> bytes:
    """A mail as the publisher before issue 16 put it on the topic (schema version 1)."""
    body = {
        "from": "Ada Lovelace <ada@example.com>",
        "to": ["bob@example.org"],
        "cc": [],
        "bcc": [],
        "reply_to": [],
        "subject": "from the old publisher",
        "text": "hello",
        "html": None,
        "headers": {},
        "attachments": [],
        "idempotency_key": None,
        "metadata": {},
        **request,
    }
    accepted_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    mail = {"schema_version": 1, "mail_id": mail_id, "accepted_at": accepted_at, "request": body}
    return json.dumps(mail).encode()


def publish(
    pipeline: Pipeline, emulator: RunningEmulator, project: str, data: bytes, mail_id: str
) -> None:
    client = publisher_client(emulator.host)
    topic = client.topic_path(project, pipeline.topology.mail_topic.name)
    client.publish(topic, data, mail_id=mail_id, schema_version="1").result(timeout=10)
    client.stop()


def outcomes(pipeline: Pipeline, mail_id: str) -> list[str]:
    return [
        s.attributes["mailpipe.outcome"]
        for s in pipeline.spans.get_finished_spans()
        if s.name == "mail deliver" and s.attributes.get("mailpipe.mail_id") == mail_id
    ]


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_mails_already_on_the_topic_are_delivered_or_bounced_never_stuck(
    pipeline_factory: PipelineFactory,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mode: str,
) -> None:
    """Schema version 1 mails in flight when the new subscriber deploys: a valid one is
    delivered as before, one the new rules refuse bounces (recorded, acked), not a 500."""
    pipeline = pipeline_factory(mode)
    valid, poison = str(uuid.uuid4()), str(uuid.uuid4())
    publish(pipeline, pubsub_emulator, pubsub_project, v1_data(valid), valid)
    poison_data = v1_data(poison, subject="Hello\u2028Bcc: hidden@attacker.example")
    publish(pipeline, pubsub_emulator, pubsub_project, poison_data, poison)

    [received] = pipeline.smtp.wait_for(1, timeout=30)
    assert addresses(received.message, "From") == [("Ada Lovelace", "ada@example.com")]
    assert received.message["Subject"] == "from the old publisher"
    assert pipeline.wait_for_record(valid, lambda r: r.status.final).status is MailStatus.DELIVERED

    bounced = pipeline.wait_for_record(poison, lambda r: r.status.final)
    assert bounced.status is MailStatus.BOUNCED
    [attempt] = bounced.attempts
    assert (attempt.outcome, attempt.failed_step) == ("bounced", "decode")
    assert "request.subject" in (attempt.reply_message or "")
    assert "line breaks" in (bounced.last_error or "")
    assert outcomes(pipeline, poison) == ["bounced"]

    # Acked: a second copy of the same message finds the record final and sends nothing.
    publish(pipeline, pubsub_emulator, pubsub_project, poison_data, poison)
    wait_until(lambda: "duplicate" in outcomes(pipeline, poison))
    assert outcomes(pipeline, poison) == ["bounced", "duplicate"]
    assert len(pipeline.record.get(poison).attempts) == 1  # type: ignore[union-attr]
    assert len(pipeline.smtp.messages) == 1


@pytest.fixture
def push_endpoint(smtp_server: LocalSmtpServer, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The push endpoint in local mode over HTTP, the real delivery core, SMTP server and record."""
    with local_push_endpoint(smtp_server, tmp_path / "record.sqlite3") as endpoint:
        yield endpoint


def test_the_push_endpoint_acks_a_mail_that_cannot_be_built_with_204_not_500(
    push_endpoint: tuple[str, Any], smtp_server: LocalSmtpServer
) -> None:
    url, record = push_endpoint
    mail_id = str(uuid.uuid4())
    data = v1_data(mail_id, subject="Hello\u2028there")
    envelope = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": {"mail_id": mail_id, "schema_version": "1"},
            "messageId": "7",
        },
        "subscription": "projects/p/subscriptions/s",
    }

    answers = [httpx.post(f"{url}/", json=envelope, timeout=30) for _ in range(2)]

    assert [a.status_code for a in answers] == [204, 204], [a.text for a in answers]
    bounced = record.get(mail_id)
    assert bounced.status is MailStatus.BOUNCED
    assert [(a.outcome, a.failed_step) for a in bounced.attempts] == [("bounced", "decode")]
    assert "request.subject" in (bounced.last_error or "")
    assert smtp_server.messages == []


def test_replaying_a_dead_lettered_mail_that_cannot_be_built_bounces_it(
    pipeline: Pipeline, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> None:
    """``mailpipe dlq replay`` of an old mail the new rules refuse: bounced and recorded."""
    mail_id = str(uuid.uuid4())
    data = v1_data(mail_id, headers={"X-Note": "a\x1cb"})
    accepted_at = dt.datetime.now(dt.UTC)
    record = pipeline.record
    record.reserve(
        mail_id=mail_id,
        accepted_at=accepted_at,
        recipient_domains=("example.org",),
        idempotency_key=None,
    )
    record.mark_queued(mail_id, message_id="1", trace_id=None)
    record.mark_dead_lettered(mail_id, last_error="500 at build: could not be built")
    publisher = publisher_client(
        pubsub_emulator.host,
        publisher_options=PublisherOptions(enable_open_telemetry_tracing=True),
    )
    dead_letter_topic = publisher.topic_path(
        pubsub_project, pipeline.topology.dead_letter_topic.name
    )
    publisher.publish(
        dead_letter_topic,
        data,
        mail_id=mail_id,
        schema_version="1",
        CloudPubSubDeadLetterSourceDeliveryCount="5",
    ).result(timeout=10)
    subscriber = subscriber_client(pubsub_emulator.host)
    pubsub = pipeline.publisher_config.pubsub
    try:
        report = DeadLetterReplayer(
            subscriber=subscriber,
            publisher=publisher,
            record=record,
            tracer=pipeline.telemetry.tracer("mailpipe.cli.dlq"),
            dead_letter_subscription=subscriber.subscription_path(
                pubsub.project, pipeline.topology.dead_letter_subscription.name
            ),
            topic=pubsub.topic_path,
            return_immediately=True,
        ).replay(Selection(mail_ids=frozenset({mail_id})))
    finally:
        publisher.stop()
        subscriber.close()

    assert [o.status for o in report.outcomes] == [ReplayStatus.REPLAYED]
    bounced = pipeline.wait_for_record(mail_id, lambda r: r.status is MailStatus.BOUNCED)
    assert [(a.outcome, a.failed_step) for a in bounced.attempts] == [("bounced", "decode")]
    assert "request.headers.X-Note" in (bounced.last_error or "")
    assert pipeline.smtp.messages == []


def test_a_non_ascii_reply_to_is_sent_with_smtputf8(pipeline: Pipeline) -> None:
    def reply_to(received: ReceivedMail) -> list[tuple[str, str]]:
        # The parser keeps a UTF-8 header's bytes as surrogate escapes.
        return [
            (name, address.encode("utf-8", "surrogateescape").decode("utf-8"))
            for name, address in addresses(received.message, "Reply-To")
        ]

    response = pipeline.send(reply_to="zoë@example.org")
    assert response.status_code == 202, response.text
    [received] = pipeline.smtp.wait_for(1, timeout=30)

    assert received.smtputf8  # declared at MAIL FROM, although the envelope is ASCII
    assert (received.mail_from, received.recipients) == (SENDER, ("rcpt@example.org",))
    assert reply_to(received) == [("", "zoë@example.org")]

    response = pipeline.send(reply_to=["Zoë Ünal <zoë@example.org>", "Bob <bob@example.org>"])
    assert response.status_code == 202, response.text
    second = pipeline.smtp.wait_for(2, timeout=30)[1]

    assert second.smtputf8
    assert reply_to(second) == [("Zoë Ünal", "zoë@example.org"), ("Bob", "bob@example.org")]


@pytest.fixture
def relay_without_smtputf8() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(smtputf8=False) as server:
        yield server


def test_a_relay_without_smtputf8_bounces_a_mail_that_needs_it_with_the_reason(
    relay_without_smtputf8: LocalSmtpServer, tmp_path: Path
) -> None:
    """Real SMTP sender and record; the Pub/Sub message handed to the delivery core directly."""
    record = open_record(f"sqlite:///{tmp_path / 'record.sqlite3'}")
    sender = SmtpSender(make_smtp_config(relay_without_smtputf8))
    delivery = DeliveryService(
        sender=sender,
        record=record,
        tracer=TracerProvider().get_tracer("test"),
        message_id_domain="mailpipe.test",
    )
    ascii_mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": SENDER, "to": ["bob@example.org"], "text": "x", "reply_to": "ok@example.org"}
        )
    )
    utf8_mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": SENDER, "to": ["bob@example.org"], "text": "x", "reply_to": "zoë@example.org"}
        )
    )
    try:
        results = {}
        for mail in (ascii_mail, utf8_mail):
            data, attributes = mail.to_pubsub()
            message = ReceivedMessage(data=data, attributes=attributes, message_id=mail.mail_id)
            results[mail.mail_id] = delivery.deliver(message, parent=None)
    finally:
        sender.close()

    assert results[ascii_mail.mail_id].outcome is Outcome.DELIVERED
    assert results[utf8_mail.mail_id].outcome is Outcome.BOUNCED
    assert results[utf8_mail.mail_id].ack
    bounced = record.get(utf8_mail.mail_id)
    assert bounced is not None and bounced.status is MailStatus.BOUNCED
    assert "SMTPUTF8" in (bounced.last_error or "")
    assert [m.message["Reply-To"] for m in relay_without_smtputf8.messages] == ["ok@example.org"]
    record.close()


@pytest.fixture
def restricted_publisher(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    apply_mail_topology: Any,
    tmp_path: Path,
) -> Iterator[httpx.Client]:
    """The publisher over HTTP with MAILPIPE_ALLOWED_SENDER_DOMAINS=example.com,bücher.de."""
    topology: Topology = apply_mail_topology()
    env = pipeline_env(pubsub_emulator, pubsub_project, topology, tmp_path / "r.sqlite3", 25)
    env["MAILPIPE_ALLOWED_SENDER_DOMAINS"] = "example.com, bücher.de"
    config = PublisherConfig.from_env(env, topology)
    record = open_record(config.record)
    publisher = PubSubMailPublisher(config.pubsub, timeout=10)
    try:
        with (
            serve_app(create_app(config, publisher=publisher, record=record)) as url,
            httpx.Client(base_url=url, timeout=30) as http,
        ):
            yield http
    finally:
        publisher.close()
        record.close()


@pytest.mark.parametrize(
    ("sender", "status"),
    [
        ("ada@example.com", 202),
        ("Ada <ada@EXAMPLE.COM>", 202),
        ("zoë@xn--bcher-kva.de", 202),
        ({"name": "Ada", "address": "ada@bücher.de"}, 202),
        ("ada@mail.example.com", 403),  # a subdomain is another domain
        ("ceo@bank.example", 403),
        (f"{SPOOFED_NAME} <ceo@bank.example>", 403),
    ],
)
def test_only_allowed_sender_domains_may_send(
    restricted_publisher: httpx.Client, sender: Any, status: int
) -> None:
    mail = {"from": sender, "to": ["bob@example.org"], "text": "x"}
    attachment = {"filename": "a.txt", "content": base64.b64encode(b"a").decode()}

    response = restricted_publisher.post("/v1/messages", json={**mail, "attachments": [attachment]})

    assert response.status_code == status, response.text
    if status == 403:
        error = response.json()["error"]
        assert error["code"] == "sender_not_allowed"
        assert "example.com" in error["message"] and "xn--bcher-kva.de" in error["message"]
        assert list(error["fields"]) == ["from"]
