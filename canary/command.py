"""``python -m canary`` (``mailpipe canary``): send a probe mail, time its arrival over IMAP.

The probe goes through ``POST /v1/messages`` to the canary's mailbox; the canary then reads that
mailbox over IMAP until the probe (found by its Message-ID) is visible, reads it the way a mail
client does, deletes it, and reports accepted → SMTP 250 → visible-in-inbox times. Every IMAP
step is a span and a sample of ``mailpipe.canary.imap.step.duration``; the read is recorded in
the probe mail's own trace (see canary/probe.py and docs/canary.md).

Settings come from the environment (flags override them):

  MAILPIPE_URL                      publisher base URL (--publisher-url)
  MAILPIPE_CANARY_IMAP_HOST / _PORT IMAP server (--imap-host / --imap-port; port default by TLS
                                    mode: 993 imaps, 143 starttls and none)
  MAILPIPE_CANARY_IMAP_TLS          imaps | starttls | none (--imap-tls; none: loopback only)
  MAILPIPE_CANARY_IMAP_USER         IMAP user (from Secret Manager on GCP if you like)
  MAILPIPE_CANARY_IMAP_PASSWORD     IMAP password (on GCP: a Secret Manager reference)
  MAILPIPE_CANARY_IMAP_CA_FILE      CA bundle to verify the IMAP server (default: system CAs)
  MAILPIPE_CANARY_TO                address of the mailbox (default: the IMAP user if an address)
  MAILPIPE_CANARY_FROM              sender of the probe
  MAILPIPE_CANARY_MAILBOX           mailbox to watch (--mailbox, default INBOX)
  MAILPIPE_CANARY_DEADLINE          seconds to wait for the probe (--deadline, default 300)
  MAILPIPE_CANARY_POLL_INTERVAL     seconds between searches (default 2)
  MAILPIPE_CANARY_IMAP_TIMEOUT      timeout of each IMAP command, seconds (default 30)
  MAILPIPE_CANARY_PUBLISHER_AUTH    none | google (Google ID token for a Cloud Run publisher)
  MAILPIPE_MESSAGE_ID_DOMAIN        must match the subscriber's (the probe's Message-ID domain)
  MAILPIPE_TRACES and friends       where spans and metrics go (as for the services)

Exit codes:

   0  ok: the probe was visible in the mailbox, read and deleted
   2  usage or configuration error
  10  publish_failed: the publisher was unreachable or did not answer 202
  11  imap_unavailable: the IMAP server could not be reached (refused, unreachable, timed out)
  12  tls_failed: TLS handshake or certificate check failed, or STARTTLS was not offered
  13  login_refused: the IMAP server refused the user name or password
  14  mailbox_missing: the mailbox could not be selected
  15  not_delivered: the deadline passed, or the record says bounced, without the probe arriving
      (the message gives the delivery record's last status, reply and error)
  16  imap_error: any other IMAP failure (unexpected answer, connection lost mid-session)
 130  interrupted

With ``--every``, runs repeat until interrupted (or ``--runs`` runs); the exit code is the last
run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console

# The exit codes the operator CLI uses for the same cases (ops/cli/__init__.py).
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--publisher-url", help="publisher base URL (env MAILPIPE_URL)")
    parser.add_argument("--imap-host", help="IMAP server (env MAILPIPE_CANARY_IMAP_HOST)")
    parser.add_argument("--imap-port", type=int, help="IMAP port (env MAILPIPE_CANARY_IMAP_PORT)")
    parser.add_argument(
        "--imap-tls",
        choices=("imaps", "starttls", "none"),
        help="IMAP TLS mode (env MAILPIPE_CANARY_IMAP_TLS, default imaps)",
    )
    parser.add_argument("--mailbox", help="mailbox to watch (default INBOX)")
    parser.add_argument(
        "--deadline", type=float, metavar="SECONDS", help="wait this long (default 300)"
    )
    parser.add_argument(
        "--every",
        metavar="DURATION",
        help="run again at this interval (e.g. 60s, 5m) until interrupted",
    )
    parser.add_argument(
        "--runs", type=int, metavar="N", help="with --every: stop after N runs (default: never)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m canary``: what the Cloud Run job runs (canary/Dockerfile's CMD)."""
    parser = argparse.ArgumentParser(
        prog="python -m canary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def canary_environ(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment with the flags given on the command line applied over it."""
    env = dict(environ)
    flags = {
        "MAILPIPE_URL": args.publisher_url,
        "MAILPIPE_CANARY_IMAP_HOST": args.imap_host,
        "MAILPIPE_CANARY_IMAP_PORT": args.imap_port,
        "MAILPIPE_CANARY_IMAP_TLS": args.imap_tls,
        "MAILPIPE_CANARY_MAILBOX": args.mailbox,
        "MAILPIPE_CANARY_DEADLINE": args.deadline,
    }
    env.update({name: str(value) for name, value in flags.items() if value is not None})
    return env


def _print(console: Console, result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
        return
    color = "green" if result.exit_code == 0 else "red"
    console.print(f"[{color}]{result.outcome}[/] {result.message}")

    def at(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    if result.mail_id:
        console.print(
            f"  accepted {at(result.accepted_after)} → SMTP 250 {at(result.delivered_after)} → "
            f"in inbox {at(result.visible_after)}"
        )
        console.print(f"  traces: mail {result.trace_id} · canary {result.canary_trace_id}")
    for phase in ("poll", "read"):
        steps = [s for s in result.steps if s.phase == phase]
        if not steps:
            continue
        polls = sum(1 for s in steps if s.step == "search")
        shown = [s for s in steps if phase == "read" or s.step not in ("noop", "search")]
        text = " · ".join(
            f"{s.step} {s.seconds * 1000:.1f} ms{'' if s.ok else ' [red]failed[/]'}" for s in shown
        )
        if phase == "poll" and polls:
            text += f" ({polls} search{'es' if polls > 1 else ''})"
        console.print(f"  imap {phase}: {text}")


def run(args: argparse.Namespace) -> int:
    from canary.probe import CanaryConfig, build_canary
    from mailpipe.config import ConfigError
    from mailpipe.durations import parse_duration
    from mailpipe.telemetry import TelemetryError, setup_telemetry

    console = Console(stderr=args.json, soft_wrap=True)
    try:
        every = parse_duration(args.every, default_unit="s") if args.every else None
        config = CanaryConfig.from_env(canary_environ(args, os.environ))
    except (ValueError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.runs is not None and args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        telemetry = setup_telemetry(config.telemetry)
    except TelemetryError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    code = 0
    runs = 0
    try:
        canary = build_canary(config, telemetry)
        while True:
            result = canary.run()
            runs += 1
            code = result.exit_code
            _print(console, result, args.json)
            telemetry.force_flush()
            if every is None or (args.runs is not None and runs >= args.runs):
                break
            time.sleep(every)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        telemetry.shutdown()  # exports the last spans and metrics (a Cloud Run job exits next)
    return code


if __name__ == "__main__":
    sys.exit(main())
