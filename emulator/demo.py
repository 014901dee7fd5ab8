"""``mailpipe up --demo``: each delivery outcome once, in a minute, with no set-up.

The local stack runs with fast delivery settings (:func:`demo_topology`: a 10 s ack deadline,
Pub/Sub retries about a second apart, the dead letter after 5 attempts) and the demo sends one mail
per :data:`SCENARIOS` entry to the mailbox simulator (README: Mailbox simulator): a delivery, a
bounce, a deferral that recovers, a sandbox mail, a dead letter that the scheduled retry
(``mailpipe dlq replay --due``) brings back, a second mail to the bounced address (suppressed) and
a mail given up at its ``deliver_by`` (expired). It runs the commands an operator would (``mailpipe
events tail --json``, its output kept in ``events.jsonl`` in the state directory; ``mailpipe dlq
replay --due``), waits for each mail's record to reach its status, and reports, per mail, the
record's attempts and the events seen. Each run labels its addresses (``bounce+r1f2e@``), so a
bounce kept on the suppression list from an earlier run does not change this one.

A file env.sh in the state directory holds the stack's settings: source it in another shell and
``mailpipe status``, ``mailpipe events tail``, ``mailpipe dlq list`` talk to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import secrets
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
# Pushed, the subscription gets no retry policy at all (emulator.pubsub_topology: row 4b of
# docs/local-vs-gcp.md) and is re-pushed about every second; pulled (--mode pull), this one.
DEMO_DELIVERY: dict[str, Any] = {
    "ack_deadline_seconds": 10,
    "retry_policy": RetryPolicy("1s", "2s"),
    "dead_letter": DeadLetterPolicy("dead_letter", 5),
}
# Settings both services get in the demo (run_local_pipeline's extra_env).
DEMO_ENV: dict[str, str] = {
    "MAILPIPE_SMTP_TIMEOUT": "10",
    # A dead-lettered mail is due again 2 s later (production: every 15 minutes at first).
    "MAILPIPE_RETRY_SCHEDULE": "F,1h,2s",
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
    deliver_within: float | None = None  # seconds: the mail's deliver_by, counted from sending


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("delivered", "success", frozenset({"delivered"})),
    Scenario("bounce", "bounce", frozenset({"bounced"})),
    Scenario("deferral, then delivered", "defer-2", frozenset({"delivered"})),
    Scenario("sandbox", "success+sandbox", frozenset({"sandboxed"}), {"sandbox": True}),
    Scenario(
        "dead letter, then replay",
        "defer-6",  # 5 deferrals dead-letter it; the replay's first attempt is deferred too
        frozenset({"dead_lettered"}),
        # The scheduled retry's pass (a Cloud Run job every few minutes on GCP), once it is due.
        replay=("--due",),
        then=frozenset({"delivered"}),
    ),
    # The bounce put bounce+<run>@ on the suppression list: this mail is not sent to it.
    Scenario("suppressed", "bounce", frozenset({"suppressed"}), after="bounce"),
    # Never recovers, and its give-up time comes before Pub/Sub's retries run out.
    Scenario("expired", "defer-forever", frozenset({"expired"}), deliver_within=5.0),
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


class FollowedEvents:
    """The events in a file that ``mailpipe events tail --json`` appends to, read incrementally:
    each call reads only what was appended since the last one (whole lines; other lines, such as
    the tail's own messages, are skipped). Threads may share it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0  # bytes of the file consumed so far
        self.lines: list[str] = []  # the event lines so far, as printed
        self._by_mail: dict[str, list[tuple[str, int, str]]] = {}
        self._lock = threading.Lock()

    def read_new(self) -> None:
        with self._lock, self.path.open("rb") as log:
            log.seek(self.offset)
            appended = log.read()
            whole = appended[: appended.rfind(b"\n") + 1]  # a line still being written waits
            self.offset += len(whole)
            for line in whole.decode("utf-8", errors="replace").splitlines():
                if line.startswith("{"):
                    self.lines.append(line)
                    event = json.loads(line)["event"]
                    seen = (event["occurred_at"], event["attempt"], event["type"])
                    self._by_mail.setdefault(event["mail_id"], []).append(seen)

    def types(self, mail_id: str) -> list[str]:
        """The event types of ``mail_id`` so far, in the order they happened."""
        self.read_new()
        with self._lock:
            return [kind for _, _, kind in sorted(self._by_mail.get(mail_id, ()))]


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
        self._events = FollowedEvents(self._process.log_path)

    def types(self, mail_id: str) -> list[str]:
        """The event types of ``mail_id`` so far, in the order they happened."""
        return self._events.types(mail_id)

    def wait_for(self, mail_id: str, kind: str, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while kind not in (seen := self.types(mail_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen

    def close(self) -> None:
        self._process.stop()
        self._events.read_new()
        # Kept for the user: the events as `mailpipe events tail --json` printed them.
        self.path.write_text("".join(f"{x}\n" for x in self._events.lines), "utf-8")


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
    run_label = f"r{secrets.token_hex(2)}"
    done = {s.name: threading.Event() for s in scenarios}
    with ExitStack() as stack:
        events = EventLog(pipeline)
        stack.callback(events.close)

        def run(scenario: Scenario) -> None:
            outcome = outcomes[scenario.name]
            try:
                if scenario.after is not None:
                    done[scenario.after].wait(step_timeout)
                _run(pipeline, scenario, outcome, domain, events, step_timeout, run_label)
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
    run: str,
) -> None:
    accepted = pipeline.api.send(_mail(scenario, domain, run))
    outcome.mail_id, outcome.trace_id = accepted.mail_id, accepted.trace_id
    final = set(FINAL_STATUSES) | set(scenario.reaches)
    outcome.record = pipeline.wait_for_status(accepted.mail_id, final, timeout=timeout)
    outcome.statuses.append(outcome.record["status"])
    outcome.events = events.wait_for(accepted.mail_id, outcome.record["status"])
    if not scenario.replay or outcome.record["status"] not in scenario.reaches:
        return
    if "--due" in scenario.replay:
        _wait_until_due(pipeline, accepted.mail_id, timeout)
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


def _wait_until_due(pipeline: LocalPipeline, mail_id: str, timeout: float) -> None:
    """Wait for the record's ``next_attempt_at``, so the ``--due`` pass replays the mail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        due = (pipeline.api.record(mail_id) or {}).get("next_attempt_at")
        if due and dt.datetime.fromisoformat(due) <= dt.datetime.now(dt.UTC):
            return
        time.sleep(0.5)
    raise TimeoutError(f"mail {mail_id} was not due for a retry within {timeout:.0f} s")


def _mail(scenario: Scenario, domain: str, run: str) -> dict[str, Any]:
    # A label per run (`bounce+r1f2e@`): a bounce of an earlier demo run, kept on the suppression
    # list in the same state directory, must not turn this run's bounce into `suppressed`.
    local = f"{scenario.local}-{run}" if "+" in scenario.local else f"{scenario.local}+{run}"
    fields: dict[str, Any] = dict(scenario.fields)
    if scenario.deliver_within is not None:
        deliver_by = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=scenario.deliver_within)
        fields["deliver_by"] = deliver_by.isoformat()
    return {
        "from": "mailpipe demo <demo@example.com>",
        "to": [f"{local}@{domain}"],
        "subject": f"mailpipe demo: {scenario.name}",
        "text": f"The demo's {scenario.name} mail.\n",
        "metadata": {"demo": scenario.name},
        **fields,
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
        "  mailpipe dlq replay --due                  # the scheduled retry's pass\n"
        "  mailpipe suppressions list                 # the bounced address is on it\n"
        f"  mailpipe send --to success@{domain} --text x --sandbox --wait 30\n"
        f"Events the demo saw: {pipeline.state_dir / EVENTS_FILE}\n"
    )
