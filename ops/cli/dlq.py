"""``mailpipe dlq list`` and ``mailpipe dlq replay``: find dead-lettered mails and send them again.

Configuration comes from the same environment as the services (``MAILPIPE_RECORD``,
``GOOGLE_CLOUD_PROJECT``, ``MAILPIPE_TOPIC``, ``MAILPIPE_DEAD_LETTER_SUBSCRIPTION``,
``PUBSUB_EMULATOR_HOST``, ``MAILPIPE_TRACES``...); ``--record`` overrides the record (``mailpipe
up`` keeps it in ``--state-dir/record.sqlite3``). The logic lives in :mod:`ops.replay`; this
module parses arguments, wires the clients and prints.

Exit codes: 0 every selected mail was replayed (or needed nothing), 1 some failed or were not
found (or Pub/Sub / the record was unreachable), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from mailpipe.config import ConfigError, PubSubConfig, TelemetryConfig
from mailpipe.record import DeliveryRecord, RecordError, open_record
from ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_command
from publisher.config import PublisherConfig

if TYPE_CHECKING:
    # ops.replay brings in the Pub/Sub client (a good part of a second): imported by the
    # commands that run, so that `mailpipe --help` or `mailpipe status` does not pay for it.
    from ops.replay import DeadLetterReplayer, ReplayOutcome, ReplayReport

CLI_SERVICE_NAME = "mailpipe-cli"

_HUMAN_STATUS = {  # ReplayStatus values (a StrEnum)
    "replayed": "[green]replayed[/]",
    "would_replay": "[cyan]would replay[/]",
    "already_final": "[yellow]already {record}[/]",
    "duplicate_copy": "[yellow]duplicate copy[/]",
    "in_flight": "[yellow]in flight[/]",
    "not_found": "[red]not found[/]",
    "no_record": "[red]no record[/]",
    "failed": "[red]failed[/]",
    "expired": "[magenta]expired[/]",
    "would_expire": "[cyan]would expire[/]",
    "not_due": "not due",
}


class UsageError(Exception):
    """Bad arguments or configuration (exit 2); the message says what to fix."""


def register(subparsers: Any) -> None:
    parser = add_command(subparsers, "dlq", "list and replay dead-lettered mails", __doc__)
    actions = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--record",
        metavar="URL|PATH",
        help="the delivery record: sqlite:///PATH, firestore://DB or a path to an SQLite file "
        "(default: $MAILPIPE_RECORD, else .mailpipe/record.sqlite3)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    listing = actions.add_parser(
        "list",
        parents=[common],
        help="show dead-lettered mails (from the delivery record)",
        description="Dead-lettered mails, oldest first: id, recipients' domains, last reply, "
        "attempts, age.",
    )
    listing.add_argument(
        "--since", metavar="T", help="accepted at or after T (ISO 8601, or an age: 30m, 2h, 7d)"
    )
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (100)")
    listing.set_defaults(handler=run_list)

    replay = actions.add_parser(
        "replay",
        parents=[common],
        help="republish dead-lettered mails to the mail topic",
        description="Republish dead-lettered mails (their data is on the dead-letter "
        "subscription) in a new trace linked to the original one. A mail whose record says "
        "delivered or bounced is never sent again.",
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id",
        dest="ids",
        action="extend",
        nargs="+",
        metavar="ID",
        help="mail id(s) to replay (repeatable)",
    )
    which.add_argument("--all", action="store_true", help="every dead-lettered mail")
    which.add_argument(
        "--since", metavar="T", help="mails accepted at or after T (ISO 8601, or 30m, 2h, 7d)"
    )
    which.add_argument(
        "--due",
        action="store_true",
        help="one pass for the retry schedule: replay mails whose next attempt has come, expire "
        "those past deliver_by, leave the rest (docs/deliver-by.md)",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed; change nothing"
    )
    replay.set_defaults(handler=run_replay)


# --- wiring --------------------------------------------------------------------------------------


def record_url(value: str | None, default: str) -> str:
    """``--record``: a URL as in MAILPIPE_RECORD, or a plain path to an SQLite file."""
    if not value:
        return default
    if value.startswith(("sqlite:///", "firestore://")):
        return value
    if "://" in value:
        raise UsageError(f"--record {value!r}: use sqlite:///PATH, firestore://DATABASE or a path")
    return f"sqlite:///{Path(value).resolve()}"


def open_existing_record(url: str) -> DeliveryRecord:
    """Open the record, refusing to create an empty SQLite file where none was (a wrong path
    would otherwise show "no dead letters" instead of an error)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise UsageError(
                f"no delivery record at {path}: pass --record (mailpipe up keeps it in "
                "--state-dir/record.sqlite3) or set MAILPIPE_RECORD"
            )
    try:
        return open_record(url)
    except (ValueError, RecordError) as exc:
        raise UsageError(f"cannot open the delivery record {url}: {exc}") from exc


def read_config(environ: Mapping[str, str]) -> PublisherConfig:
    try:
        return PublisherConfig.from_env(environ)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


@dataclass
class ReplayServices:
    """What ``dlq replay`` needs; :func:`open_replay_services` builds it from the environment."""

    record: DeliveryRecord
    pubsub: PubSubConfig
    subscriber: Any  # google.cloud.pubsub_v1.SubscriberClient
    publisher: Any  # google.cloud.pubsub_v1.PublisherClient, OpenTelemetry tracing on
    tracer: Any  # opentelemetry.trace.Tracer
    dead_letter_subscription: str  # its path: dead_letter_subscription_path()
    return_immediately: bool = False
    close: Callable[[], None] = lambda: None
    events: Any = None  # mailpipe.events.EventEmitter: `replayed` events (None: off)

    def replayer(self) -> DeadLetterReplayer:
        from ops.replay import DeadLetterReplayer

        return DeadLetterReplayer(
            subscriber=self.subscriber,
            publisher=self.publisher,
            record=self.record,
            tracer=self.tracer,
            dead_letter_subscription=self.dead_letter_subscription,
            topic=self.pubsub.topic_path,
            return_immediately=self.return_immediately,
            events=self.events,
        )


def dead_letter_subscription_path(project: str, environ: Mapping[str, str]) -> str:
    """``MAILPIPE_DEAD_LETTER_SUBSCRIPTION`` (default: topology.json's) as a path; only ``dlq
    replay`` reads that subscription, so only the CLI reads the variable."""
    from mailpipe.topology import load_topology

    name = environ.get("MAILPIPE_DEAD_LETTER_SUBSCRIPTION", "").strip()
    return (
        f"projects/{project}/subscriptions/{name or load_topology().dead_letter_subscription.name}"
    )


def open_replay_services(args: argparse.Namespace, environ: Mapping[str, str]) -> ReplayServices:
    """Real clients (emulator-aware through PUBSUB_EMULATOR_HOST), the record and telemetry."""
    from mailpipe.events import EventEmitter, EventsConfig
    from mailpipe.pubsub import publisher_client, subscriber_client
    from mailpipe.telemetry import setup_telemetry
    from mailpipe.topology import load_topology

    config = read_config(environ)
    try:
        events_config = EventsConfig.from_env(environ, load_topology())
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    record = open_existing_record(record_url(args.record, config.record))
    # The CLI is its own service in traces; it must not take the services' Prometheus port.
    telemetry_config: TelemetryConfig = dataclasses.replace(
        config.telemetry, service_name=CLI_SERVICE_NAME, metrics_port=None
    )
    telemetry = setup_telemetry(telemetry_config)
    host = config.pubsub.emulator_host
    # The republish carries the new trace to the subscriber; pull and ack need no tracing.
    publisher = publisher_client(host, tracing=True)
    subscriber = subscriber_client(host, tracing=False)
    events = None
    if events_config.topic is not None:  # on the same tracing client: inside `mail replay`
        events = EventEmitter(
            publisher,
            f"projects/{config.pubsub.project}/topics/{events_config.topic}",
            address_style=config.telemetry.address_style,
            timeout=events_config.timeout,
        )

    def close() -> None:
        publisher.stop()
        subscriber.close()
        record.close()
        telemetry.shutdown()  # exports the replay spans

    return ReplayServices(
        record=record,
        pubsub=config.pubsub,
        subscriber=subscriber,
        publisher=publisher,
        # The instrumentation scope keeps its name from before the CLI moved to ops/.
        tracer=telemetry.tracer("mailpipe.cli.dlq"),
        dead_letter_subscription=dead_letter_subscription_path(config.pubsub.project, environ),
        # The emulator answers an immediate pull exactly; production may answer it empty.
        return_immediately=bool(host),
        close=close,
        events=events,
    )


# --- list ----------------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def run_list(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    now: dt.datetime | None = None,
) -> int:
    from ops.replay import list_dead_letters

    err = Console(stderr=True)
    now = now or dt.datetime.now(dt.UTC)
    try:
        if args.limit < 1:
            raise UsageError("--limit must be at least 1")
        since = _since(args.since, now)
        config = read_config(os.environ if environ is None else environ)
        record = open_existing_record(record_url(args.record, config.record))
    except UsageError as exc:
        err.print(f"[red]mailpipe dlq list:[/] {escape(str(exc))}")
        return EXIT_USAGE
    try:
        entries = list_dead_letters(record, since=since, limit=args.limit, now=now)
    except RecordError as exc:
        err.print(
            f"[red]mailpipe dlq list:[/] the delivery record is unavailable: {escape(str(exc))}"
        )
        return EXIT_FAILED
    finally:
        record.close()
    if args.json:
        print(json.dumps({"items": [entry.to_json() for entry in entries]}, indent=2))
        return EXIT_OK
    console = Console()
    if not entries:
        console.print("no dead-lettered mails" + (f" since {since.isoformat()}" if since else ""))
        return EXIT_OK
    table = Table(title="Dead-lettered mails")
    table.add_column("mail id", no_wrap=True)  # copied into `dlq replay --id`
    for name in ("domains", "last reply", "attempts", "age"):
        table.add_column(name)
    for entry in entries:
        table.add_row(
            escape(entry.mail_id),
            escape(", ".join(entry.recipient_domains)),
            escape(entry.last_reply or ""),
            str(entry.attempts),
            _age(entry.age_seconds),
        )
    console.print(table)
    console.print(
        f"{len(entries)} mail(s); replay with [bold]mailpipe dlq replay --id ID[/] "
        "(or --all, --since T; --dry-run first)"
    )
    return EXIT_OK


def _since(text: str | None, now: dt.datetime) -> dt.datetime | None:
    from ops.replay import parse_since

    if not text:
        return None
    try:
        return parse_since(text, now=now)
    except ValueError as exc:
        raise UsageError(f"--since {exc}") from exc


# --- replay --------------------------------------------------------------------------------------


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[ReplayOutcome], None]]:
    """A progress bar on stderr (a terminal only); yields the per-outcome callback."""
    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("replaying dead-lettered mails"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
    with progress:
        task = progress.add_task("replay", total=total, failed=0)
        failed = 0

        def advance(outcome: ReplayOutcome) -> None:
            nonlocal failed
            failed += 0 if outcome.ok else 1
            progress.update(task, advance=1, failed=failed)

        yield advance


def run_replay(
    args: argparse.Namespace,
    *,
    services: ReplayServices | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``services`` is for tests and embedding; without it they are built from the environment."""
    from ops.replay import DeadLetterUnavailable, Selection

    err = Console(stderr=True)
    owned = services is None
    try:
        selection = Selection(
            mail_ids=frozenset(args.ids or ()),
            all=bool(args.all),
            since=_since(args.since, dt.datetime.now(dt.UTC)),
            due=bool(getattr(args, "due", False)),
        )
        if services is None:
            services = open_replay_services(args, os.environ if environ is None else environ)
    except UsageError as exc:
        err.print(f"[red]mailpipe dlq replay:[/] {escape(str(exc))}")
        return EXIT_USAGE
    try:
        with _progress(not args.json, len(selection.mail_ids) or None) as on_outcome:
            report = services.replayer().replay(
                selection, dry_run=args.dry_run, on_outcome=on_outcome
            )
    except (DeadLetterUnavailable, RecordError) as exc:
        err.print(f"[red]mailpipe dlq replay:[/] {escape(str(exc))}")
        return EXIT_FAILED
    finally:
        if owned:
            services.close()
    _print_report(report, as_json=args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_report(report: ReplayReport, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    console = Console()
    if report.outcomes:
        # Ids stay on one line so they can be copied into the next command.
        table = Table()
        table.add_column("mail id", no_wrap=True)
        table.add_column("result", no_wrap=True)
        table.add_column("detail")
        table.add_column("new trace", no_wrap=True)
        for outcome in report.outcomes:
            label = _HUMAN_STATUS[outcome.status].format(record=outcome.record_status or "final")
            table.add_row(
                escape(outcome.mail_id), label, escape(outcome.detail), outcome.trace_id or ""
            )
        console.print(table)
    counts = report.counts()
    summary = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items())
    prefix = "dry run: " if report.dry_run else ""
    console.print(f"{prefix}{summary or 'no matching dead-lettered mails'}")
    if report.left_alone:
        console.print(f"{report.left_alone} other message(s) left on the dead-letter subscription")
    if report.dry_run and counts.get("would_replay"):
        console.print("run again without --dry-run to replay")
