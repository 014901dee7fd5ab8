"""``mailpipe up --demo``: each delivery outcome once, in a minute, with no set-up.

The local stack runs with fast delivery settings (:func:`demo_topology`: a 10 s ack deadline,
Pub/Sub retries 1-2 s apart, the dead letter after 5 attempts) and the demo sends one mail per
:data:`SCENARIOS` entry to the mailbox simulator (README: Mailbox simulator): a delivery, a bounce,
a deferral that recovers, a sandbox mail, and a dead letter that ``mailpipe dlq replay`` brings
back. It runs the commands an operator would (``mailpipe events tail --json``, its output kept in
``events.jsonl`` in the state directory; ``mailpipe dlq replay --id``), waits for each mail's
record to reach its status, and reports, per mail, the record's attempts and the events seen.

A file env.sh in the state directory holds the stack's settings: source it in another shell and
``mailpipe status``, ``mailpipe events tail``, ``mailpipe dlq list`` talk to it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from client import FINAL_STATUSES
from emulator.pipeline import LocalPipeline, ServiceProcess, start_service
from emulator.smtp import SIMULATOR_DOMAIN
from mailpipe.topology import DeadLetterPolicy, RetryPolicy, Topology

# The delivery subscription's settings in the demo: a transient failure is retried within
# seconds and dead-lettered after Pub/Sub's minimum of 5 attempts (production: topology.json).
DEMO_DELIVERY: dict[str, Any] = {
    "ack_deadline_seconds": 10,
    "retry_policy": RetryPolicy("1s", "2s"),
    "dead_letter": DeadLetterPolicy("dead_letter", 5),
}
# Settings both services get in the demo (run_local_pipeline's extra_env).
DEMO_ENV: dict[str, str] = {
    "MAILPIPE_SMTP_TIMEOUT": "10",
    # LEAD (deliver-by, D): the retry schedule of `dlq replay --due` in seconds goes here.
}
STEP_TIMEOUT = 120.0  # seconds one scenario may take (the dead letter needs about 15)
EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class Scenario:
    """One mail of the demo: to ``local@<simulator domain>``, with ``fields`` added to it; done
    when its record reaches one of ``reaches``. With ``replay``: then ``mailpipe dlq replay
    REPLAY`` (``{mail_id}`` replaced) and done when it reaches one of ``then``."""

    name: str
    local: str
    reaches: frozenset[str]
    fields: Mapping[str, Any] = field(default_factory=dict)
    replay: tuple[str, ...] = ()
    then: frozenset[str] = frozenset()
    after: str | None = None  # sent once the scenario of this name is done


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("delivered", "success", frozenset({"delivered"})),
    Scenario("bounce", "bounce", frozenset({"bounced"})),
    Scenario("deferral, then delivered", "defer-2", frozenset({"delivered"})),
    Scenario("sandbox", "success+sandbox", frozenset({"sandboxed"}), {"sandbox": True}),
    Scenario(
        "dead letter, then replay",
        "defer-6",  # 5 deferrals dead-letter it; the replay's first attempt is deferred too
        frozenset({"dead_lettered"}),
        replay=("--id", "{mail_id}"),
        then=frozenset({"delivered"}),
    ),
    # ── LEAD: the sibling features slot in here once merged ───────────────────────────────
    # S (suppression list): the second mail to bounce@ once the bounce added it to the list:
    #   Scenario("suppressed", "bounce", frozenset({"suppressed"}), after="bounce"),
    # D (deliver-by, `dlq replay --due`): a mail that never recovers, given up on time:
    #   Scenario("expired", "defer-forever", frozenset({"dead_lettered"}),
    #            {"deliver_by": "<now + 20 s, ISO 8601>"}, replay=("--due",),
    #            then=frozenset({"expired"})),
    # (a `fields` value may need computing at send time: see _send.)
)


@dataclass
class Outcome:
    """What one scenario did: the mail, its record, and the events seen for it."""

    scenario: Scenario
    mail_id: str | None = None
    trace_id: str | None = None
    record: dict[str, Any] | None = None
    statuses: list[str] = field(default_factory=list)  # as reached, in order
    replay: str | None = None  # the replay command's output (JSON), when there was one
    events: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        expected = self.scenario.then if self.scenario.replay else self.scenario.reaches
        return self.error is None and bool(self.statuses) and self.statuses[-1] in expected

    def to_json(self) -> dict[str, Any]:
        attempts = (self.record or {}).get("attempts") or []
        return {
            "scenario": self.scenario.name,
            "to": self.scenario.local,
            "mail_id": self.mail_id,
            "trace_id": self.trace_id,
            "statuses": self.statuses,
            "attempts": [a.get("outcome") for a in attempts],
            "events": self.events,
            "ok": self.ok,
            "error": self.error,
        }


def demo_topology(topology: Topology) -> Topology:
    """``topology`` with the demo's fast delivery settings (:data:`DEMO_DELIVERY`)."""
    subscriptions = dict(topology.subscriptions)
    subscriptions["delivery"] = dataclasses.replace(subscriptions["delivery"], **DEMO_DELIVERY)
    changed = Topology(topics=dict(topology.topics), subscriptions=subscriptions)
    changed.validate()
    return changed


def write_env_file(pipeline: LocalPipeline) -> Path:
    """Write env.sh in the state directory: the stack's settings for the CLI in another shell."""
    names = ("PUBSUB_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
    env = {k: v for k, v in pipeline.service_env.items() if k in names or k.startswith("MAILPIPE_")}
    env["MAILPIPE_URL"] = pipeline.publisher_url
    path = pipeline.state_dir / "env.sh"
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    path.write_text(
        "# . this file: the mailpipe CLI then talks to ./dev up's stack\n"
        + "\n".join(lines)
        + "\n",
        encoding="utf-8",
    )
    return path


class EventLog:
    """``mailpipe events tail --json`` running beside the demo, its lines in a file."""

    def __init__(self, pipeline: LocalPipeline) -> None:
        self.path = pipeline.state_dir / EVENTS_FILE
        self.path.unlink(missing_ok=True)
        (pipeline.state_dir / "logs" / "events-tail.log").unlink(missing_ok=True)  # appended to
        self._process: ServiceProcess = start_service(
            "events-tail",
            ["ops", "events", "tail", "--json"],
            env=pipeline.service_env,
            log_dir=pipeline.state_dir / "logs",
            ready_marker="tailing ",
        )
        self._process.wait_healthy()

    def types(self, mail_id: str) -> list[str]:
        """The event types of ``mail_id`` so far, in the order they happened."""
        found = []
        for line in self._process.log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                event = json.loads(line)["event"]
                if event["mail_id"] == mail_id:
                    found.append((event["occurred_at"], event["attempt"], event["type"]))
        return [kind for _, _, kind in sorted(found)]

    def wait_for(self, mail_id: str, kind: str, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while kind not in (seen := self.types(mail_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen

    def close(self) -> None:
        self._process.stop()
        # Kept for the user: the events as `mailpipe events tail --json` printed them.
        lines = self._process.log_path.read_text(encoding="utf-8").splitlines()
        self.path.write_text("".join(f"{x}\n" for x in lines if x.startswith("{")), "utf-8")


def run_demo(
    pipeline: LocalPipeline,
    scenarios: Sequence[Scenario] = SCENARIOS,
    *,
    step_timeout: float = STEP_TIMEOUT,
) -> list[Outcome]:
    """Run each scenario against the running stack (all at once, ``after`` respected)."""
    simulator = pipeline.smtp.simulator
    domain = simulator.domain if simulator is not None else SIMULATOR_DOMAIN
    outcomes = {s.name: Outcome(s) for s in scenarios}
    done = {s.name: threading.Event() for s in scenarios}
    with ExitStack() as stack:
        events = EventLog(pipeline)
        stack.callback(events.close)

        def run(scenario: Scenario) -> None:
            outcome = outcomes[scenario.name]
            try:
                if scenario.after is not None:
                    done[scenario.after].wait(step_timeout)
                _run(pipeline, scenario, outcome, domain, events, step_timeout)
            except Exception as exc:  # a failed scenario is reported, the others go on
                outcome.error = f"{type(exc).__name__}: {exc}"
            finally:
                done[scenario.name].set()

        with ThreadPoolExecutor(len(scenarios)) as pool:
            list(pool.map(run, scenarios))
    return list(outcomes.values())


def _run(
    pipeline: LocalPipeline,
    scenario: Scenario,
    outcome: Outcome,
    domain: str,
    events: EventLog,
    timeout: float,
) -> None:
    accepted = pipeline.api.send(_mail(scenario, domain))
    outcome.mail_id, outcome.trace_id = accepted.mail_id, accepted.trace_id
    final = set(FINAL_STATUSES) | set(scenario.reaches)
    outcome.record = pipeline.wait_for_status(accepted.mail_id, final, timeout=timeout)
    outcome.statuses.append(outcome.record["status"])
    outcome.events = events.wait_for(accepted.mail_id, outcome.record["status"])
    if not scenario.replay or outcome.record["status"] not in scenario.reaches:
        return
    args = [a.replace("{mail_id}", accepted.mail_id) for a in scenario.replay]
    replayed = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "ops", "dlq", "replay", *args, "--json"],
        env=pipeline.service_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    outcome.replay = replayed.stdout.strip()
    if replayed.returncode != 0:
        raise RuntimeError(
            f"`mailpipe dlq replay` exited {replayed.returncode}: "
            f"{replayed.stdout}{replayed.stderr}"
        )
    then = set(FINAL_STATUSES - {"dead_lettered"}) | set(scenario.then)
    outcome.record = pipeline.wait_for_status(accepted.mail_id, then, timeout=timeout)
    outcome.statuses.append(outcome.record["status"])
    outcome.events = events.wait_for(accepted.mail_id, outcome.record["status"])


def _mail(scenario: Scenario, domain: str) -> dict[str, Any]:
    return {
        "from": "mailpipe demo <demo@example.com>",
        "to": [f"{scenario.local}@{domain}"],
        "subject": f"mailpipe demo: {scenario.name}",
        "text": f"The demo's {scenario.name} mail.\n",
        "metadata": {"demo": scenario.name},
        **scenario.fields,
    }


def _runs(items: Sequence[str]) -> str:
    """``deferred x6, delivered`` for six ``deferred`` and a ``delivered``."""
    runs: list[list[Any]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return ", ".join(f"{item} x{n}" if n > 1 else str(item) for item, n in runs)


def outcome_table(outcomes: Sequence[Outcome]) -> Table:
    table = Table("scenario", "to", "status", "attempts", "events", title="demo")
    table.add_column("mail_id", overflow="fold")
    for o in outcomes:
        attempts = [a.get("outcome") or "?" for a in (o.record or {}).get("attempts") or []]
        mark = "[green]✓[/]" if o.ok else "[red]✗[/]"
        table.add_row(
            f"{mark} {escape(o.scenario.name)}",
            escape(o.scenario.local),
            escape(" → ".join(o.statuses) or (o.error or "")),
            escape(_runs(attempts)),
            escape(_runs(o.events)),
            escape(o.mail_id or ""),
        )
    return table


def try_it(pipeline: LocalPipeline, env_file: Path, outcomes: Sequence[Outcome]) -> str:
    """The commands to look further, for the mails the demo sent."""
    ids = {o.scenario.name: o.mail_id for o in outcomes if o.mail_id}
    some = next(iter(ids.values()), "MAIL_ID")
    dead = ids.get("dead letter, then replay", some)
    domain = pipeline.smtp.simulator.domain if pipeline.smtp.simulator else SIMULATOR_DOMAIN
    return (
        f"In another shell: . {shlex.quote(str(env_file))}   (the stack's settings), then\n"
        "  mailpipe events tail                       # events as they happen\n"
        f"  mailpipe status {some}\n"
        f"  mailpipe trace {dead}\n"
        "  mailpipe dlq list                          # dead-lettered mails\n"
        f"  mailpipe send --to defer-forever@{domain} --text x --wait 60   # dead-letters\n"
        "  mailpipe dlq replay --all\n"
        f"  mailpipe send --to success@{domain} --text x --sandbox --wait 30\n"
        f"Events the demo saw: {pipeline.state_dir / EVENTS_FILE}\n"
    )
