"""``mailpipe events tail``: print delivery events (docs/events.md) as they are published.

It makes its own subscription on the events topic (``mailpipe-events-tail-<random>``), so it
takes nothing from integrators' subscriptions and sees only events published after it started,
and deletes it on the way out: after ``--count`` events, after ``--timeout`` seconds, or on Ctrl-C
(exit 0 in all three, unless ``--count`` events did not arrive within ``--timeout``: exit 1).

Local stack only (``PUBSUB_EMULATOR_HOST``): in production make a subscription with Terraform
(``event_webhooks``) or gcloud instead of one per operator's terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ops.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, sigterm_as_interrupt

POLL_INTERVAL_SECONDS = 0.2


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "events",
        help="delivery events (accepted, delivered, deferred, bounced, ...)",
        description="Delivery events of the local stack (docs/events.md).",
    )
    commands = parser.add_subparsers(dest="events_command", metavar="COMMAND", required=True)
    tail = commands.add_parser(
        "tail",
        help="print events as they come, until Ctrl-C",
        description=(
            "Print each delivery event published to the events topic of the local emulator "
            "from now on, through a subscription of its own (deleted on exit)."
        ),
    )
    tail.add_argument("--count", type=int, default=None, metavar="N", help="stop after N events")
    tail.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="stop after SECONDS"
    )
    tail.add_argument(
        "--json", action="store_true", help="one JSON object per line: the event and attributes"
    )
    tail.set_defaults(handler=run_tail)


def event_line(event: Mapping[str, Any]) -> str:
    """One event as a human reads it (no addresses beyond what the event itself carries)."""
    reply = " ".join(
        str(part)
        for part in (event.get("reply_code"), event.get("enhanced_status"), event.get("reply"))
        if part
    )
    domains = ",".join(event.get("recipient_domains") or []) or "-"
    return (
        f"{event.get('occurred_at', '?')}  {event.get('type', '?'):<13} "
        f"{event.get('mail_id', '?')}  attempt {event.get('attempt', 0)}  {domains}"
        f"  trace {event.get('trace_id') or '-'}" + (f"  {reply}" if reply else "")
    )


def tail_events(
    subscriber: Any,
    subscription: str,
    *,
    count: int | None,
    timeout: float | None,
    show: Callable[[dict[str, Any]], None],
) -> int:
    """Pull, ack and ``show`` events until ``count`` or ``timeout``; returns how many were shown.

    Short immediate pulls keep Ctrl-C prompt (a waiting gRPC pull would hold it up).
    """
    shown = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while (count is None or shown < count) and (deadline is None or time.monotonic() < deadline):
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": 100, "return_immediately": True},
            timeout=10,
        )
        received = list(response.received_messages)
        if not received:
            time.sleep(POLL_INTERVAL_SECONDS)
            continue
        subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in received])
        for item in received:
            try:
                event = json.loads(item.message.data)
            except ValueError:
                event = {"undecodable": item.message.data[:200].decode("utf-8", "replace")}
            event = {"event": event, "attributes": dict(item.message.attributes)}
            show(event)
            shown += 1
    return shown


def _usage_problem(
    args: argparse.Namespace, environ: Mapping[str, str], topic: str | None
) -> str | None:
    if (args.count is not None and args.count < 1) or (
        args.timeout is not None and args.timeout <= 0
    ):
        return "--count and --timeout must be positive"
    if not environ.get("PUBSUB_EMULATOR_HOST"):
        return (
            "PUBSUB_EMULATOR_HOST is not set: it tails the local stack (run `mailpipe emulator "
            "up` and export what it prints); in production subscribe to the events topic with "
            "Terraform's event_webhooks"
        )
    if topic is None:
        return "MAILPIPE_EVENTS_TOPIC=none: events are off"
    return None


def run_tail(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    from mailpipe.config import DEFAULT_PROJECT, ConfigError
    from mailpipe.events import EventsConfig
    from mailpipe.pubsub import PubSubUnavailable, subscriber_client, translate_api_errors
    from mailpipe.topology import load_topology

    environ = os.environ if environ is None else environ
    try:
        config = EventsConfig.from_env(environ, load_topology())
    except ConfigError as exc:
        print(f"mailpipe events tail: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = _usage_problem(args, environ, config.topic)
    host = environ.get("PUBSUB_EMULATOR_HOST")
    if problem is not None or not host or config.topic is None:
        print(f"mailpipe events tail: {problem}", file=sys.stderr)
        return EXIT_USAGE
    project = environ.get("GOOGLE_CLOUD_PROJECT") or DEFAULT_PROJECT
    topic = f"projects/{project}/topics/{config.topic}"
    subscription = f"projects/{project}/subscriptions/mailpipe-events-tail-{uuid.uuid4().hex[:8]}"
    subscriber = subscriber_client(host, tracing=False)

    shown = 0

    def show(item: dict[str, Any]) -> None:
        nonlocal shown
        shown += 1
        if args.json:
            print(json.dumps(item, separators=(",", ":")), flush=True)
        else:
            print(event_line(item["event"]), flush=True)

    try:
        with translate_api_errors(f"subscribing to {topic}"):
            subscriber.create_subscription(
                request={"name": subscription, "topic": topic}, timeout=30
            )
        print(f"tailing {topic} (Ctrl-C to stop)", file=sys.stderr)
        try:
            with sigterm_as_interrupt(), translate_api_errors(f"pulling {subscription}"):
                tail_events(
                    subscriber, subscription, count=args.count, timeout=args.timeout, show=show
                )
        except KeyboardInterrupt:
            print(f"stopped after {shown} event(s)", file=sys.stderr)
            return EXIT_OK
        finally:
            with translate_api_errors(f"deleting {subscription}"):
                subscriber.delete_subscription(subscription=subscription, timeout=30)
    except PubSubUnavailable as exc:
        print(f"mailpipe events tail: {exc} (is the emulator running?)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        subscriber.close()
    if args.count is not None and shown < args.count:
        print(f"only {shown} of {args.count} event(s) within {args.timeout:g} s", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
