"""``mailpipe suppressions list|add|remove``: the suppression list through the publisher's API
(docs/suppressions.md). Exit 0 done, 1 failed (or ``remove`` of a recipient not suppressed), 2 a
request the publisher refused (it says which field to fix)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.api import DEFAULT_URL, ApiError, PublisherApi
from ops.cli import EXIT_FAILED, EXIT_OK, add_command
from ops.cli.send import exit_code, print_error


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "suppressions", "list, add or remove suppressed recipients", __doc__
    )
    parser.add_argument("--url", default=os.environ.get("MAILPIPE_URL", DEFAULT_URL))
    parser.add_argument("--json", action="store_true")
    commands = parser.add_subparsers(dest="suppressions_command", metavar="COMMAND", required=True)
    listing = commands.add_parser("list", help="the active entries, oldest first")
    listing.add_argument("--reason", choices=("bounce", "complaint", "manual"))
    listing.add_argument("--domain")
    listing.add_argument("--limit", type=int, default=100)
    add = commands.add_parser("add", help="suppress a recipient (reason manual by default)")
    add.add_argument("address")
    add.add_argument("--reason", choices=("manual", "complaint"), default="manual")
    add.add_argument("--expires-at", metavar="ISO8601", help="when the entry ends (default: never)")
    remove = commands.add_parser("remove", help="reactivate a recipient (an address or a key)")
    remove.add_argument("address")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    api, console = PublisherApi(args.url), Console()
    try:
        if args.suppressions_command == "list":
            answer = api.suppressions(reason=args.reason, domain=args.domain, limit=args.limit)
            _show(console, answer["items"], args.json)
        elif args.suppressions_command == "add":
            entry = api.suppress(args.address, reason=args.reason, expires_at=args.expires_at)
            _show(console, [entry], args.json)
        elif not api.unsuppress(args.address):
            Console(stderr=True).print("[red]not suppressed[/]")
            return EXIT_FAILED
    except ApiError as exc:
        print_error(Console(stderr=True), exc)
        return exit_code(exc)
    return EXIT_OK


def _show(console: Console, entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(entries))
        return
    table = Table("recipient", "reason", "reply", "mail", "created", "expires")
    for entry in entries:
        reply = " ".join(str(entry[k]) for k in ("reply_code", "enhanced_status") if entry[k])
        table.add_row(
            *(
                escape(str(value or ""))
                for value in (
                    entry["address"] or entry["key"],
                    entry["reason"],
                    reply,
                    entry["mail_id"],
                    entry["created_at"],
                    entry["expires_at"],
                )
            )
        )
    console.print(table)
