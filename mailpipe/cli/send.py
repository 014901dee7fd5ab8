"""``mailpipe send`` and ``mailpipe status``: talk to a running publisher over HTTP.

``mailpipe status MAIL_ID`` shows one mail's record; ``mailpipe status`` alone shows the pipeline's
(``/v1/stats``): the oldest undelivered mail and the stuck records ``mailpipe reconcile --fix``
would settle. Exit codes: 0 ok, 1 the publisher could not answer, 4 (``status`` alone) stuck
records were found.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from mailpipe.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE

DEFAULT_URL = "http://127.0.0.1:8080"
FINAL_STATUSES = {"delivered", "bounced", "dead_lettered"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = subparsers.add_parser("send", help="send a mail through a running publisher")
    send.add_argument(
        "--url",
        default=os.environ.get("MAILPIPE_URL", DEFAULT_URL),
        help=f"publisher base URL (env MAILPIPE_URL, default {DEFAULT_URL})",
    )
    send.add_argument("--from", dest="from_", default="mailpipe <noreply@example.com>")
    send.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    send.add_argument("--cc", action="append", default=[])
    send.add_argument("--bcc", action="append", default=[])
    send.add_argument("--subject", default="")
    send.add_argument("--text")
    send.add_argument("--html")
    send.add_argument("--attach", action="append", type=Path, default=[], metavar="FILE")
    send.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    send.add_argument("--idempotency-key")
    send.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for delivered/bounced; exit 1 if not delivered",
    )
    send.add_argument("--json", action="store_true", help="print the JSON answer")
    send.set_defaults(handler=run_send)

    status = subparsers.add_parser(
        "status",
        help="show the delivery record of a mail, or (without one) lag and stuck records",
    )
    status.add_argument("mail_id", nargs="?", help="the mail (omit: the pipeline's status)")
    status.add_argument("--url", default=os.environ.get("MAILPIPE_URL", DEFAULT_URL))
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=run_status)


def _build_mail(args: argparse.Namespace) -> dict[str, Any]:
    mail: dict[str, Any] = {"from": args.from_, "to": args.to, "subject": args.subject}
    for key in ("cc", "bcc"):
        if getattr(args, key):
            mail[key] = getattr(args, key)
    if args.text is None and args.html is None:
        mail["text"] = sys.stdin.read() if not sys.stdin.isatty() else ""
    if args.text is not None:
        mail["text"] = args.text
    if args.html is not None:
        mail["html"] = args.html
    if args.header:
        mail["headers"] = dict(h.split(":", 1) for h in args.header)
        mail["headers"] = {k.strip(): v.strip() for k, v in mail["headers"].items()}
    if args.attach:
        mail["attachments"] = [
            {
                "filename": path.name,
                "content_type": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                "content": base64.b64encode(path.read_bytes()).decode(),
            }
            for path in args.attach
        ]
    if args.idempotency_key:
        mail["idempotency_key"] = args.idempotency_key
    return mail


def _print_error(console: Console, response: requests.Response) -> None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        console.print(f"[red]HTTP {response.status_code}[/]: {response.text[:500]}")
        return
    console.print(
        f"[red]HTTP {response.status_code} {error.get('code')}[/]: {error.get('message')}"
    )
    for field, problem in (error.get("fields") or {}).items():
        console.print(f"  [bold]{field}[/]: {problem}")


def run_send(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if any(":" not in h for h in args.header):
        console.print("[red]--header must look like NAME:VALUE[/]")
        return EXIT_USAGE
    try:
        mail = _build_mail(args)
    except OSError as exc:
        console.print(f"[red]cannot read attachment:[/] {exc}")
        return EXIT_USAGE
    try:
        response = requests.post(f"{args.url}/v1/messages", json=mail, timeout=60)
    except requests.RequestException as exc:
        console.print(f"[red]cannot reach the publisher at {args.url}:[/] {exc}")
        return EXIT_FAILED
    if response.status_code != 202:
        _print_error(console, response)
        return EXIT_USAGE if 400 <= response.status_code < 500 else EXIT_FAILED
    accepted = response.json()
    if args.json and not args.wait:
        print(json.dumps(accepted))
    elif not args.json:
        console.print(
            f"[green]accepted[/] mail_id={accepted['mail_id']} trace_id={accepted['trace_id']}"
        )
    if not args.wait:
        return EXIT_OK
    record = _wait(args.url, accepted["mail_id"], args.wait)
    if args.json:
        print(json.dumps(record or accepted))
    else:
        console.print(f"status: [bold]{record['status'] if record else 'unknown'}[/]")
    return EXIT_OK if record and record["status"] == "delivered" else EXIT_FAILED


def _wait(url: str, mail_id: str, seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    record = None
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/v1/messages/{mail_id}", timeout=10)
        if response.status_code == 200:
            record = response.json()
            if record["status"] in FINAL_STATUSES:
                return record
        time.sleep(0.2)
    return record


EXIT_STUCK = 4  # as `mailpipe reconcile`: stuck records were found


def run_status(args: argparse.Namespace) -> int:
    if args.mail_id is None:
        return _run_overview(args)
    console = Console()
    try:
        response = requests.get(f"{args.url}/v1/messages/{args.mail_id}", timeout=10)
    except requests.RequestException as exc:
        Console(stderr=True).print(f"[red]cannot reach the publisher at {args.url}:[/] {exc}")
        return EXIT_FAILED
    if response.status_code != 200:
        _print_error(Console(stderr=True), response)
        return EXIT_FAILED
    record = response.json()
    if args.json:
        print(json.dumps(record))
        return EXIT_OK
    console.print(
        f"mail [bold]{record['mail_id']}[/]: {record['status']}  trace {record['trace_id']}"
    )
    table = Table("#", "started", "outcome", "reply", "step")
    for attempt in record["attempts"]:
        reply = " ".join(
            str(x) for x in (attempt["reply_code"], attempt["enhanced_status"]) if x is not None
        )
        table.add_row(
            str(attempt["number"]),
            attempt["started_at"] or "",
            attempt["outcome"] or "",
            reply,
            attempt["failed_step"] or "",
        )
    console.print(table)
    if record.get("last_error"):
        console.print(f"last error: {record['last_error']}")
    stuck = record.get("stuck")
    if stuck:
        console.print(
            f"[yellow]stuck[/]: {stuck['kind'].replace('_', ' ')} since {stuck['stuck_since']}; "
            f"`mailpipe reconcile --fix` will {stuck['fix']}"
        )
    return EXIT_OK


def _run_overview(args: argparse.Namespace) -> int:
    """``mailpipe status`` without a mail: lag and stuck records from ``/v1/stats``."""
    try:
        response = requests.get(f"{args.url}/v1/stats", timeout=30)
    except requests.RequestException as exc:
        Console(stderr=True).print(f"[red]cannot reach the publisher at {args.url}:[/] {exc}")
        return EXIT_FAILED
    if response.status_code != 200:
        _print_error(Console(stderr=True), response)
        return EXIT_FAILED
    stats = response.json()
    stuck = stats.get("stuck") or {}
    code = (
        EXIT_STUCK
        if stuck.get("expired_reservations") or stuck.get("stalled_deliveries")
        else EXIT_OK
    )
    if args.json:
        print(json.dumps(stats))
        return code
    console = Console(soft_wrap=True)
    age = stats.get("oldest_undelivered_age_seconds")
    if age is None:
        console.print("oldest undelivered mail: none")
    else:
        console.print(
            f"oldest undelivered mail: {stats['oldest_undelivered_mail_id']} ({age:.0f} s old)"
        )
    console.print(
        f"stuck: {stuck.get('expired_reservations', 0)} expired reservation(s), "
        f"{stuck.get('stalled_deliveries', 0)} stalled delivery(ies); "
        f"{stuck.get('unconfirmed', 0)} unconfirmed"
    )
    mails = stuck.get("mails") or []
    for mail in mails:  # one line each: ids stay whole, to copy into `mailpipe status MAIL_ID`
        console.print(
            f"  {mail['mail_id']}  {mail['kind'].replace('_', ' ')} ({mail['status']}) "
            f"since {mail['stuck_since']}"
        )
    if mails:
        console.print("settle them with [bold]mailpipe reconcile --fix[/]")
    return code
