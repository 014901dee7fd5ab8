"""``mailpipe emulator up``: Google's Pub/Sub (and Firestore) emulators with the topology applied.

Prints the ``export ...`` lines to paste into another shell, then runs until Ctrl-C (or SIGTERM)
and stops the emulators, leaving no Java process behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mailpipe.config import DEFAULT_PROJECT as DEFAULT_LOCAL_PROJECT
from mailpipe.topology import TopologyError, load_topology
from ops.cli import (
    EXIT_FAILED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    sigterm_as_interrupt,
)

if TYPE_CHECKING:
    # `emulator` is a development package (not in the service images): imported when run.
    from emulator import EmulatorStack

_HEALTH_INTERVAL = 1.0


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "emulator",
        "run Google's Pub/Sub (and Firestore) emulators with mailpipe's topology",
        __doc__,
    )
    actions = parser.add_subparsers(dest="emulator_command", metavar="ACTION", required=True)
    up = actions.add_parser(
        "up",
        help="start the emulators, apply the topology, print the env lines, run until Ctrl-C",
    )
    up.add_argument("--port", type=int, default=None, help="Pub/Sub emulator port (default: free)")
    up.add_argument(
        "--project",
        default=DEFAULT_LOCAL_PROJECT,
        help=f"project id to create the topology in (default: {DEFAULT_LOCAL_PROJECT})",
    )
    up.add_argument(
        "--firestore", action="store_true", help="also start the Firestore emulator (the record)"
    )
    up.add_argument(
        "--firestore-port", type=int, default=None, help="Firestore emulator port (default: free)"
    )
    up.add_argument(
        "--push-endpoint",
        metavar="URL",
        default=None,
        help="push the delivery subscription to URL (default: pull, for the local worker)",
    )
    up.add_argument(
        "--topology",
        type=Path,
        default=None,
        help="topology declaration (default: the packaged mailpipe/topology.json)",
    )
    up.add_argument(
        "--log-dir", type=Path, default=None, help="keep the emulator logs here (default: temp)"
    )
    up.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    up.set_defaults(handler=run_up)


def _describe(stack: EmulatorStack) -> dict[str, Any]:
    return {
        "project": stack.project,
        "env": stack.env,
        "emulators": [
            {
                "kind": e.kind,
                "host": e.host,
                "pid": e.pid,
                "reused": e.reused,
                "log": str(e.log_path) if e.log_path else None,
            }
            for e in stack.emulators()
        ],
        "changes": [str(change) for change in stack.changes],
    }


def _print_ready(stack: EmulatorStack, console: Console, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_describe(stack)), flush=True)
        return
    for e in stack.emulators():
        how = "reused" if e.reused else f"pid {e.pid}, log {e.log_path}"
        console.print(f"[green]✓[/] {e.kind} emulator on {e.host} ({how})")
    for change in stack.changes:
        console.print(f"  {change}")
    if not stack.changes:
        console.print("  topology already up to date")
    console.print("Paste these into another shell; Ctrl-C here stops the emulators:")
    for line in stack.export_lines():
        print(line, flush=True)


def _wait_until_interrupted(stack: EmulatorStack) -> int:
    """Block until Ctrl-C; return EXIT_FAILED early if an emulator dies on its own."""
    stopped = threading.Event()
    while not stopped.wait(_HEALTH_INTERVAL):
        for e in stack.emulators():
            code = e.exit_code()
            if code is not None:
                from emulator.process import read_log_tail

                tail = read_log_tail(e.log_path) if e.log_path else ""
                print(
                    f"error: the {e.kind} emulator exited with status {code}\n{tail}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
    return EXIT_OK  # pragma: no cover - the event is never set


def run_up(args: argparse.Namespace) -> int:
    from emulator import EmulatorError, EmulatorNotInstalled, run_emulators

    console = Console(stderr=True)
    try:
        topology = load_topology(args.topology)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    push_endpoints = {"delivery": args.push_endpoint} if args.push_endpoint else None
    try:
        with sigterm_as_interrupt(), ExitStack() as running:
            with console.status("starting the emulators…"):
                stack = running.enter_context(
                    run_emulators(
                        project=args.project,
                        port=args.port,
                        firestore=args.firestore,
                        firestore_port=args.firestore_port,
                        topology=topology,
                        push_endpoints=push_endpoints,
                        log_dir=args.log_dir,
                    )
                )
            _print_ready(stack, console, args.json)
            code = _wait_until_interrupted(stack)
    except KeyboardInterrupt:
        code = EXIT_OK  # Ctrl-C is how this command is meant to end
    except EmulatorNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except EmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        console.print("emulators stopped")
    return code
