"""The receiving side of the event webhooks: examples/event_webhook_receiver.py.

Production Pub/Sub signs push tokens with Google's keys, which cannot be used here (and the
emulator sends no token at all), so, as in test_push_auth.py, tokens are signed with an RSA key
made for the test and the receiver fetches the key set from a JWKS served on loopback: the same
code path as Google's JWKS URL. The event itself is real: emitted by mailpipe.events to the
emulator and pulled back, then pushed in both of Pub/Sub's formats (wrapped JSON envelope and
``no_wrapper`` with attributes as headers) over real HTTP to the receiver.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from emulator import RunningEmulator, publisher_client, subscriber_client
from emulator.process import free_port
from examples.event_webhook_receiver import TokenVerifier, make_handler
from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.pubsub import publisher_client as tracing_client
from tests.integration.test_push_auth import (
    Keys,
    keys,  # noqa: F401 (the fixture `signing` asks for)
)

REPO = Path(__file__).resolve().parents[2]
AUDIENCE = "https://hooks.example.com/mailpipe"
WEBHOOK_ACCOUNT = "mailpipe-event-webhooks@mailpipe-test.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def pushed_event(
    pubsub_emulator: RunningEmulator, pubsub_project: str, span_exporter: InMemorySpanExporter
) -> Any:
    """A real ``bounced`` event as Pub/Sub holds it (data, attributes, message id), published
    inside a span of the SDK provider the session installs (``span_exporter``)."""
    suffix = uuid.uuid4().hex[:8]
    topic = f"projects/{pubsub_project}/topics/events-receiver-{suffix}"
    subscription = f"projects/{pubsub_project}/subscriptions/events-receiver-{suffix}"
    admin = publisher_client(pubsub_emulator.host)
    admin.create_topic(name=topic)
    subscriber = subscriber_client(pubsub_emulator.host)
    subscriber.create_subscription(request={"name": subscription, "topic": topic})
    emitter = EventEmitter(tracing_client(pubsub_emulator.host, tracing=True), topic)
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["bob@example.org"], "subject": "s", "text": "t"}
        )
    )
    with trace.get_tracer("test").start_as_current_span("mail deliver"):
        emitter.emit(
            EventType.BOUNCED, mail.mail_id, mail=mail, attempt=1, reply_code=550, reply="no"
        )
    emitter.close()  # waits for Pub/Sub's answer
    response = subscriber.pull(
        request={"subscription": subscription, "max_messages": 1}, timeout=10
    )
    [received] = response.received_messages
    subscriber.acknowledge(subscription=subscription, ack_ids=[received.ack_id])
    subscriber.delete_subscription(subscription=subscription)
    admin.delete_topic(topic=topic)
    subscriber.close()
    return received.message


def wrapped(message: Any) -> tuple[bytes, dict[str, str]]:
    """The push body Pub/Sub sends by default (as the emulator sends it: docs/local-vs-gcp.md)."""
    body = {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "message_id": message.message_id,
            "publishTime": "2026-11-30T08:00:00.000Z",
        },
        "subscription": "projects/p/subscriptions/mailpipe-events-crm",
    }
    return json.dumps(body).replace("/", "\\/").encode(), {"Content-Type": "application/json"}


def unwrapped(message: Any) -> tuple[bytes, dict[str, str]]:
    """``no_wrapper { write_metadata = true }``: raw data, attributes and metadata as headers."""
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        **dict(message.attributes),
        "x-goog-pubsub-message-id": message.message_id,
        "x-goog-pubsub-subscription-name": "projects/p/subscriptions/mailpipe-events-crm",
    }
    return bytes(message.data), headers


class Receiver:
    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[dict[str, Any], dict[str, str]]] = []


@pytest.fixture
def receiver(signing: tuple[Keys, str]) -> Iterator[Receiver]:
    _, jwks_url = signing
    verifier = TokenVerifier(audience=AUDIENCE, service_account=WEBHOOK_ACCOUNT, jwks_url=jwks_url)
    received: list[tuple[dict[str, Any], dict[str, str]]] = []
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), make_handler(verifier, lambda e, a: received.append((e, a)))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver = Receiver(f"http://127.0.0.1:{server.server_port}/")
    receiver.events = received
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def signing(request: pytest.FixtureRequest) -> tuple[Keys, str]:
    """The test's signing keys and the URL of their JWKS (test_push_auth's ``keys``)."""
    found: tuple[Keys, str] = request.getfixturevalue("keys")
    return found


def webhook_token(k: Keys, **overrides: Any) -> str:
    return k.sign({"aud": AUDIENCE, "email": WEBHOOK_ACCOUNT, **overrides})


def push(url: str, body_and_headers: tuple[bytes, dict[str, str]], token: str | None) -> Any:
    """POST one push as Pub/Sub does, with ``Authorization: Bearer token`` unless None."""
    body, headers = body_and_headers
    if token is not None:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    return httpx.post(url, content=body, headers=headers)


@pytest.mark.parametrize("form", [wrapped, unwrapped], ids=["wrapped", "no_wrapper"])
def test_a_valid_push_is_read_once(
    receiver: Receiver,
    signing: tuple[Keys, str],
    pushed_event: Any,
    form: Any,
) -> None:
    for _ in range(2):  # Pub/Sub delivers at least once: the second copy is answered, not used
        response = push(receiver.url, form(pushed_event), webhook_token(signing[0]))
        assert response.status_code == 204, response.text
    [(event, attributes)] = receiver.events
    assert (event["type"], event["attempt"], event["reply_code"]) == ("bounced", 1, 550)
    assert event["recipient_domains"] == ["example.org"]
    assert attributes["event_type"] == "bounced"
    assert attributes["googclient_traceparent"].split("-")[1] == event["trace_id"]


REFUSED_TOKENS = {
    "no token": lambda k: None,
    "wrong audience": lambda k: webhook_token(k, aud="https://other.example.com/"),
    "wrong email": lambda k: webhook_token(k, email="someone@evil.example"),
    "email not verified": lambda k: webhook_token(k, email_verified=False),
    "wrong issuer": lambda k: webhook_token(k, iss="https://evil.example"),
    "expired": lambda k: webhook_token(k, iat=time.time() - 7200, exp=time.time() - 3600),
    "unknown key": lambda k: k.sign({"aud": AUDIENCE, "email": WEBHOOK_ACCOUNT}, key=k.other),
    "signature removed": lambda k: (
        webhook_token(k).rsplit(".", 1)[0] + ".SIGNATURE_REMOVED_BY_GOOGLE"
    ),
    "unsigned": lambda k: (
        k.sign({"aud": AUDIENCE, "email": WEBHOOK_ACCOUNT}).rsplit(".", 1)[0] + "."
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_TOKENS))
def test_a_push_without_a_valid_token_is_refused(
    receiver: Receiver,
    signing: tuple[Keys, str],
    pushed_event: Any,
    case: str,
) -> None:
    response = push(receiver.url, wrapped(pushed_event), REFUSED_TOKENS[case](signing[0]))
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"
    assert receiver.events == []


def test_a_body_that_is_no_event_is_refused(
    receiver: Receiver,
    signing: tuple[Keys, str],
) -> None:
    headers = {"Authorization": f"Bearer {webhook_token(signing[0])}"}
    for body in (b"not json", json.dumps({"message": {"data": "%%%"}}).encode(), b"{}"):
        response = httpx.post(receiver.url, content=body, headers=headers)
        assert response.status_code == 400, body
    assert receiver.events == []


def test_the_example_runs_as_a_program(signing: tuple[Keys, str], pushed_event: Any) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "examples/event_webhook_receiver.py",
            f"--port={port}",
            f"--audience={AUDIENCE}",
            f"--service-account={WEBHOOK_ACCOUNT}",
            f"--jwks-url={signing[1]}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "listening on" in process.stdout.readline()
        url = f"http://127.0.0.1:{port}/"
        response = push(url, unwrapped(pushed_event), webhook_token(signing[0]))
        assert response.status_code == 204, response.text
        line = process.stdout.readline()
        assert " bounced " in line and "attempt=1" in line and "traceparent=00-" in line
    finally:
        process.terminate()
        process.wait(timeout=10)
