"""Sandbox mode end to end: the publisher and the push subscriber as real processes (as ``./dev up``
runs them), the local SMTP server with the mailbox simulator noting every command it receives,
the Pub/Sub emulator, events on the events topic, spans in the trace file.

A sandbox mail runs the whole pipeline but the subscriber ends the SMTP transaction after RCPT TO
with RSET: the relay never receives DATA, the record holds its real replies to MAIL and RCPT
(status ``sandboxed``), the ``sandboxed`` event fires in the mail's trace, and the pooled
connection, reset, carries the next real mail.

The per-caller default (``MAILPIPE_SANDBOX_CALLERS``) is tested on the real publisher app over
HTTP against the emulator, with one stand-in at a boundary that cannot run here: the caller's
identity (on Cloud Run, the invoker IAM verified in the ID token; publisher/caller.py) is read from
an ``X-Test-Caller`` header.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulator import RunningEmulator, subscriber_client
from emulator.pipeline import LocalPipeline, run_local_pipeline
from emulator.process import free_port
from emulator.smtp import SIMULATOR_DOMAIN, Command, LocalSmtpServer, MailboxSimulator
from mailpipe.mail import QueuedMail
from mailpipe.record import open_record
from mailpipe.topology import Topology
from ops.trace_view import SpanRecord, find_trace, read_spans
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.pubsub import PubSubMailPublisher
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.topic import pull_until
from tests.integration.test_delivery_events import EventReader
from tests.integration.test_idempotency_reconcile import CALLER_HEADER, caller_from_test_header
from tests.integration.test_metrics_run import scrape_until, total, value

SANDBOX_CALLER = "ci@example-project.iam.gserviceaccount.com"


def at(local: str) -> str:
    return f"{local}@{SIMULATOR_DOMAIN}"


class Relay(LocalSmtpServer):
    """The local SMTP server (mailbox simulator on), noting each command with its connection."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: list[tuple[Command, str | None]] = []
        super().__init__(simulator=MailboxSimulator(), on_command=self._note)

    def _note(self, command: Command, address: str | None) -> None:
        with self.lock:
            self.commands.append((command, address))

    def since(self, mark: int) -> list[tuple[Command, str | None]]:
        with self.lock:
            return self.commands[mark:]

    def mark(self) -> int:
        with self.lock:
            return len(self.commands)


@pytest.fixture
def stack(
    tmp_path: Path, stack_topology: Topology, pubsub_project: str
) -> Iterator[tuple[LocalPipeline, Relay, int]]:
    metrics_port = free_port()
    relay = Relay()
    with (
        relay,
        run_local_pipeline(
            state_dir=tmp_path / "state",
            subscriber_mode="push",
            project=pubsub_project,
            topology=stack_topology,
            smtp_server=relay,
            extra_env={"MAILPIPE_SMTP_TIMEOUT": "5", "MAILPIPE_SMTP_POOL_SIZE": "1"},
            subscriber_env={"MAILPIPE_METRICS_PORT": str(metrics_port)},
        ) as pipeline,
    ):
        yield pipeline, relay, metrics_port  # the subscriber's Prometheus endpoint


def mail(*to: str, **extra: Any) -> dict[str, Any]:
    return {"from": "sender@example.com", "to": list(to), "subject": "hi", "text": "hello", **extra}


def spans_of(pipeline: LocalPipeline, trace_id: str, needed: set[str]) -> list[SpanRecord]:
    """The trace's spans from the services' trace file, once ``needed`` are all there."""
    deadline = time.monotonic() + 30
    while True:
        spans = find_trace(read_spans(pipeline.trace_file), trace_id)
        if needed <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_a_sandbox_mail_stops_after_rcpt_and_records_the_relays_replies(
    stack: tuple[LocalPipeline, Relay, int],
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    stack_topology: Topology,
) -> None:
    pipeline, relay, metrics_port = stack
    events = EventReader(pubsub_emulator, pubsub_project, stack_topology.events_topic.name)

    mark = relay.mark()
    accepted = pipeline.post_mail(mail(at("success"), sandbox=True))
    mail_id, trace_id = accepted["mail_id"], accepted["trace_id"]
    record = pipeline.wait_for_status(mail_id, {"sandboxed", "delivered", "bounced"})

    # The relay saw MAIL, RCPT and RSET; never DATA; it kept nothing.
    assert record["status"] == "sandboxed", record
    seen = [c for c, _ in relay.since(mark) if c not in ("connect", "ehlo")]
    assert seen == ["mail", "rcpt", "rset"], relay.since(mark)
    assert relay.messages == []

    # The record holds the relay's real answers; nothing to retry, no error.
    [attempt] = record["attempts"]
    assert (attempt["outcome"], attempt["reply_code"], attempt["enhanced_status"]) == (
        "sandboxed",
        250,
        "2.1.5",
    )
    reply = attempt["reply_message"]
    assert "MAIL FROM: 250 2.1.0 Sender OK" in reply
    assert f"RCPT TO @{SIMULATOR_DOMAIN}: 250 2.1.5" in reply  # addresses as configured
    assert "success@" not in reply and "RSET, not sent" in reply
    assert record["last_error"] is None and record["delivered_at"] is None

    # `mailpipe status` shows it, with the relay's replies.
    shown = subprocess.run(
        [sys.executable, "-m", "ops", "status", mail_id, "--url", pipeline.publisher_url],
        env={**pipeline.service_env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"{mail_id}: sandboxed" in shown.stdout
    assert "sandbox, not sent; the relay answered: 2.1.5 Recipient OK" in shown.stdout

    # One trace, each step its own span as for a real send, RSET in place of DATA.
    spans = spans_of(pipeline, trace_id, {"POST /v1/messages", "smtp rset"})
    names = [s.name for s in spans]
    for step in ("POST /v1/messages", "mail deliver", "smtp mail from", "smtp rcpt to"):
        assert step in names, names
    assert "smtp rset" in names
    assert "smtp data" not in names
    [deliver] = [s for s in spans if s.name == "mail deliver"]
    assert deliver.attributes["mailpipe.outcome"] == "sandboxed"
    assert {s.trace_id for s in spans} == {trace_id}

    # The event fires, in the mail's trace, with the relay's reply.
    sandboxed = [e for e in events.until(mail_id, "sandboxed") if e["type"] == "sandboxed"]
    assert len(sandboxed) == 1
    [event] = sandboxed
    assert (event["reply_code"], event["enhanced_status"], event["trace_id"]) == (
        250,
        "2.1.5",
        trace_id,
    )
    traceparent = events.attributes_of(event)["googclient_traceparent"]
    assert traceparent.split("-")[1] == trace_id

    # The pooled connection (pool of 1), reset, carries the next real mail.
    connections = relay.connections_total
    real = pipeline.post_mail(mail(at("success")))
    delivered = pipeline.wait_for_status(real["mail_id"], {"delivered", "bounced", "sandboxed"})
    assert delivered["status"] == "delivered"
    [received] = relay.wait_for(1)
    assert str(received.message["Message-ID"]).startswith(f"<{real['mail_id']}@")
    assert relay.connections_total == connections  # no new connection: the reset one was reused
    real_spans = spans_of(pipeline, real["trace_id"], {"smtp data"})
    [real_deliver] = [s for s in real_spans if s.name == "mail deliver"]
    assert real_deliver.attributes["smtp.connection.reused"] is True

    # Counted as sandboxed, not as delivered (the subscriber's Prometheus endpoint).
    attempts = "mailpipe_delivery_attempts_count"
    samples = scrape_until(metrics_port, lambda s: total(s, attempts) >= 2)
    assert value(samples, "mailpipe_mails_sandboxed_total") == 1
    assert value(samples, "mailpipe_mails_delivered_total") == 1


def test_a_refused_rcpt_in_sandbox_is_a_bounce(stack: tuple[LocalPipeline, Relay, int]) -> None:
    pipeline, relay, _ = stack
    mark = relay.mark()
    accepted = pipeline.post_mail(mail(at("bounce"), sandbox=True))
    record = pipeline.wait_for_status(accepted["mail_id"], {"sandboxed", "delivered", "bounced"})
    assert record["status"] == "bounced"
    [attempt] = record["attempts"]
    assert (attempt["outcome"], attempt["reply_code"], attempt["enhanced_status"]) == (
        "bounced",
        550,
        "5.1.1",
    )
    assert attempt["failed_step"] == "rcpt to"
    assert "data" not in [c for c, _ in relay.since(mark)]

    # One recipient refused, one accepted: sandboxed, the refusal listed (as a real send would).
    mixed = pipeline.post_mail(mail(at("success"), at("bounce+x"), sandbox=True))
    record = pipeline.wait_for_status(mixed["mail_id"], {"sandboxed", "delivered", "bounced"})
    assert record["status"] == "sandboxed"
    assert "refused" in record["attempts"][-1]["reply_message"]
    assert relay.messages == []


def test_sandbox_must_be_a_json_boolean(stack: tuple[LocalPipeline, Relay, int]) -> None:
    pipeline, relay, _ = stack
    hostiles: list[Any] = ["yes", "true", "false", 1, 0, [], {}, {"on": True}]
    for hostile in hostiles:
        response = httpx.post(
            f"{pipeline.publisher_url}/v1/messages", json=mail(at("success"), sandbox=hostile)
        )
        assert response.status_code == 400, (hostile, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert list(error["fields"]) == ["sandbox"], error
    # Nothing of the refused requests was queued: the next mail is the relay's first.
    accepted = pipeline.post_mail(mail(at("success"), sandbox=None))  # null: the default
    record = pipeline.wait_for_status(accepted["mail_id"], {"delivered", "bounced", "sandboxed"})
    assert record["status"] == "delivered"
    assert len(relay.messages) == 1
    assert [r["mail_id"] for r in pipeline.api.records()["items"]] == [accepted["mail_id"]]


# -- the per-caller default ----------------------------------------------------------------------


@pytest.fixture
def publisher(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    apply_mail_topology: Callable[..., Topology],
    tmp_path: Path,
) -> Iterator[tuple[httpx.Client, Callable[[int], list[QueuedMail]]]]:
    """The publisher app with MAILPIPE_SANDBOX_CALLERS naming callers, over HTTP, and
    ``queued(n)``: the mails it queued on Pub/Sub, polled until ``n`` arrived."""
    topology = apply_mail_topology()
    env = {
        **pipeline_env(pubsub_emulator, pubsub_project, topology, tmp_path / "r.sqlite3", 25),
        "MAILPIPE_SANDBOX_CALLERS": f"{SANDBOX_CALLER.upper()}, sub:1234",
    }
    config = PublisherConfig.from_env(env, topology)
    record = open_record(config.record)
    real = PubSubMailPublisher(config.pubsub, timeout=10)
    app = create_app(config, publisher=real, record=record, identify_caller=caller_from_test_header)
    pull = subscriber_client(pubsub_emulator.host)
    subscription = pull.subscription_path(pubsub_project, topology.delivery_subscription.name)

    try:
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http, lambda expect: pull_until(pull, subscription, expect)
    finally:
        real.close()
        record.close()
        pull.close()


def test_a_sandbox_caller_always_sandboxes_and_cannot_turn_it_off(
    publisher: tuple[httpx.Client, Callable[[int], list[QueuedMail]]],
) -> None:
    http, queued = publisher

    def post(caller: str, **extra: Any) -> httpx.Response:
        return http.post(
            "/v1/messages", json=mail("bob@example.org", **extra), headers={CALLER_HEADER: caller}
        )

    by_default = post(SANDBOX_CALLER)
    by_subject = post("sub:1234")
    other = post("app@example-project.iam.gserviceaccount.com")
    other_asks = post("app@example-project.iam.gserviceaccount.com", sandbox=True)
    assert [r.status_code for r in (by_default, by_subject, other, other_asks)] == [202] * 4

    refused = post(SANDBOX_CALLER, sandbox=False)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "sandbox_required" and "sandbox" in error["fields"]

    sandbox = {m.mail_id: m.request.sandbox for m in queued(4)}
    assert sandbox == {
        by_default.json()["mail_id"]: True,
        by_subject.json()["mail_id"]: True,
        other.json()["mail_id"]: None,  # a real send, published without the field
        other_asks.json()["mail_id"]: True,
    }
    assert queued(0) == []  # the refused mail was never queued
