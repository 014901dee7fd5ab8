"""``mailpipe events tail``: the refusals that need no emulator (the tail itself is tested in
tests/integration/test_delivery_events.py)."""

from __future__ import annotations

import pytest

from ops.cli import EXIT_USAGE, build_parser
from ops.cli.events import event_line, run_tail


def tail(argv: list[str], environ: dict[str, str]) -> int:
    args = build_parser().parse_args(["events", "tail", *argv])
    return run_tail(args, environ)


def test_tail_outside_the_local_stack_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert tail([], {}) == EXIT_USAGE
    assert "PUBSUB_EMULATOR_HOST is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "environ", "says"),
    [
        (["--count", "0"], {}, "--count and --timeout must be positive"),
        (["--timeout", "-1"], {}, "--count and --timeout must be positive"),
        ([], {"MAILPIPE_EVENTS_TOPIC": "none"}, "events are off"),
        ([], {"MAILPIPE_EVENTS_TIMEOUT": "never"}, "MAILPIPE_EVENTS_TIMEOUT"),
    ],
)
def test_bad_options_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], says: str
) -> None:
    assert tail(argv, {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1", **environ}) == EXIT_USAGE
    assert says in capsys.readouterr().err


def test_an_event_line_shows_what_happened_without_more_than_the_event_holds() -> None:
    line = event_line(
        {
            "occurred_at": "2026-11-30T08:14:02.311+00:00",
            "type": "deferred",
            "mail_id": "m-1",
            "attempt": 2,
            "recipient_domains": ["example.org"],
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "reply_code": 451,
            "enhanced_status": "4.3.0",
            "reply": "try again later",
        }
    )
    assert line == (
        "2026-11-30T08:14:02.311+00:00  deferred      m-1  attempt 2  example.org"
        "  trace 4bf92f3577b34da6a3ce929d0e0e4736  451 4.3.0 try again later"
    )
