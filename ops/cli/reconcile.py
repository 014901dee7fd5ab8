"""``mailpipe reconcile``: find delivery records stuck where nothing live will move them, and
(with ``--fix``) settle them. Safe to run at any time and repeatedly, by hand or as a scheduled
job (the Cloud Run job runs ``mailpipe reconcile --fix``).

Stuck records (details and races: publisher/reconcile.py):

  expired_reservation  accepting past its reservation (MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS
                       after it was made): its publisher died before finishing. --fix releases
                       it, freeing its idempotency key.
  stalled_delivery     sending, its lease ended more than the grace ago (--grace, default
                       MAILPIPE_RECONCILE_GRACE_SECONDS, 900) and nobody claimed it since. --fix
                       marks it unconfirmed: still claimable, so a copy Pub/Sub still holds is
                       delivered; never marked delivered nor sent again by reconcile.

Unconfirmed mails (settled before, outcome unknown) are listed too; they are not stuck.

Configuration comes from the services' environment (MAILPIPE_RECORD, GOOGLE_CLOUD_PROJECT,
FIRESTORE_EMULATOR_HOST...); ``--record`` overrides the record.

Output: a table on a terminal. With ``--json``, or when run as a Cloud Run job (CLOUD_RUN_JOB is
set), one JSON object per line in Cloud Logging's structured format on stdout: one per stuck mail
(its kind, and with --fix what was done) and a last one, "reconcile finished", with the counts.

Exit codes:

  0  nothing is stuck (report), or every stuck record was settled (--fix; records that moved on
     meanwhile count as settled)
  1  a real failure: the record could not be read, or a fix failed (see the output)
  2  usage or configuration error
  4  report only: stuck records were found (run again with --fix)
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape

from ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_command

EXIT_STUCK = 4
SERVICE_NAME = "mailpipe-reconcile"


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "reconcile", "find (and with --fix settle) stuck delivery records", __doc__
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fix",
        action="store_true",
        help="release expired reservations and mark stalled deliveries unconfirmed",
    )
    parser.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="how long past its lease a delivery may stay sending "
        "(default: $MAILPIPE_RECONCILE_GRACE_SECONDS, else 900)",
    )
    parser.add_argument(
        "--record",
        metavar="URL|PATH",
        help="the delivery record: sqlite:///PATH, firestore://DB or a path to an SQLite file "
        "(default: $MAILPIPE_RECORD, else .mailpipe/record.sqlite3)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="JSON lines in Cloud Logging's format (the default in a Cloud Run job)",
    )
    parser.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.cli.reconcile``: the same as ``mailpipe reconcile``."""
    from ops.cli import main as cli_main

    return cli_main(["reconcile", *(sys.argv[1:] if argv is None else argv)])


class _JsonLines:
    """Cloud Logging structured lines on stdout, through a logger of its own (the root logger,
    and whatever else configured it, stays untouched)."""

    def __init__(self, project: str | None, stream: Any) -> None:
        from mailpipe.logs import CloudLoggingFormatter

        self._logger = logging.getLogger("mailpipe.reconcile")
        self._handler = logging.StreamHandler(stream)
        self._handler.setFormatter(
            CloudLoggingFormatter(project=project, service_name=SERVICE_NAME)
        )
        self._saved = (self._logger.propagate, self._logger.level)
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)

    def log(
        self, level: int, message: str, fields: Mapping[str, Any], *, exc_info: bool = False
    ) -> None:
        self._logger.log(level, message, extra={"json_fields": dict(fields)}, exc_info=exc_info)

    def close(self) -> None:
        self._handler.flush()
        self._logger.removeHandler(self._handler)
        self._logger.propagate, level = self._saved
        self._logger.setLevel(level)


def run(
    args: argparse.Namespace,
    *,
    record: Any = None,
    environ: Mapping[str, str] | None = None,
    now: Callable[[], dt.datetime] | None = None,
) -> int:
    """``record`` (a DeliveryRecord) and ``now`` are for tests and embedding; without them the
    record is opened from the environment and the time is now."""
    from mailpipe.record import RecordError
    from ops.cli.dlq import UsageError, open_existing_record, read_config, record_url
    from ops.reconcile import FixAction, fix
    from publisher.reconcile import survey

    environ = os.environ if environ is None else environ
    as_json = bool(args.json or environ.get("CLOUD_RUN_JOB"))
    err = Console(stderr=True)
    try:
        config = read_config(environ)
        grace = config.reconcile_grace_seconds if args.grace is None else float(args.grace)
        if not grace >= 0:
            raise UsageError("--grace must be a number of seconds, 0 or more")
        owned = record is None
        if record is None:
            record = open_existing_record(record_url(args.record, config.record))
    except UsageError as exc:
        err.print(f"[red]mailpipe reconcile:[/] {escape(str(exc))}")
        return EXIT_USAGE
    at = (now or (lambda: dt.datetime.now(dt.UTC)))()
    lines = _JsonLines(config.pubsub.project, sys.stdout) if as_json else None
    try:
        try:
            found = survey(record, now=at, grace_seconds=grace)
        except RecordError as exc:
            message = f"the delivery record is unavailable: {exc}"
            if lines is not None:
                lines.log(logging.ERROR, "reconcile failed", {"error": message, "exit_code": 1})
            else:
                err.print(f"[red]mailpipe reconcile:[/] {escape(message)}")
            return EXIT_FAILED
        if not args.fix:
            code = EXIT_STUCK if found.stuck else EXIT_OK
            if lines is not None:
                for mail in found.stuck:
                    lines.log(logging.WARNING, "stuck mail", mail.to_json(at))
                _summary(lines, found.to_json(max_mails=0), {}, fixed=False, code=code)
            else:
                _print_survey(found.to_json(), fixed=None)
            return code
        outcomes: list[dict[str, Any]] = []

        def on_outcome(outcome: Any) -> None:
            entry = outcome.to_json(at)
            outcomes.append(entry)
            if lines is not None:
                level = logging.ERROR if entry["action"] == "failed" else logging.WARNING
                lines.log(level, f"stuck mail {entry['action'].replace('_', ' ')}", entry)

        try:
            report = fix(record, found, on_outcome=on_outcome)
        except Exception:
            if lines is None:
                raise
            # A job's failure belongs in its structured log, traceback included.
            lines.log(logging.ERROR, "reconcile failed", {"exit_code": 1}, exc_info=True)
            return EXIT_FAILED
        code = EXIT_OK if report.ok else EXIT_FAILED
        # Unconfirmed after this run: those from before and those it just marked.
        after = {
            **found.to_json(),
            "unconfirmed": len(found.unconfirmed) + report.count(FixAction.MARKED_UNCONFIRMED),
        }
        if lines is not None:
            _summary(lines, {**after, "mails": []}, report.counts(), fixed=True, code=code)
        else:
            _print_survey({**after, "mails": outcomes}, fixed=report.counts())
        return code
    finally:
        if lines is not None:
            lines.close()
        if owned:
            record.close()


def _summary(
    lines: _JsonLines,
    found: dict[str, object],
    actions: dict[str, int],
    *,
    fixed: bool,
    code: int,
) -> None:
    fields = {key: value for key, value in found.items() if key != "mails"}
    fields.update({"fix": fixed, **actions, "exit_code": code})
    # WARNING when this run found something stuck (an alert can match it), ERROR on a failure;
    # unconfirmed mails from earlier runs are counted but not warned about again.
    level = logging.INFO
    if found["expired_reservations"] or found["stalled_deliveries"]:
        level = logging.WARNING
    if code == EXIT_FAILED:
        level = logging.ERROR
    lines.log(level, "reconcile finished", fields)


_SHORT_FIX = {"expired_reservation": "release", "stalled_delivery": "mark unconfirmed"}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _print_survey(found: dict[str, Any], *, fixed: dict[str, int] | None) -> None:
    console = Console(soft_wrap=True)
    mails = found["mails"]
    for mail in mails:  # one line each: ids stay whole, to copy into `mailpipe status MAIL_ID`
        what = _SHORT_FIX[mail["kind"]] if fixed is None else mail["action"].replace("_", " ")
        console.print(
            f"{escape(mail['mail_id'])}  {mail['kind'].replace('_', ' '):<19}  "
            f"{mail['status']:<9}  stuck {_age(mail['stuck_for_seconds']):>6}  "
            f"attempts {mail['attempts']}  → {what}"
        )
    counts = (
        f"{_plural(found['expired_reservations'], 'expired reservation')}, "
        f"{_plural(found['stalled_deliveries'], 'stalled delivery', 'stalled deliveries')}"
    )
    if fixed is None:
        console.print(f"stuck: {counts}")
        if mails:
            console.print(
                "run with --fix to release the reservations (freeing their idempotency keys) "
                "and mark the deliveries unconfirmed (still claimable by a later delivery)"
            )
    else:
        done = ", ".join(f"{n} {action.replace('_', ' ')}" for action, n in fixed.items() if n)
        console.print(f"stuck: {counts}; {done or 'nothing to do'}")
    if found["unconfirmed"]:
        console.print(
            f"{_plural(found['unconfirmed'], 'unconfirmed mail')}: the last attempt's outcome "
            "is unknown (GET /v1/messages?status=unconfirmed lists them)"
        )
    if not found["complete"]:
        console.print("[yellow]more records than one survey scans: run it again[/]")


if __name__ == "__main__":
    sys.exit(main())
