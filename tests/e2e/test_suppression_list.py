"""End to end: the suppression list with the publisher and push subscriber as real processes,
the mailbox simulator as the relay and each record backend (SQLite file, Firestore emulator).

A hard bounce at RCPT (``bounce@``: 550 5.1.1) adds the recipient with its reply; the next mail to
``bounce@`` and ``success@`` reaches ``success@`` only, and the SMTP server never sees a RCPT for
``bounce@``; a mail to ``bounce@`` alone ends ``suppressed`` without an SMTP connection.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from google.cloud import pubsub_v1

from emulator.pipeline import run_local_pipeline
from emulator.smtp import SIMULATOR_DOMAIN, LocalSmtpServer, MailboxSimulator
from mailpipe.topology import Topology

KEY = "an-hmac-key-for-tests-only-0123456789abcdef"


class WatchedSimulator(MailboxSimulator):
    """The simulator, remembering every RCPT TO it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts: list[str] = []
        self._seen = threading.Lock()

    def rcpt_reply(self, address: str) -> str | None:
        with self._seen:
            self.rcpts.append(address.lower())
        return super().rcpt_reply(address)


@pytest.mark.parametrize("backend", ["sqlite", "firestore"])
def test_a_hard_bounce_suppresses_the_recipient_for_the_next_mails(
    tmp_path: Path,
    stack_topology: Topology,
    pubsub_project: str,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    env = {"MAILPIPE_SMTP_TIMEOUT": "5", "MAILPIPE_SUPPRESSION_KEY": KEY}
    if backend == "firestore":
        request.getfixturevalue("firestore_emulator")  # FIRESTORE_EMULATOR_HOST for the services
        env["MAILPIPE_RECORD"] = "firestore://(default)"
    label = uuid.uuid4().hex[:10]  # Firestore's collection is shared by the session's tests
    bounce, success = (f"{local}+{label}@{SIMULATOR_DOMAIN}" for local in ("bounce", "success"))
    simulator = WatchedSimulator()
    with (
        LocalSmtpServer(simulator=simulator) as smtp,
        run_local_pipeline(
            state_dir=tmp_path / "state",
            subscriber_mode="push",
            project=pubsub_project,
            topology=stack_topology,
            extra_env=env,
            smtp_server=smtp,
        ) as stack,
        httpx.Client(base_url=stack.publisher_url, timeout=30) as http,
    ):
        events = pubsub_v1.SubscriberClient()
        events_sub = events.subscription_path(pubsub_project, f"suppression-events-{label}")
        topic = events.topic_path(pubsub_project, stack_topology.events_topic.name)
        events.create_subscription(name=events_sub, topic=topic)

        def send(*recipients: str) -> str:
            mail = {"from": "s@example.com", "to": list(recipients), "subject": "s", "text": "t"}
            return str(stack.post_mail(mail)["mail_id"])

        def final(mail_id: str) -> dict[str, Any]:
            return stack.wait_for_status(mail_id, {"delivered", "bounced", "suppressed"})

        first = send(bounce)
        assert final(first)["status"] == "bounced"
        entry = http.get(f"/v1/suppressions/{quote(bounce, safe='@')}").json()
        assert entry["reason"] == "bounce" and entry["mail_id"] == first
        assert (entry["reply_code"], entry["enhanced_status"]) == (550, "5.1.1")
        assert "user unknown" in entry["reply"]
        assert entry["address"] is None and entry["key"].startswith("hmac-sha256:")
        assert simulator.rcpts.count(bounce) == 1

        second = send(bounce, success)
        record = final(second)
        assert record["status"] == "delivered"
        [last] = [a for a in record["attempts"] if a["outcome"]]
        assert [(r["status"]) for r in last["recipients"]] == ["suppressed"]
        assert simulator.rcpts.count(bounce) == 1  # no RCPT TO for it since the bounce
        [received] = [m for m in smtp.messages if success in m.recipients]
        assert received.recipients == (success,)

        connections = smtp.connections_total
        third = send(bounce)
        record = final(third)
        assert record["status"] == "suppressed"
        assert [a["outcome"] for a in record["attempts"]] == ["suppressed"]
        assert smtp.connections_total == connections and simulator.rcpts.count(bounce) == 1

        # The operator's view: `mailpipe status` and `mailpipe suppressions list`.
        shown = cli("status", third, "--url", stack.publisher_url)
        assert "suppressed" in shown and f"bounce+{label}" not in shown
        listed = json.loads(cli("suppressions", "--url", stack.publisher_url, "--json", "list"))
        assert entry["key"] in [item["key"] for item in listed]

        # One `suppressed` event per mail that left the recipient out, naming only it (as the
        # address policy shows it: the domain) and joined to the mail's trace.
        suppressed = [e for e in pull_events(events, events_sub) if e["type"] == "suppressed"]
        assert {e["mail_id"] for e in suppressed} == {second, third}
        for event in suppressed:
            assert event["recipients"] == [f"@{SIMULATOR_DOMAIN}"]
            assert event["trace_id"] == stack.get_record(event["mail_id"])["trace_id"]
        events.delete_subscription(subscription=events_sub)
        events.close()

        # Reactivation (as Postmark's): the next mail is tried again, and bounces again.
        assert http.delete(f"/v1/suppressions/{quote(bounce, safe='@')}").status_code == 204
        assert final(send(bounce))["status"] == "bounced"
        assert simulator.rcpts.count(bounce) == 2

    # Logs and spans show the recipient only as MAILPIPE_LOG_ADDRESSES (domain) allows.
    for written in (
        tmp_path / "state" / "traces.jsonl",
        *(tmp_path / "state" / "logs" / f"{name}.log" for name in ("publisher", "subscriber")),
    ):
        assert f"bounce+{label}" not in written.read_text(errors="replace").lower(), written
    if backend == "sqlite":  # the hashed key is all the file holds of the address
        with sqlite3.connect(tmp_path / "state" / "record.sqlite3") as conn:
            rows = repr(conn.execute("SELECT * FROM suppressions").fetchall())
        assert f"bounce+{label}" not in rows and "hmac-sha256:" in rows


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ops", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def pull_events(client: pubsub_v1.SubscriberClient, subscription: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for _ in range(5):
        answer = client.pull(subscription=subscription, max_messages=100, timeout=10)
        if not answer.received_messages and found:
            break
        found += [json.loads(m.message.data) for m in answer.received_messages]
    return found
