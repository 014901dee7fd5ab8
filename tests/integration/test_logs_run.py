"""The services' logs from a real run: Cloud Logging JSON joined to the traces, no secrets.

The publisher and the subscriber run as their own processes (as ``mailpipe up`` and Cloud Run run
them); their stdout and stderr go to ``<state>/logs/<service>.log``, which is what Cloud Run's
logging agent would read. The relay requires AUTH, so the SMTP password is really used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from emulator.pipeline import LocalPipeline
from emulator.smtp import LocalSmtpServer
from mailpipe.topology import Topology
from tests.fixtures.pipeline import pipeline_processes

SMTP_USER = "mailer"
SMTP_PASSWORD = "pw-marker-2c7a41"  # the local server's test login
BODY_MARKER = "body-marker-93e0b5"
TRACE = "logging.googleapis.com/trace"
SPAN_ID = "logging.googleapis.com/spanId"
SAMPLED = "logging.googleapis.com/trace_sampled"


@pytest.fixture
def topology(stack_topology: Topology) -> Topology:
    return stack_topology


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log as JSON (fails on a line that is not)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{path.name}: not a JSON log line: {line!r}")
    return entries


def delivery_lines(pipeline: LocalPipeline, mail_id: str, count: int) -> list[dict[str, Any]]:
    """The subscriber's "mail <outcome>" lines for ``mail_id``, polled until ``count`` are in."""
    deadline = time.monotonic() + 15
    while True:
        lines = [
            entry
            for entry in json_lines(pipeline.subscriber.log_path)
            if entry.get("mail_id") == mail_id and entry["message"].startswith("mail ")
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_logs_are_cloud_logging_json_joined_to_traces_without_secrets(
    tmp_path: Path, topology: Topology, pubsub_project: str
) -> None:
    smtp = LocalSmtpServer(auth={SMTP_USER: SMTP_PASSWORD})
    smtp.fail("rcpt", 451, "4.3.0 try later", times=1, address="deferred@example.org")
    smtp.fail("rcpt", 550, "5.1.1 no such user", address="bounced@example.org")
    env = {
        "MAILPIPE_SMTP_TIMEOUT": "5",
        "MAILPIPE_SMTP_USERNAME": SMTP_USER,
        "MAILPIPE_SMTP_PASSWORD": SMTP_PASSWORD,
        "MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH": "1",  # loopback only
    }
    with pipeline_processes(smtp, tmp_path, pubsub_project, topology, extra_env=env) as pipeline:
        cases = []
        for to, status, outcomes in [
            ("delivered@example.org", "delivered", ["delivered"]),
            ("deferred@example.org", "delivered", ["deferred", "delivered"]),
            ("bounced@example.org", "bounced", ["bounced"]),
        ]:
            accepted = pipeline.post_mail(
                {
                    "from": "sender@example.com",
                    "to": [to],
                    "subject": "hi",
                    "text": f"{BODY_MARKER} text",
                    "html": f"<p>{BODY_MARKER} html</p>",
                }
            )
            pipeline.wait_for_status(accepted["mail_id"], {status})
            cases.append((accepted, outcomes))
        assert [m.login for m in smtp.messages] == [SMTP_USER, SMTP_USER]

        for accepted, outcomes in cases:
            lines = delivery_lines(pipeline, accepted["mail_id"], len(outcomes))
            assert [line["outcome"] for line in lines] == outcomes
            for line in lines:
                # Each line opens the mail's trace in the console (the `mail deliver` span).
                assert line[TRACE] == f"projects/{pubsub_project}/traces/{accepted['trace_id']}"
                assert len(line[SPAN_ID]) == 16 and int(line[SPAN_ID], 16)
                assert line[SAMPLED] is True
                assert line["serviceContext"] == {"service": "mailpipe-subscriber"}
                assert line["severity"] in {"INFO", "WARNING", "ERROR"}
                assert line["logger"] == "subscriber.delivery"
            deferred = [line for line in lines if line["outcome"] == "deferred"]
            assert all(line["reply_code"] == 451 for line in deferred)

    for log in (pipeline.subscriber.log_path, pipeline.publisher.log_path):
        entries = json_lines(log)  # every line, not only ours, is Cloud Logging JSON
        assert entries, f"{log.name} is empty"
        assert all({"severity", "message", "time"} <= entry.keys() for entry in entries)
        text = log.read_text(encoding="utf-8")
        assert SMTP_PASSWORD not in text, f"{log.name} contains the SMTP password"
        assert BODY_MARKER not in text, f"{log.name} contains a mail body"
