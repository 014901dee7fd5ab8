"""``mailpipe up``: the whole pipeline locally, a sample mail through it, and its trace.

Starts Google's Pub/Sub emulator with the topology applied, a local SMTP server that keeps what it
receives (a Maildir under ``--state-dir``; with the mailbox simulator of
:class:`emulator.smtp.MailboxSimulator`), the publisher and the subscriber as their own
processes; sends a sample mail, waits until the SMTP server has it, shows the received mail and
the trace from the HTTP request to the SMTP server's reply, then keeps running until Ctrl-C
(``--once`` stops right away). ``--demo`` runs with fast delivery settings and then shows a
bounce, a deferral, a sandbox mail, a dead letter and its scheduled replay, a suppression and an
expiry, with their events (:mod:`emulator.demo`). A file env.sh in the state directory gives the
CLI in another shell the stack's settings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client import FINAL_STATUSES, ApiError
from ops.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    add_command,
    sigterm_as_interrupt,
)

SAMPLE_MAIL: dict[str, Any] = {
    "from": "mailpipe <noreply@example.com>",
    "to": ["Ada Lovelace <ada@example.com>"],
    "subject": "Hello from mailpipe ✉",
    "text": "This mail went HTTP → Pub/Sub → SMTP, in one trace.\n",
    "html": "<p>This mail went <b>HTTP → Pub/Sub → SMTP</b>, in one trace.</p>",
    "metadata": {"sample": True},
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        "up",
        "run the whole pipeline locally and send a sample mail through it",
        __doc__,
    )
    parser.add_argument(
        "--mode",
        choices=("push", "pull"),
        default="push",
        # Push is production's shape (Cloud Run), and the emulator retries pushes; a pull worker
        # that dies strands its messages on the emulator (docs/local-vs-gcp.md).
        help="how the subscriber receives: push, as on Cloud Run (default), or streaming pull",
    )
    parser.add_argument("--port", type=int, default=8080, help="publisher port (default 8080)")
    parser.add_argument(
        "--smtp-port", type=int, default=2525, help="local SMTP server port (default 2525)"
    )
    parser.add_argument(
        "--simulator-domain",
        type=_simulator_domain,
        default=None,
        help="domain of the local SMTP server's mailbox simulator "
        "(default simulator.mailpipe.example; README: Mailbox simulator)",
    )
    parser.add_argument(
        "--no-simulator",
        action="store_true",
        help="no mailbox simulator: every address is accepted as usual",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".mailpipe"),
        help="where the record, traces, maildir and logs go (default .mailpipe)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop after the sample mail instead of running until Ctrl-C",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="fast delivery settings (retries seconds apart, 5 attempts), then one mail per "
        "outcome to the mailbox simulator: bounce, deferral, sandbox, dead letter and replay",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead")
    parser.set_defaults(handler=run)


def _simulator_domain(value: str) -> str:
    from emulator.smtp import simulator_domain

    try:
        return simulator_domain(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def chosen_simulator_domain(args: argparse.Namespace) -> str | None:
    """The mailbox simulator's domain for this run; None with ``--no-simulator``."""
    from emulator.smtp import SIMULATOR_DOMAIN

    if args.no_simulator:
        return None
    return str(args.simulator_domain or SIMULATOR_DOMAIN)


def _run_demo(args: argparse.Namespace, console: Console, pipeline: Any) -> bool:
    """The demo's scenarios (emulator/demo.py); whether each ended as expected."""
    from emulator.demo import outcome_table, run_demo, try_it, write_env_file

    env_file = write_env_file(pipeline)
    with console.status("demo: seven outcomes, from delivered to expired…"):
        outcomes = run_demo(pipeline)
    if args.json:
        print(json.dumps({"demo": [o.to_json() for o in outcomes], "env_file": str(env_file)}))
    else:
        console.print(outcome_table(outcomes))
        console.print(try_it(pipeline, env_file, outcomes))
    return all(o.ok for o in outcomes)


def _received_table(message: Any) -> Table:
    table = Table(title="Received by the local SMTP server", show_header=False, box=None)
    parsed = message.message
    for name in ("From", "To", "Subject", "Message-ID", "traceparent", "Date"):
        if parsed[name] is not None:
            table.add_row(f"[bold]{name}[/]", str(parsed[name]))
    table.add_row("[bold]envelope[/]", f"{message.mail_from} → {', '.join(message.recipients)}")
    return table


def run(args: argparse.Namespace) -> int:
    from emulator.demo import DEMO_ENV, demo_topology
    from emulator.errors import EmulatorError, EmulatorNotInstalled
    from emulator.pipeline import run_local_pipeline
    from mailpipe.topology import load_topology
    from ops.trace_view import find_trace, read_spans, render_waterfall

    console = Console(stderr=args.json)
    # SIGTERM too (timeout, kill): the services run in their own sessions and must be stopped.
    with sigterm_as_interrupt(), ExitStack() as resources:
        try:
            with console.status(
                "starting the Pub/Sub emulator, SMTP server, publisher and subscriber…"
            ):
                pipeline = resources.enter_context(
                    run_local_pipeline(
                        state_dir=args.state_dir,
                        subscriber_mode=args.mode,
                        publisher_port=args.port,
                        smtp_port=args.smtp_port,
                        simulator_domain=chosen_simulator_domain(args),
                        topology=demo_topology(load_topology()) if args.demo else None,
                        extra_env=DEMO_ENV if args.demo else None,
                    )
                )
        except EmulatorNotInstalled as exc:
            console.print(f"[red]{exc}[/]")
            return EXIT_MISSING_DEPENDENCY
        except (EmulatorError, OSError) as exc:
            console.print(f"[red]could not start the local pipeline:[/] {exc}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        try:
            return _demo(args, console, pipeline, find_trace, read_spans, render_waterfall)
        except KeyboardInterrupt:
            console.print("stopping…")
            return EXIT_OK


def _demo(
    args: argparse.Namespace,
    console: Console,
    pipeline: Any,
    find_trace: Any,
    read_spans: Any,
    render_waterfall: Any,
) -> int:
    console.print(
        f"[green]✓[/] publisher {pipeline.publisher_url}"
        f"  ·  subscriber ({pipeline.subscriber_mode})"
        f"  ·  SMTP 127.0.0.1:{pipeline.smtp.port}  ·  Pub/Sub emulator "
        f"{pipeline.emulators.pubsub.host}"
    )
    simulator = pipeline.smtp.simulator
    if simulator is not None:
        console.print(
            f"[green]✓[/] mailbox simulator at [bold]@{simulator.domain}[/]: "
            f"{', '.join(simulator.local_parts)} (README: Mailbox simulator)"
        )
    try:
        accepted = pipeline.api.send(SAMPLE_MAIL)
        mail_id = accepted.mail_id
        console.print(f"[green]✓[/] 202 accepted: mail_id={mail_id} trace_id={accepted.trace_id}")
        record = pipeline.wait_for_status(mail_id, set(FINAL_STATUSES))
    except (ApiError, TimeoutError) as exc:
        console.print(f"[red]the sample mail did not go through:[/] {escape(str(exc))}")
        return EXIT_FAILED
    received = [m for m in pipeline.smtp.messages if mail_id in str(m.message["Message-ID"])]
    spans: list[Any] = []
    deadline = time.monotonic() + 10
    # The services export spans in batches (every 200 ms), the events' publish spans last: the
    # trace is shown once both ends are in and a poll 0.5 s later finds no new span.
    while time.monotonic() < deadline:
        seen = len(spans)
        spans = find_trace(read_spans(pipeline.trace_file), accepted.trace_id)
        names = {s.name for s in spans}
        ends = "smtp data" in names and any(name.startswith("POST") for name in names)
        if ends and len(spans) == seen:
            break
        time.sleep(0.5)
    if args.json:
        print(
            json.dumps(
                {
                    "mail_id": mail_id,
                    "trace_id": accepted.trace_id,
                    "status": record["status"],
                    "received": len(received),
                    "spans": len(spans),
                    "publisher_url": pipeline.publisher_url,
                    "trace_file": str(pipeline.trace_file),
                    "simulator_domain": simulator.domain if simulator is not None else None,
                }
            )
        )
    else:
        console.print(f"[green]✓[/] record status: [bold]{record['status']}[/]")
        if received:
            console.print(_received_table(received[0]))
        console.print(render_waterfall(spans))
        trace_file = shlex.quote(str(pipeline.trace_file))
        console.print(
            "\nTry it:\n"
            f"  mailpipe send --url {pipeline.publisher_url} --to you@example.com "
            "--subject hi --text hello\n"
            f"  mailpipe trace {mail_id} --file {trace_file}\n"
            f"  curl -s {pipeline.publisher_url}/v1/messages/{mail_id}\n"
            f"  received mail: {pipeline.state_dir / 'maildir' / 'new'}\n"
        )
        if simulator is not None:
            console.print(
                "A bounce and a deferral that recovers on Pub/Sub's redelivery:\n"
                f"  mailpipe send --url {pipeline.publisher_url} "
                f"--to bounce@{simulator.domain} --subject hi --text hello --wait 30\n"
                f"  mailpipe send --url {pipeline.publisher_url} "
                f"--to defer-2@{simulator.domain} --subject hi --text hello --wait 60\n"
            )
    if record["status"] != "delivered" or not received:
        return EXIT_FAILED
    if args.demo and not _run_demo(args, console, pipeline):
        return EXIT_FAILED
    if args.once:
        return EXIT_OK
    console.print("[bold]running[/] — Ctrl-C to stop")
    threading.Event().wait()
    return EXIT_OK
