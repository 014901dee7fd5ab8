"""End to end: the local stack's mailbox simulator, with the services as real processes.

The publisher and the push subscriber run as ``mailpipe up`` runs them (``run_local_pipeline``,
the simulator on by default), with fast retries (each second, no retry policy; 5 attempts):
each simulator address ends in the status its README row promises, and a dead letter is
replayed with ``python -m ops dlq replay`` as an operator would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from emulator.pipeline import LocalPipeline, run_local_pipeline
from emulator.smtp import SIMULATOR_DOMAIN
from mailpipe.topology import Topology

FINAL = {"delivered", "bounced", "dead_lettered"}


def at(local: str) -> str:
    return f"{local}@{SIMULATOR_DOMAIN}"


def local_stack(
    tmp_path: Path, topology: Topology, project: str
) -> AbstractContextManager[LocalPipeline]:
    """The stack as `./dev up` runs it (push, the simulator on by default), fast retries.

    Applied to the emulator, the pushed delivery subscription gets no retry policy (with one, the
    emulator's push loop stops re-POSTing a message it got 503 for after 2-4 POSTs, so a deferral
    would never reach its dead letter: docs/local-vs-gcp.md, row 4b). It re-POSTs every second,
    and the dead-letter policy (5 attempts) still decides the end."""
    return run_local_pipeline(
        state_dir=tmp_path / "state",
        subscriber_mode="push",
        project=project,
        topology=topology,
        extra_env={"MAILPIPE_SMTP_TIMEOUT": "5"},
    )


def send(pipeline: LocalPipeline, *recipients: str) -> str:
    accepted = pipeline.post_mail(
        {"from": "sender@example.com", "to": list(recipients), "subject": "hi", "text": "hello"}
    )
    return str(accepted["mail_id"])


def attempts(record: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [
        (a["outcome"], a["reply_code"], a["enhanced_status"])
        for a in record["attempts"]
        if a["outcome"] is not None
    ]


def test_simulator_addresses_end_as_their_replies_say(
    tmp_path: Path, stack_topology: Topology, pubsub_project: str
) -> None:
    with local_stack(tmp_path, stack_topology, pubsub_project) as pipeline:
        assert pipeline.smtp.simulator is not None
        assert pipeline.smtp.simulator.domain == SIMULATOR_DOMAIN
        mails = {
            "bounce": send(pipeline, at("bounce")),
            "unknown": send(pipeline, at("nobody")),
            "defer-2": send(pipeline, at("defer-2")),
            "mixed": send(pipeline, at("success"), at("bounce+mixed")),
            "slow": send(pipeline, at("slow-1")),
            "forever": send(pipeline, at("defer-forever")),
            "elsewhere": send(pipeline, "bounce@example.org"),
        }
        with ThreadPoolExecutor(len(mails)) as pool:
            records = dict(
                zip(
                    mails,
                    pool.map(
                        lambda mail_id: pipeline.wait_for_status(mail_id, FINAL, timeout=120),
                        mails.values(),
                    ),
                    strict=True,
                )
            )
        received = {
            str(m.message["Message-ID"]).strip("<>").split("@")[0]: m
            for m in pipeline.smtp.messages
        }

    bounce = records["bounce"]
    assert bounce["status"] == "bounced"
    [(outcome, code, enhanced)] = attempts(bounce)
    assert (outcome, code, enhanced) == ("bounced", 550, "5.1.1")
    assert bounce["attempts"][-1]["failed_step"] == "rcpt to"

    unknown = records["unknown"]
    assert unknown["status"] == "bounced"
    assert attempts(unknown) == [("bounced", 550, "5.1.1")]
    assert "defer-forever" in unknown["attempts"][-1]["reply_message"]

    defer = records["defer-2"]
    assert defer["status"] == "delivered"
    assert attempts(defer) == [
        ("deferred", 451, "4.2.0"),
        ("deferred", 451, "4.2.0"),
        ("delivered", 250, "2.0.0"),
    ]
    assert received[mails["defer-2"]].recipients == (at("defer-2"),)

    assert records["mixed"]["status"] == "delivered"
    assert received[mails["mixed"]].recipients == (at("success"),)

    assert records["slow"]["status"] == "delivered"
    assert mails["slow"] in received

    forever = records["forever"]
    assert forever["status"] == "dead_lettered"
    assert set(attempts(forever)) == {("deferred", 451, "4.2.0")}
    assert mails["forever"] not in received

    assert records["elsewhere"]["status"] == "delivered"  # other domains: as without it
    assert received[mails["elsewhere"]].recipients == ("bounce@example.org",)


def test_a_dead_lettered_deferral_is_replayed_and_delivered(
    tmp_path: Path, stack_topology: Topology, pubsub_project: str
) -> None:
    """``defer-6`` outlasts the 5 attempts: dead-lettered; the replay is the same mail (same
    Message-ID), so the simulator counts on: attempt 6 is deferred, attempt 7 delivered."""
    max_attempts = 5
    assert stack_topology.delivery_subscription.dead_letter is not None
    assert stack_topology.delivery_subscription.dead_letter.max_delivery_attempts == max_attempts
    with local_stack(tmp_path, stack_topology, pubsub_project) as pipeline:
        mail_id = send(pipeline, at("defer-6"))
        dead = pipeline.wait_for_status(mail_id, FINAL, timeout=120)
        assert dead["status"] == "dead_lettered"
        assert pipeline.smtp.messages == []

        replay = subprocess.run(
            [sys.executable, "-m", "ops", "dlq", "replay", "--id", mail_id, "--json"],
            env=pipeline.service_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        delivered = pipeline.wait_for_status(mail_id, {"delivered", "bounced"}, timeout=120)
        [received] = pipeline.smtp.wait_for(1)

    assert mail_id in json.dumps(json.loads(replay.stdout))
    assert delivered["status"] == "delivered"
    outcomes = [outcome for outcome, _, _ in attempts(delivered)]
    assert outcomes == ["deferred"] * 6 + ["delivered"]
    assert str(received.message["Message-ID"]).startswith(f"<{mail_id}@")
