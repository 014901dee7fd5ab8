"""``mailpipe up --demo`` end to end: the stack as ``./dev up --demo`` runs it (the publisher and
the push subscriber as their own processes, the mailbox simulator, the demo's fast delivery
settings), then the demo itself, which runs ``mailpipe events tail`` and ``mailpipe dlq replay``
as processes the way an operator would. Each scenario must end in the status its row promises,
with its attempts and events; and the CLI's parsing of ``--demo``.
"""

from __future__ import annotations

import json
from pathlib import Path

from emulator import read_topology
from emulator.demo import DEMO_ENV, SCENARIOS, demo_topology, run_demo, write_env_file
from emulator.pipeline import run_local_pipeline
from mailpipe.topology import Topology
from ops.cli import build_parser


def test_the_demo_shows_each_outcome_with_its_events(
    tmp_path: Path, stack_topology: Topology, pubsub_project: str
) -> None:
    topology = demo_topology(stack_topology)  # its own names, the demo's settings
    delivery = topology.delivery_subscription
    assert delivery.dead_letter is not None and delivery.dead_letter.max_delivery_attempts == 5
    with run_local_pipeline(
        state_dir=tmp_path / "state",
        subscriber_mode="push",
        project=pubsub_project,
        topology=topology,
        extra_env=DEMO_ENV,
    ) as pipeline:
        # Pushed without a retry policy, which the emulator under load does not honour
        # (docs/local-vs-gcp.md 4b): the topology's application leaves it off.
        live = read_topology(topology, project=pubsub_project).delivery_subscription
        assert (live.delivery, live.retry_policy) == ("push", None)
        env_file = write_env_file(pipeline)
        outcomes = {o.scenario.name: o for o in run_demo(pipeline, step_timeout=120)}
        # A second run on the same state: its addresses carry a new label, so its bounce is a
        # bounce again (not `suppressed` by the first run's entry), then suppressed in turn.
        pair = [s for s in SCENARIOS if s.name in ("bounce", "suppressed")]
        again = {o.scenario.name: o for o in run_demo(pipeline, pair, step_timeout=120)}
        received = {
            str(m.message["Message-ID"]).strip("<>").split("@")[0] for m in pipeline.smtp.messages
        }

    assert set(outcomes) == {s.name for s in SCENARIOS}
    problems = {name: o.to_json() for name, o in outcomes.items() if not o.ok}
    assert problems == {}

    def attempts(name: str) -> list[str]:
        record = outcomes[name].record or {}
        return [a["outcome"] for a in record["attempts"] if a["outcome"]]

    delivered = outcomes["delivered"]
    assert delivered.statuses == ["delivered"] and delivered.mail_id in received
    assert delivered.events == ["accepted", "delivered"]

    bounce = outcomes["bounce"]
    assert bounce.statuses == ["bounced"] and attempts("bounce") == ["bounced"]
    assert bounce.events == ["accepted", "bounced"]
    assert bounce.mail_id not in received

    deferral = outcomes["deferral, then delivered"]
    assert attempts("deferral, then delivered") == ["deferred", "deferred", "delivered"]
    assert deferral.events == ["accepted", "deferred", "deferred", "delivered"]

    sandbox = outcomes["sandbox"]
    assert sandbox.statuses == ["sandboxed"] and sandbox.mail_id not in received
    assert sandbox.events == ["accepted", "sandboxed"]

    dead = outcomes["dead letter, then replay"]
    assert dead.statuses == ["dead_lettered", "delivered"]
    assert attempts("dead letter, then replay") == ["deferred"] * 6 + ["delivered"]
    assert dead.mail_id in received
    assert dead.mail_id in (dead.replay or "")
    for kind in ("dead_lettered", "replayed", "delivered"):
        assert kind in dead.events, dead.events
    assert dead.events.index("dead_lettered") < dead.events.index("replayed")

    suppressed = outcomes["suppressed"]
    assert suppressed.statuses == ["suppressed"] and suppressed.mail_id not in received
    assert suppressed.events == ["accepted", "suppressed"]
    assert [o.statuses for o in again.values()] == [["bounced"], ["suppressed"]]

    expired = outcomes["expired"]
    assert expired.statuses == ["expired"] and expired.mail_id not in received
    assert expired.events[0] == "accepted" and expired.events[-1] == "expired"
    assert "delivered" not in expired.events

    # What a user reads afterwards: the events file and the settings for another shell.
    kept = [
        json.loads(line)["event"]
        for line in (tmp_path / "state" / "events.jsonl").read_text().splitlines()
    ]
    assert {e["type"] for e in kept} >= {
        "accepted",
        "bounced",
        "sandboxed",
        "dead_lettered",
        "replayed",
        "suppressed",
        "expired",
    }
    settings = env_file.read_text()
    assert f"export MAILPIPE_URL={pipeline.publisher_url}" in settings
    assert "PUBSUB_EMULATOR_HOST=" in settings and "MAILPIPE_RECORD=" in settings


def test_up_takes_demo() -> None:
    assert build_parser().parse_args(["up", "--demo", "--once"]).demo is True
    assert build_parser().parse_args(["up"]).demo is False
