"""``mailpipe trace MAIL_ID|TRACE_ID``: print a mail's trace from the local trace file.

The services write their spans there when run with ``MAILPIPE_TRACES=file`` (``mailpipe up``
does). Spans arrive asynchronously (the exporters batch, the subscriber delivers later), so
``--wait SECONDS`` polls the file until the trace shows up and has stopped growing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ops.trace_view import find_trace, group_by_trace, read_spans, render_waterfall

DEFAULT_TRACE_FILE = ".mailpipe/traces.jsonl"
POLL_INTERVAL_SECONDS = 0.2
# With --wait: once the trace is found, how long it must stay unchanged to count as complete.
SETTLE_SECONDS = 1.0


def default_trace_file() -> Path:
    return Path(os.environ.get("MAILPIPE_TRACE_FILE") or DEFAULT_TRACE_FILE)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "trace",
        help="show a mail's trace as a waterfall (from the local trace file)",
        description=(
            "Print every span of a mail's trace: service, offset, duration, status and SMTP "
            "replies. KEY is a mail id or a 32-hex-digit trace id."
        ),
    )
    parser.add_argument("key", metavar="MAIL_ID|TRACE_ID")
    parser.add_argument(
        "--file",
        type=Path,
        default=None,
        help=f"trace file (default: $MAILPIPE_TRACE_FILE or {DEFAULT_TRACE_FILE})",
    )
    parser.add_argument("--json", action="store_true", help="print the spans as JSON")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="poll up to SECONDS for the trace to appear and settle",
    )
    parser.set_defaults(handler=run)


def wait_for_trace(path: Path, key: str, wait: float) -> list[Any]:
    """The trace's spans; with ``wait`` > 0, polls until it appears and stops growing."""
    deadline = time.monotonic() + max(0.0, wait)
    found = find_trace(read_spans(path), key)
    if wait <= 0:
        return found
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        if found and time.monotonic() - stable_since >= SETTLE_SECONDS:
            break
        time.sleep(POLL_INTERVAL_SECONDS)
        latest = find_trace(read_spans(path), key)
        if len(latest) != len(found):
            found, stable_since = latest, time.monotonic()
    return found


def run(args: argparse.Namespace) -> int:
    path: Path = args.file or default_trace_file()
    if args.wait < 0:
        print("mailpipe trace: --wait must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    spans = wait_for_trace(path, args.key, args.wait)
    if not spans:
        if not path.exists():
            why = (
                f"trace file {path} does not exist: run the services with MAILPIPE_TRACES=file "
                f"and MAILPIPE_TRACE_FILE={path} (mailpipe up does), or pass --file"
            )
        else:
            why = (
                f"no trace for {args.key!r} in {path}"
                + (f" (waited {args.wait:g} s)" if args.wait else "")
                + ": check the mail id, or add --wait if the mail was just sent"
            )
        print(f"mailpipe trace: {why}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        document = {
            "key": args.key,
            "trace_ids": list(group_by_trace(spans)),
            "spans": [span.to_dict() for span in spans],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    from rich.console import Console

    # Piped output would be cut to 80 columns; a waterfall needs more (COLUMNS still wins).
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console(width=None if wide else 160)
    console.print(render_waterfall(spans))
    return EXIT_OK
