"""``mailpipe send`` and ``mailpipe status``: talk to a running publisher over HTTP.

``mailpipe status MAIL_ID`` shows one mail's record; ``mailpipe status`` alone shows the pipeline's
(``/v1/stats``): the oldest undelivered mail and the stuck records ``mailpipe reconcile --fix``
would settle. Both talk to the publisher through :class:`client.PublisherApi`.
Exit codes: 0 ok, 1 the publisher could not be reached or answered an error (``send``: 5xx, or
the mail was not delivered within ``--wait``), 2 usage error (``send``: the publisher refused the
mail with a 4xx), 4 (``status`` alone) stuck records were found.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client import DEFAULT_URL, ApiError, ApiHttpError, PublisherApi, deliver_by
from ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE


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
        "--sandbox",
        action="store_true",
        help="run the whole pipeline but stop at RCPT TO (RSET): nothing is sent; status sandboxed",
    )
    send.add_argument(
        "--deliver-by",
        metavar="TIME",
        help="give up (status expired) if not delivered by TIME: RFC 3339 with an offset "
        "(2026-12-01T09:00:00Z) or Unix seconds; default and maximum: docs/deliver-by.md",
    )
    send.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for a final status; exit 1 unless delivered (or sandboxed)",
    )
    send.add_argument(
        "--json", action="store_true", help="print the JSON answer (or the API's JSON error)"
    )
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
    if args.sandbox:
        mail["sandbox"] = True
    if args.deliver_by is not None:  # checked by the publisher: its 400 says what to send
        mail["deliver_by"] = deliver_by(args.deliver_by)
    return mail


def print_error(console: Console, exc: ApiError) -> None:
    """What went wrong, with the fields the publisher named (its text is never markup)."""
    console.print(f"[red]error:[/] {escape(str(exc))}")
    for name, problem in (exc.fields if isinstance(exc, ApiHttpError) else {}).items():
        console.print(f"  [bold]{escape(name)}[/]: {escape(problem)}")


def exit_code(exc: ApiError) -> int:
    """A mail the publisher refused (4xx) is the caller's to fix; anything else failed."""
    if isinstance(exc, ApiHttpError) and 400 <= exc.status < 500:
        return EXIT_USAGE
    return EXIT_FAILED


def run_send(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if any(":" not in h for h in args.header):
        console.print("[red]--header must look like NAME:VALUE[/]")
        return EXIT_USAGE
    try:
        mail = _build_mail(args)
    except OSError as exc:
        console.print(f"[red]cannot read attachment:[/] {escape(str(exc))}")
        return EXIT_USAGE
    api = PublisherApi(args.url)
    try:
        accepted = api.send(mail)
    except ApiError as exc:
        if args.json and isinstance(exc, ApiHttpError) and exc.body is not None:
            print(json.dumps(exc.body))  # the API's JSON error, for scripts
        print_error(console, exc)
        return exit_code(exc)
    if args.json and not args.wait:
        print(json.dumps(accepted.body))
    elif not args.json:
        console.print(
            f"[green]accepted[/] mail_id={escape(accepted.mail_id)} trace_id={accepted.trace_id}"
        )
    if not args.wait:
        return EXIT_OK
    try:
        record = api.wait(accepted.mail_id, timeout=args.wait)
    except ApiError as exc:
        print_error(console, exc)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(record or accepted.body))
    else:
        console.print(f"status: [bold]{escape(record['status']) if record else 'unknown'}[/]")
    return EXIT_OK if record and record["status"] in ("delivered", "sandboxed") else EXIT_FAILED


EXIT_STUCK = 4  # as `mailpipe reconcile`: stuck records were found


def run_status(args: argparse.Namespace) -> int:
    if args.mail_id is None:
        return _run_overview(args)
    console = Console()
    try:
        record = PublisherApi(args.url).record(args.mail_id, missing_ok=False)
    except ApiError as exc:
        print_error(Console(stderr=True), exc)
        return EXIT_FAILED
    assert record is not None  # missing_ok=False: a 404 raised
    if args.json:
        print(json.dumps(record))
        return EXIT_OK
    return _shown(lambda: _show_record(console, record), EXIT_OK)


def _shown(show: Callable[[], None], code: int) -> int:
    """Run ``show``; an answer that is JSON but not in the documented shape is an error, not a
    traceback."""
    try:
        show()
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        Console(stderr=True).print(
            "[red]error:[/] the publisher's answer is not in the documented shape "
            f"({type(exc).__name__}: {escape(str(exc))}); see --json"
        )
        return EXIT_FAILED
    return code


def _show_record(console: Console, record: dict[str, Any]) -> None:
    console.print(
        f"mail [bold]{escape(record['mail_id'])}[/]: {escape(record['status'])}  "
        f"trace {escape(str(record['trace_id']))}"
    )
    table = Table("#", "started", "outcome", "reply", "step")
    for attempt in record["attempts"]:
        reply = " ".join(
            str(x) for x in (attempt["reply_code"], attempt["enhanced_status"]) if x is not None
        )
        table.add_row(
            escape(str(attempt["number"])),
            escape(attempt["started_at"] or ""),
            escape(attempt["outcome"] or ""),
            escape(reply),
            escape(attempt["failed_step"] or ""),
        )
    console.print(table)
    for attempt in record["attempts"]:  # the recipients not sent to, and why
        for rcpt in attempt.get("recipients") or ():
            reply = " ".join(str(rcpt[k]) for k in ("reply_code", "enhanced_status") if rcpt[k])
            console.print(
                f"  attempt {attempt['number']}: {escape(rcpt['recipient'])} "
                f"{escape(rcpt['status'])} {escape(reply)}".rstrip()
            )
    if record.get("last_error"):
        console.print(f"last error: {escape(str(record['last_error']))}")
    for key, label in (("next_attempt_at", "next attempt"), ("deliver_by", "deliver by")):
        if record.get(key):  # docs/deliver-by.md
            console.print(f"{label}: {escape(str(record[key]))}")
    if record["status"] == "sandboxed" and record["attempts"]:
        reply = record["attempts"][-1]["reply_message"]
        console.print(f"sandbox, not sent; the relay answered: {escape(str(reply))}")
    stuck = record.get("stuck")
    if stuck:
        console.print(
            f"[yellow]stuck[/]: {escape(stuck['kind'].replace('_', ' '))} since "
            f"{escape(stuck['stuck_since'])}; `mailpipe reconcile --fix` will "
            f"{escape(stuck['fix'])}"
        )


def _run_overview(args: argparse.Namespace) -> int:
    """``mailpipe status`` without a mail: lag and stuck records from ``/v1/stats``."""
    try:
        stats = PublisherApi(args.url).stats()
    except ApiError as exc:
        print_error(Console(stderr=True), exc)
        return EXIT_FAILED
    stuck = stats.get("stuck") or {}
    if not isinstance(stuck, dict):
        stuck = {}
    code = (
        EXIT_STUCK
        if stuck.get("expired_reservations") or stuck.get("stalled_deliveries")
        else EXIT_OK
    )
    if args.json:
        print(json.dumps(stats))
        return code
    console = Console(soft_wrap=True)
    return _shown(lambda: _show_stats(console, stats, stuck), code)


def _show_stats(console: Console, stats: dict[str, Any], stuck: dict[str, Any]) -> None:
    age = stats.get("oldest_undelivered_age_seconds")
    if age is None:
        console.print("oldest undelivered mail: none")
    else:
        console.print(
            f"oldest undelivered mail: {escape(stats['oldest_undelivered_mail_id'])} "
            f"({age:.0f} s old)"
        )
    console.print(
        f"stuck: {stuck.get('expired_reservations', 0)} expired reservation(s), "
        f"{stuck.get('stalled_deliveries', 0)} stalled delivery(ies); "
        f"{stuck.get('unconfirmed', 0)} unconfirmed"
    )
    mails = stuck.get("mails") or []
    for mail in mails:  # one line each: ids stay whole, to copy into `mailpipe status MAIL_ID`
        console.print(
            f"  {escape(mail['mail_id'])}  {escape(mail['kind'].replace('_', ' '))} "
            f"({escape(mail['status'])}) since {escape(mail['stuck_since'])}"
        )
    if mails:
        console.print("settle them with [bold]mailpipe reconcile --fix[/]")
