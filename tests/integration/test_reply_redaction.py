"""A relay that quotes back the AUTH exchange and the envelope: nothing of it is kept as sent.

Issue 16's leaks: a relay reply echoing the AUTH PLAIN blob (base64 of ``NUL user NUL
password``) was stored in the record, the spans and the logs; refused recipients and MAIL FROM
errors were stored with full addresses whatever ``MAILPIPE_LOG_ADDRESSES`` said.

Real parts end to end: the publisher app over HTTP, Google's Pub/Sub emulator (the test pulls
each message and pushes it, as Pub/Sub would, to the real push endpoint over HTTP), the
subscriber's own wiring (``build_services``: logs as Cloud Logging JSON, the registered
secrets), an aiosmtpd relay requiring AUTH whose replies quote the blob and the addresses. Then
every answer of the status API, every push answer, every span and every log line is checked.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from emulator import RunningEmulator
from mailpipe.logs import configure_logging, redact_address
from mailpipe.record import open_record
from mailpipe.telemetry import setup_telemetry
from mailpipe.topology import Topology
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.pubsub import PubSubMailPublisher
from subscriber.config import SubscriberConfig
from subscriber.main import build_push_handler, build_services
from subscriber.pull import make_subscriber_client
from subscriber.push import create_push_app
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.redaction import password_leaks
from tests.fixtures.smtp import CommandLog

USER = "relay-login"
PASSWORD = "Pa55-w0rd-nobody-may-read"
SENDER = "Ada.Sender@example.com"
ACCEPTED = "zed.accepted@example.org"
REFUSED = "yan.refused@example.net"
LOCAL_PARTS = ("ada.sender", "zed.accepted", "yan.refused")


def b64(raw: str) -> str:
    return base64.b64encode(raw.encode()).decode()


PLAIN = b64(f"\0{USER}\0{PASSWORD}")  # what smtplib sends for AUTH PLAIN
AUTHZID = b64(f"{USER}\0{USER}\0{PASSWORD}")  # the same with an authorisation identity


def leaks(text: str) -> list[str]:
    """What of the password ``text`` shows: itself, or 6 characters of it inside base64."""
    return password_leaks(text, PASSWORD)


def addresses_in(text: str) -> list[str]:
    lowered = text.lower()
    return [local for local in LOCAL_PARTS if local in lowered]


def span_texts(exporter: InMemorySpanExporter) -> list[str]:
    texts = []
    for span in exporter.get_finished_spans():
        parts = [span.name, span.status.description or ""]
        parts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            parts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
        texts.append("\n".join(parts))
    return texts


def mailpipe_log_lines(written: str) -> str:
    """The log lines mailpipe wrote (the test relay, aiosmtpd in this process, logs too)."""
    lines = [json.loads(line) for line in written.splitlines() if line.strip()]
    return "\n".join(json.dumps(line) for line in lines if line.get("logger") != "mail.log")


class Stack:
    """Publisher and push endpoint over HTTP; the test plays Pub/Sub's push between them."""

    def __init__(self, env: dict[str, str], topology: Topology, spans: InMemorySpanExporter):
        self.config = SubscriberConfig.from_env(env, topology)
        self.services = build_services(
            self.config, telemetry=setup_telemetry(self.config.telemetry, span_exporter=spans)
        )
        self.logs = io.StringIO()
        configure_logging(self.config.telemetry, stream=self.logs, project="mailpipe-test")
        publisher_config = PublisherConfig.from_env(env, topology)
        self.publisher = PubSubMailPublisher(publisher_config.pubsub, timeout=10)
        self.record = open_record(publisher_config.record)
        self.api_app = create_app(publisher_config, publisher=self.publisher, record=self.record)
        self.push_app = create_push_app(build_push_handler(self.config, self.services))
        self.pull = make_subscriber_client(self.config.pubsub)

    def close(self) -> None:
        self.pull.close()
        self.publisher.close()
        self.record.close()
        self.services.close()


@pytest.fixture
def relay() -> Iterator[CommandLog]:
    with CommandLog(auth={USER: PASSWORD}) as server:
        yield server


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # loopback
@pytest.mark.parametrize("style", ["domain", "hashed"])
def test_a_relay_quoting_the_auth_blob_and_the_addresses_leaks_nothing(
    relay: CommandLog,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
    spans: InMemorySpanExporter,
    tmp_path: Path,
    style: str,
) -> None:
    env = {
        **pipeline_env(
            pubsub_emulator, pubsub_project, mail_topology, tmp_path / "r.sqlite3", relay.port
        ),
        "MAILPIPE_SMTP_USERNAME": USER,
        "MAILPIPE_SMTP_PASSWORD": PASSWORD,
        "MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH": "1",  # loopback only
        "MAILPIPE_LOG_ADDRESSES": style,
    }
    stack = Stack(env, mail_topology, spans)
    answers: dict[str, httpx.Response] = {}
    try:
        with (
            serve_app(stack.api_app) as api_url,
            serve_app(stack.push_app) as push_url,
            httpx.Client(timeout=30) as http,
        ):
            subscription = stack.config.pubsub.subscription_path

            def send(name: str) -> str:
                accepted = http.post(
                    f"{api_url}/v1/messages",
                    json={"from": SENDER, "to": [ACCEPTED, REFUSED], "subject": name, "text": "t"},
                )
                assert accepted.status_code == 202, accepted.text
                received: list[Any] = []
                for _ in range(20):  # a pull may come back empty; each waits up to 10 s
                    pulled = stack.pull.pull(subscription=subscription, max_messages=1, timeout=10)
                    received += pulled.received_messages
                    if received:
                        break
                [message] = received
                stack.pull.acknowledge(subscription=subscription, ack_ids=[message.ack_id])
                envelope: dict[str, Any] = {
                    "message": {
                        "data": base64.b64encode(message.message.data).decode(),
                        "attributes": dict(message.message.attributes),
                        "messageId": message.message.message_id,
                    },
                    "subscription": subscription,
                }
                answers[name] = http.post(f"{push_url}/", json=envelope)
                return str(accepted.json()["mail_id"])

            relay.fail("mail", 553, f"5.1.8 <{SENDER}> refused; you said AUTH PLAIN {PLAIN}", 1)
            bounced = send("mail from refused")
            relay.fail(
                "rcpt",
                451,
                f"4.2.0 <{ACCEPTED}> greylisted; AUTH LOGIN {b64(USER)} {b64(PASSWORD)}",
                1,
            )
            deferred = send("recipient deferred")
            relay.fail(
                "rcpt",
                550,
                f"5.1.1 <{REFUSED.upper()}> unknown (auth {AUTHZID} {PLAIN.rstrip('=')})",
                1,
                address=REFUSED,
            )
            relay.fail("data", 250, f"2.0.0 queued for <{ACCEPTED}> after AUTH {PLAIN[:40]}", 1)
            delivered = send("partly refused")

            status = {
                mail_id: http.get(f"{api_url}/v1/messages/{mail_id}")
                for mail_id in (bounced, deferred, delivered)
            }
            listing = http.get(f"{api_url}/v1/messages")
    finally:
        stack.close()

    assert relay.count("mail") == 3  # every mail reached the relay, with AUTH first
    records = {mail_id: answer.json() for mail_id, answer in status.items()}
    assert records[bounced]["status"] == "bounced"
    assert records[deferred]["status"] == "deferred"
    assert records[delivered]["status"] == "delivered"
    [bounce] = records[bounced]["attempts"]
    assert (bounce["reply_code"], bounce["failed_step"]) == (553, "mail from")
    assert redact_address(SENDER, style) in bounce["reply_message"]  # type: ignore[arg-type]
    [delivery] = records[delivered]["attempts"]
    assert f"{redact_address(REFUSED, style)}: 550" in delivery["reply_message"]  # type: ignore[arg-type]
    assert answers["mail from refused"].status_code == 204
    assert answers["recipient deferred"].status_code == 503
    assert "451" in answers["recipient deferred"].text
    assert redact_address(ACCEPTED, style) in answers["recipient deferred"].text  # type: ignore[arg-type]

    outputs = {
        **{f"status {i}": a.text for i, a in status.items()},
        "list": listing.text,
        **{f"push answer {n}": a.text for n, a in answers.items()},
        **{f"span {i}": t for i, t in enumerate(span_texts(spans))},
        "logs": mailpipe_log_lines(stack.logs.getvalue()),
    }
    assert any(t.startswith("smtp auth") for t in span_texts(spans))  # AUTH ran, was traced
    assert "mail bounced" in outputs["logs"] and "mail deferred" in outputs["logs"]
    assert {name: leaks(text) for name, text in outputs.items() if leaks(text)} == {}
    assert {n: addresses_in(t) for n, t in outputs.items() if addresses_in(t)} == {}
