"""The ``mailpipe`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds a parser
and sets ``handler`` (a function taking the parsed ``argparse.Namespace`` and returning an exit
code). Human output by default (rich), ``--json`` for scripts.

Exit codes: 0 success, 1 the operation failed (e.g. a mail was not delivered), 2 usage or
configuration error, 3 a dependency is missing (emulator not installed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 3
EXIT_INTERRUPTED = 130

# Order is the order of `mailpipe --help`.
COMMAND_MODULES = (
    "ops.cli.up",
    "ops.cli.emulator",
    "ops.cli.send",
    "ops.cli.trace",
    "ops.cli.canary",
    "ops.cli.dlq",
    "ops.cli.events",
    "ops.cli.reconcile",
    "ops.cli.suppressions",
)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block, so what a command started is stopped on the
    way out (``timeout``, ``kill`` and container runtimes send SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_command(
    subparsers: Any, name: str, summary: str, doc: str | None
) -> argparse.ArgumentParser:
    """Add the sub-command ``name``: ``summary`` in ``mailpipe --help``, and its module docstring
    ``doc`` as its own ``--help``, line breaks kept."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailpipe",
        description="Asynchronous mail pipeline on Google Cloud: HTTP → Pub/Sub → SMTP, one trace.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before grpc is imported (build_parser imports the commands): `mailpipe up` starts the services
    # with subprocess after using Pub/Sub clients, and gRPC's fork handlers can make such a child
    # abort before exec. mailpipe only forks to exec.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
