"""The whole path of a mail, in-process on real servers: HTTP → emulator (gRPC) → SMTP (aiosmtpd).

Push and streaming pull share one delivery core; each test says what a user would check: the mail
arrived intact (or did not), the record says what happened, and the spans form one trace.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from emulator import publisher_client
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus
from publisher.listing import list_mails
from tests.fixtures.pipeline import Pipeline, PipelineFactory

SMTP_STEPS = ["smtp connect", "smtp ehlo", "smtp mail from", "smtp rcpt to", "smtp data"]

RICH_MAIL: dict[str, Any] = {
    "from": "Ada Lovelace <ada@example.com>",
    "to": ["Bob <bob@example.org>"],
    "cc": ["carol@example.org"],
    "bcc": ["secret@example.org"],
    "subject": "Grüße aus Zürich ✉",
    "text": "Hallo Bob, schöne Grüße — 你好\n",
    "html": "<p>Hallo <b>Bob</b>, schöne Grüße — 你好</p>",
    "headers": {"X-Campaign": "spring-2026"},
    "attachments": [
        {
            "filename": "report.pdf",
            "content_type": "application/pdf",
            "content": base64.b64encode(b"%PDF-1.4 fake but binary \x00\xff").decode(),
        },
    ],
}


def by_name(spans: list[Any], name: str) -> Any:
    matching = [s for s in spans if s.name == name]
    assert len(matching) == 1, f"expected one {name!r}, got {[s.name for s in spans]}"
    return matching[0]


def assert_mail_received_intact(pipeline: Pipeline, mail_id: str) -> Any:
    [received] = pipeline.smtp.wait_for(1, timeout=30)
    message = received.message
    assert message["Message-ID"] == f"<{mail_id}@test.mailpipe.local>"
    assert message["Subject"] == RICH_MAIL["subject"]
    assert message["From"] == "Ada Lovelace <ada@example.com>"
    assert message["To"] == "Bob <bob@example.org>"
    assert message["Cc"] == "carol@example.org"
    assert message["Bcc"] is None
    assert message["X-Campaign"] == "spring-2026"
    assert sorted(received.recipients) == [
        "bob@example.org",
        "carol@example.org",
        "secret@example.org",
    ]
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "schöne Grüße — 你好" in text and "<b>Bob</b>" in html
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_content() == b"%PDF-1.4 fake but binary \x00\xff"
    return received


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_mail_is_delivered_intact_in_one_trace(
    pipeline_factory: PipelineFactory, mode: str
) -> None:
    pipeline = pipeline_factory(mode)

    response = pipeline.send(**RICH_MAIL)
    assert response.status_code == 202, response.text
    accepted = response.json()
    received = assert_mail_received_intact(pipeline, accepted["mail_id"])
    record = pipeline.wait_for_record(accepted["mail_id"], lambda r: r.status.final)

    assert record.status is MailStatus.DELIVERED
    assert [a.reply_code for a in record.attempts] == [250]
    trace_id = accepted["trace_id"]
    topic = pipeline.topology.mail_topic.name
    subscription = pipeline.topology.delivery_subscription.name
    # The library ends its subscribe span when the message is acked, after `mail deliver`.
    expected = {"mail deliver", "smtp data"} | (
        {f"{subscription} subscribe"} if mode == "pull" else set()
    )
    spans = pipeline.wait_for_spans(trace_id, expected)
    http = by_name(spans, "POST /v1/messages")
    create = by_name(spans, f"{topic} create")
    deliver = by_name(spans, "mail deliver")
    assert http.kind is SpanKind.SERVER and http.parent is None
    assert create.kind is SpanKind.PRODUCER and create.parent.span_id == http.context.span_id
    if mode == "pull":
        subscribe = by_name(spans, f"{subscription} subscribe")
        assert subscribe.kind is SpanKind.CONSUMER
        assert subscribe.parent.span_id == create.context.span_id
        assert deliver.parent.span_id == subscribe.context.span_id
    else:
        assert deliver.kind is SpanKind.CONSUMER
        assert deliver.parent.span_id == create.context.span_id
    assert deliver.attributes["mailpipe.mail_id"] == accepted["mail_id"]
    assert deliver.attributes["mailpipe.outcome"] == "delivered"
    assert deliver.attributes["messaging.system"] == "gcp_pubsub"
    assert deliver.attributes["messaging.message.id"] == accepted["message_id"]
    smtp_spans = [s for s in spans if s.name.startswith("smtp ")]
    assert [s.name for s in sorted(smtp_spans, key=lambda s: s.start_time)] == [
        "smtp connect",
        "smtp ehlo",
        "smtp mail from",
        "smtp rcpt to",
        "smtp rcpt to",
        "smtp rcpt to",
        "smtp data",
    ]
    for span in smtp_spans:
        assert span.kind is SpanKind.CLIENT
        assert span.parent.span_id == deliver.context.span_id
        assert span.attributes["server.port"] == pipeline.smtp.port
    assert by_name(spans, "smtp data").attributes["smtp.reply.code"] == 250
    # The mail carries the `mail deliver` span's context so a downstream MTA can continue it.
    version, header_trace_id, parent_id, flags = received.message["traceparent"].split("-")
    assert (version, header_trace_id) == ("00", trace_id)
    assert parent_id == format(deliver.context.span_id, "016x")
    assert int(flags, 16) & 0x01  # sampled


def test_transient_failures_are_retried_until_delivered(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 451, "4.3.0 Mailbox temporarily unavailable", times=2)

    accepted = pipeline.send(to=["bob@example.org"]).json()
    record = pipeline.wait_for_record(accepted["mail_id"], lambda r: r.status.final)

    assert record.status is MailStatus.DELIVERED
    assert [(a.outcome, a.reply_code) for a in record.attempts] == [
        ("deferred", 451),
        ("deferred", 451),
        ("delivered", 250),
    ]
    assert record.attempts[0].enhanced_status == "4.3.0"
    assert record.attempts[0].failed_step == "rcpt to"
    assert len(pipeline.smtp.wait_for(1)) == 1
    spans = pipeline.wait_for_spans(accepted["trace_id"], {"smtp data"})
    outcomes = [s.attributes["mailpipe.outcome"] for s in spans if s.name == "mail deliver"]
    assert outcomes == ["deferred", "deferred", "delivered"]


def test_permanent_failure_bounces_once_and_is_not_retried(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 550, "5.1.1 No such user")

    accepted = pipeline.send(to=["nobody@example.org"]).json()
    record = pipeline.wait_for_record(accepted["mail_id"], lambda r: r.status.final)

    assert record.status is MailStatus.BOUNCED
    assert [(a.reply_code, a.enhanced_status) for a in record.attempts] == [(550, "5.1.1")]
    assert "No such user" in (record.last_error or "")
    assert pipeline.smtp.messages == []
    deliver = pipeline.wait_for_spans(accepted["trace_id"], {"mail deliver"})
    assert [s.attributes["mailpipe.outcome"] for s in deliver if s.name == "mail deliver"] == [
        "bounced"
    ]


def test_the_same_mail_delivered_twice_is_sent_once(
    pipeline: Pipeline, pubsub_emulator: Any, pubsub_project: str
) -> None:
    """At-least-once delivery made effectively once: a redelivered mail is acked, not resent."""
    mail = QueuedMail.accept(
        MailRequest.model_validate({"from": "a@example.com", "to": ["b@example.org"], "text": "x"})
    )
    data, attributes = mail.to_pubsub()
    client = publisher_client(pubsub_emulator.host)
    topic = client.topic_path(pubsub_project, pipeline.topology.mail_topic.name)
    for _ in range(2):  # Pub/Sub may deliver a message twice; this forces it
        client.publish(topic, data, **attributes).result(timeout=10)

    deadline = time.monotonic() + 30
    outcomes: list[str] = []
    while "duplicate" not in outcomes and time.monotonic() < deadline:
        outcomes = [
            s.attributes["mailpipe.outcome"]
            for s in pipeline.spans.get_finished_spans()
            if s.name == "mail deliver" and s.attributes.get("mailpipe.mail_id") == mail.mail_id
        ]
        time.sleep(0.05)

    # The copies may arrive at once: the one that loses the claim is deferred, then acked as a
    # duplicate on its retry. Either way exactly one is delivered.
    assert outcomes.count("delivered") == 1
    assert "duplicate" in outcomes
    assert set(outcomes) <= {"delivered", "duplicate", "deferred"}
    assert len(pipeline.smtp.messages) == 1
    record = pipeline.record.get(mail.mail_id)
    assert record is not None and record.status is MailStatus.DELIVERED
    assert len(record.attempts) == 1
    client.stop()


def test_idempotent_retry_of_a_post_sends_one_mail(pipeline: Pipeline) -> None:
    first = pipeline.send(idempotency_key="invoice-42").json()
    second = pipeline.send(idempotency_key="invoice-42").json()

    assert first == second
    record = pipeline.wait_for_record(first["mail_id"], lambda r: r.status.final)
    assert record.status is MailStatus.DELIVERED
    assert len(pipeline.smtp.wait_for(1)) == 1
    assert len(list_mails(pipeline.record).items) == 1


@pytest.mark.slow
def test_exhausted_retries_land_on_the_dead_letter_topic(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 452, "4.2.2 Mailbox full")

    accepted = pipeline.send().json()
    record = pipeline.wait_for_record(
        accepted["mail_id"], lambda r: r.status is MailStatus.DEAD_LETTERED, timeout=90
    )

    assert len(record.attempts) == 5  # max_delivery_attempts of the test topology
    assert all(a.reply_code == 452 for a in record.attempts)
    assert "Mailbox full" in (record.last_error or "")
    assert pipeline.smtp.messages == []


def test_addresses_in_smtp_replies_are_shown_only_as_configured(pipeline: Pipeline) -> None:
    # Relays quote the recipient; with the default `domain` style no full address is kept.
    pipeline.smtp.fail("rcpt", 550, "5.1.1 <nobody@example.org>: Recipient address rejected")

    accepted = pipeline.send(to=["nobody@example.org"]).json()
    record = pipeline.wait_for_record(accepted["mail_id"], lambda r: r.status.final)
    spans = pipeline.wait_for_spans(accepted["trace_id"], {"mail deliver"})

    assert record.status is MailStatus.BOUNCED
    assert "Recipient address rejected" in (record.last_error or "")
    assert "nobody@example.org" not in (record.last_error or "")
    assert "@example.org" in (record.last_error or "")
    texts = []
    for span in spans:
        texts += [str(v) for v in span.attributes.values()]
        texts.append(span.status.description or "")
        texts += [str(v) for event in span.events for v in event.attributes.values()]
    assert not [t for t in texts if "nobody@example.org" in t]


def test_a_push_delivery_links_to_the_request_span_cloud_run_started(
    pipeline_factory: PipelineFactory,
) -> None:
    """Cloud Run puts its own ``traceparent`` header on every request it forwards (usually
    not sampled): ``mail deliver`` keeps the publisher's trace and links to Cloud Run's."""
    pipeline = pipeline_factory("push")
    assert pipeline.push_url is not None
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "sender@example.com", "to": ["rcpt@example.org"], "subject": "hi", "text": "x"}
        )
    )
    data, attributes = mail.to_pubsub()
    publisher_trace, cloud_run_trace = "1" * 32, "3" * 32
    envelope = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": {
                **attributes,
                "googclient_traceparent": f"00-{publisher_trace}-{'2' * 16}-01",
            },
            "messageId": "cloud-run-link-1",
        },
        "subscription": "projects/p/subscriptions/mailpipe-delivery",
    }
    # Werkzeug spells the incoming header "Traceparent", as any HTTP server may.
    response = pipeline.http.post(
        f"{pipeline.push_url}/",
        json=envelope,
        headers={"traceparent": f"00-{cloud_run_trace}-{'4' * 16}-00"},
    )

    assert response.status_code == 204, response.text
    spans = pipeline.wait_for_spans(publisher_trace, {"mail deliver"})
    (deliver,) = [s for s in spans if s.name == "mail deliver"]
    assert [
        (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x"))
        for link in deliver.links
    ] == [(cloud_run_trace, "4" * 16)]
    assert dict(deliver.links[0].attributes or {}) == {"mailpipe.link": "cloud_run_request"}
