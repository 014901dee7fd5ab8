"""Give-up time end to end (docs/deliver-by.md): the services as real processes, Google's Pub/Sub
emulator, the mailbox simulator, and ``mailpipe dlq replay --due`` run as the scheduled job runs
it (its own process, configured by the environment).

A long deferral is compressed by configuration: Pub/Sub gives up after the test topology's 5
attempts (1-2 s backoff) and the retry schedule is ``F,1h,2s`` (an attempt every 2 seconds after
acceptance). One mail recovers after 11 refusals (two due replays) and ends ``delivered``; one
never recovers and ends ``expired`` at its ``deliver_by``. Each carries its events, and each
replay is its own trace linked to the mail's first trace.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator import RunningEmulator
from emulator.pipeline import LocalPipeline, run_local_pipeline
from emulator.smtp import SIMULATOR_DOMAIN
from mailpipe.topology import Topology
from ops.trace_view import SpanRecord, read_spans
from tests.integration.test_delivery_events import EventReader

REPO = Path(__file__).resolve().parents[2]
SCHEDULE = "F,1h,2s"


@pytest.fixture
def pipeline(
    tmp_path: Path, stack_topology: Topology, pubsub_project: str
) -> Iterator[LocalPipeline]:
    with run_local_pipeline(
        state_dir=tmp_path / "state",
        subscriber_mode="pull",
        project=pubsub_project,
        topology=stack_topology,
        extra_env={"MAILPIPE_SMTP_TIMEOUT": "5", "MAILPIPE_RETRY_SCHEDULE": SCHEDULE},
    ) as running:
        yield running


@pytest.fixture
def events(
    pipeline: LocalPipeline, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> Iterator[EventReader]:
    reader = EventReader(
        pubsub_emulator, pubsub_project, pipeline.emulators.topology.events_topic.name
    )
    yield reader
    reader.close()


def mailpipe(pipeline: LocalPipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``mailpipe`` CLI as its own process, in the services' environment."""
    return subprocess.run(
        [sys.executable, "-m", "ops", *args],
        env=pipeline.service_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def replay_due(pipeline: LocalPipeline) -> dict[str, Any]:
    """One ``mailpipe dlq replay --due --json`` pass, as the Cloud Run job runs it."""
    done = mailpipe(pipeline, "dlq", "replay", "--due", "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def run_passes(
    pipeline: LocalPipeline, mail_id: str, final: str, timeout: float = 150.0
) -> list[dict[str, Any]]:
    """Due passes until the mail's record is ``final``; its outcomes, in order."""
    outcomes: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = pipeline.get_record(mail_id)
        assert record is not None
        if record["status"] == final:
            return outcomes
        for outcome in replay_due(pipeline)["outcomes"]:
            assert outcome["mail_id"] == mail_id, outcome
            if outcome["status"] == "replayed":
                assert outcome["record_status"] == "replayed", outcome
            outcomes.append(outcome)
        time.sleep(0.5)
    raise AssertionError(f"{mail_id} never became {final}: {pipeline.get_record(mail_id)}")


def unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events once each (a redelivered copy may publish one twice, with the same event_id)."""
    return list({e["event_id"]: e for e in events}.values())


def spans_of(pipeline: LocalPipeline, trace_id: str, name: str) -> list[SpanRecord]:
    deadline = time.monotonic() + 20
    while True:
        found = [
            s for s in read_spans(pipeline.trace_file) if s.trace_id == trace_id and s.name == name
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def assert_each_replay_is_a_trace_linked_to_the_mails(
    pipeline: LocalPipeline, replays: list[dict[str, Any]], mail_trace: str
) -> None:
    traces = [r["trace_id"] for r in replays]
    assert len(set(traces)) == len(traces) and mail_trace not in traces
    for trace_id in traces:
        [replay] = spans_of(pipeline, trace_id, "mail replay")
        assert mail_trace in {link["trace_id"] for link in replay.links}, replay.links
        assert replay.service == "mailpipe-cli"
        # The replayed attempts run in the replay's trace.
        assert spans_of(pipeline, trace_id, "mail deliver")


def test_a_long_deferral_is_delivered_after_dead_letter_and_due_replays(
    pipeline: LocalPipeline, events: EventReader
) -> None:
    to = f"defer-11@{SIMULATOR_DOMAIN}"  # 11 refusals: 5 + 5 Pub/Sub attempts, then one more
    accepted = pipeline.post_mail({"from": "a@example.com", "to": [to], "text": "hi"})
    mail_id = accepted["mail_id"]
    record = pipeline.get_record(mail_id)
    assert record is not None and record["deliver_by"] is not None
    # Default deliver_by: accepted + 72 h.
    accepted_at = dt.datetime.fromisoformat(record["accepted_at"])
    deliver_by = dt.datetime.fromisoformat(record["deliver_by"])
    assert deliver_by - accepted_at == dt.timedelta(hours=72)

    dead = pipeline.wait_for_status(mail_id, {"dead_lettered"}, timeout=90)
    assert dead["next_attempt_at"] is not None
    assert accepted_at < dt.datetime.fromisoformat(dead["next_attempt_at"]) < deliver_by
    status = mailpipe(pipeline, "status", mail_id, "--url", pipeline.publisher_url)
    assert "next attempt:" in status.stdout and "deliver by:" in status.stdout, status.stdout

    outcomes = run_passes(pipeline, mail_id, "delivered")
    replays = [o for o in outcomes if o["status"] == "replayed"]
    assert len(replays) == 2, outcomes
    assert {o["status"] for o in outcomes} <= {"replayed", "not_due", "already_final"}
    [received] = pipeline.smtp.wait_for(1)
    assert received.recipients == (to,)
    final = pipeline.get_record(mail_id)
    assert final is not None and final["status"] == "delivered"
    assert final["next_attempt_at"] is None
    outcomes_recorded = [a["outcome"] for a in final["attempts"]]
    assert outcomes_recorded == ["deferred"] * 11 + ["delivered"], outcomes_recorded

    seen = unique(events.until(mail_id, "delivered", timeout=60))
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "accepted" and kinds[-1] == "delivered"
    assert kinds.count("deferred") == 11
    assert kinds.count("dead_lettered") == 2 and kinds.count("replayed") == 2
    assert "expired" not in kinds
    assert_each_replay_is_a_trace_linked_to_the_mails(pipeline, replays, accepted["trace_id"])


def test_a_mail_that_never_recovers_expires_at_its_deliver_by(
    pipeline: LocalPipeline, events: EventReader
) -> None:
    to = f"defer-forever@{SIMULATOR_DOMAIN}"
    deliver_by = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=40)
    accepted = pipeline.post_mail(
        {"from": "a@example.com", "to": [to], "text": "hi", "deliver_by": deliver_by.isoformat()}
    )
    mail_id = accepted["mail_id"]
    record = pipeline.get_record(mail_id)
    assert record is not None
    assert dt.datetime.fromisoformat(record["deliver_by"]) == deliver_by

    outcomes = run_passes(pipeline, mail_id, "expired", timeout=180)
    replays = [o for o in outcomes if o["status"] == "replayed"]
    assert replays, outcomes
    final = pipeline.get_record(mail_id)
    assert final is not None and final["status"] == "expired"
    assert "deliver_by" in (final["last_error"] or "")
    assert pipeline.smtp.messages == []  # never sent
    # Expired is final: a later pass only acks a copy left behind, and then finds none.
    assert {o["status"] for o in replay_due(pipeline)["outcomes"]} <= {"already_final"}
    assert replay_due(pipeline)["outcomes"] == []

    seen = unique(events.until(mail_id, "expired", timeout=60))
    kinds = [e["type"] for e in seen]
    assert kinds[0] == "accepted" and kinds[-1] == "expired" and kinds.count("expired") == 1
    assert "deferred" in kinds and "dead_lettered" in kinds and "replayed" in kinds
    assert "delivered" not in kinds
    assert_each_replay_is_a_trace_linked_to_the_mails(pipeline, replays, accepted["trace_id"])
