"""``mailpipe dlq``: argument handling, ``dlq list`` on a real SQLite record, and the replay rules
that need no Pub/Sub (selection, attributes, the link to the original trace).

The replay itself runs against the emulator in tests/integration/test_dead_letters.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mailpipe.attributes import publisher_link
from mailpipe.record import Attempt, DeliveryRecord
from mailpipe.record.sqlite import SqliteRecord
from ops.cli import EXIT_OK, EXIT_USAGE, build_parser
from ops.cli.dlq import _HUMAN_STATUS, UsageError, record_url
from ops.replay import (
    ReplayStatus,
    Selection,
    parse_since,
    republished_attributes,
)

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["dlq", *argv])


# --- arguments -------------------------------------------------------------------------------


def test_replay_needs_exactly_one_selection(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--id", "a", "--all"], ["--all", "--since", "1h"]):
        with pytest.raises(SystemExit) as exited:
            parse("replay", *argv)
        assert exited.value.code == EXIT_USAGE
    assert "--id" in capsys.readouterr().err


def test_replay_ids_can_be_listed_or_repeated() -> None:
    args = parse("replay", "--id", "a", "b", "--id", "c", "--dry-run")
    assert (args.ids, args.dry_run, args.all) == (["a", "b", "c"], True, False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T10:00:00Z", dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)),
        ("2026-11-23T10:00:00", dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)),
        ("2026-11-23T11:00:00+01:00", dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)),
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("2h", NOW - dt.timedelta(hours=2)),
        ("7d", NOW - dt.timedelta(days=7)),
    ],
)
def test_since_takes_a_time_or_an_age(text: str, expected: dt.datetime) -> None:
    assert parse_since(text, now=NOW) == expected


def test_since_says_what_it_accepts() -> None:
    with pytest.raises(ValueError, match=r"ISO 8601.*30m, 2h or 7d"):
        parse_since("yesterday", now=NOW)


def test_record_accepts_a_url_or_a_path(tmp_path: Path) -> None:
    assert record_url(None, "sqlite:///default.db") == "sqlite:///default.db"
    assert record_url("firestore://mail", "x") == "firestore://mail"
    assert record_url(str(tmp_path / "r.sqlite3"), "x") == f"sqlite:///{tmp_path / 'r.sqlite3'}"
    with pytest.raises(UsageError, match="sqlite:///PATH"):
        record_url("postgres://db", "x")


# --- dlq list --------------------------------------------------------------------------------


@pytest.fixture
def record(tmp_path: Path) -> Any:
    with_clock = SqliteRecord(tmp_path / "record.sqlite3", clock=lambda: NOW)
    yield with_clock
    with_clock.close()


def dead_lettered(
    record: DeliveryRecord, mail_id: str, accepted_at: dt.datetime, domains: tuple[str, ...]
) -> None:
    record.reserve(
        mail_id=mail_id, accepted_at=accepted_at, recipient_domains=domains, idempotency_key=None
    )
    record.mark_queued(mail_id, message_id="1", trace_id="ab" * 16)
    for _ in range(5):
        claim = record.claim(mail_id, message_id="1", trace_id=None, lease_seconds=10)
        record.finish(
            mail_id,
            Attempt(
                number=claim.attempt_number,
                started_at=accepted_at,
                outcome="deferred",
                reply_code=452,
                enhanced_status="4.2.2",
                reply_message="Mailbox full",
                failed_step="rcpt to",
            ),
        )
    record.mark_dead_lettered(mail_id, last_error=None)


def run_list(record: SqliteRecord, *argv: str, environ: dict[str, str] | None = None) -> int:
    args = parse("list", "--record", str(record.path), *argv)
    return int(args.handler(args, environ=environ or {}, now=NOW))


def test_list_shows_dead_lettered_mails_oldest_first(
    record: SqliteRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_lettered(record, "mail-b", NOW - dt.timedelta(hours=1), ("example.net",))
    dead_lettered(record, "mail-a", NOW - dt.timedelta(hours=3), ("a.example", "b.example"))
    record.reserve(
        mail_id="mail-ok", accepted_at=NOW, recipient_domains=(), idempotency_key=None
    )  # queued, not dead-lettered

    assert run_list(record, "--json") == EXIT_OK

    items = json.loads(capsys.readouterr().out)["items"]
    assert [i["mail_id"] for i in items] == ["mail-a", "mail-b"]
    first = items[0]
    assert first["recipient_domains"] == ["a.example", "b.example"]
    assert first["attempts"] == 5
    assert first["last_reply"] == "452 4.2.2 at rcpt to: Mailbox full"
    assert first["age_seconds"] == 3 * 3600
    assert first["trace_id"] == "ab" * 16


def test_list_filters_by_since_and_limit(
    record: SqliteRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    for hours in (5, 3, 1):
        dead_lettered(record, f"mail-{hours}h", NOW - dt.timedelta(hours=hours), ("x.example",))

    run_list(record, "--since", "4h", "--json")
    assert [i["mail_id"] for i in json.loads(capsys.readouterr().out)["items"]] == [
        "mail-3h",
        "mail-1h",
    ]
    run_list(record, "--limit", "1", "--json")
    assert [i["mail_id"] for i in json.loads(capsys.readouterr().out)["items"]] == ["mail-5h"]


def test_list_prints_a_table_for_people(
    record: SqliteRecord, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    dead_lettered(record, "mail-a", NOW - dt.timedelta(minutes=90), ("example.org",))

    assert run_list(record) == EXIT_OK

    out = capsys.readouterr().out
    assert "mail-a" in out and "example.org" in out and "1.5h" in out
    assert "452 4.2.2" in out
    assert "mailpipe dlq replay --id" in out


def test_a_missing_record_is_an_error_not_an_empty_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nowhere" / "record.sqlite3"
    args = parse("list", "--record", str(path))

    assert args.handler(args, environ={}) == EXIT_USAGE

    assert "no delivery record at" in capsys.readouterr().err
    assert not path.exists()  # nothing was created


def test_replay_with_a_missing_record_stops_before_touching_pubsub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("replay", "--all", "--record", str(tmp_path / "absent.sqlite3"))

    assert args.handler(args, environ={}) == EXIT_USAGE

    assert "--record" in capsys.readouterr().err


def test_bad_since_is_a_usage_error(
    record: SqliteRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_list(record, "--since", "last week") == EXIT_USAGE
    assert "--since" in capsys.readouterr().err


# --- replay rules without Pub/Sub ------------------------------------------------------------


def test_republished_attributes_drop_dead_letter_and_library_ones() -> None:
    attributes = {
        "mail_id": "m1",
        "schema_version": "1",
        "googclient_traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "CloudPubSubDeadLetterSourceDeliveryCount": "5",
        "CloudPubSubDeadLetterSourceSubscription": "mailpipe-delivery",
    }
    assert republished_attributes(attributes) == {"mail_id": "m1", "schema_version": "1"}


def test_the_link_points_at_the_original_publish() -> None:
    with TracerProvider().get_tracer("t").start_as_current_span("create") as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    link = publisher_link({"googclient_traceparent": carrier["traceparent"]})
    assert link is not None
    assert link.context.trace_id == span.get_span_context().trace_id
    assert link.context.span_id == span.get_span_context().span_id
    assert publisher_link({}) is None
    assert publisher_link({"googclient_traceparent": "garbage"}) is None


def test_selection_needs_something_and_matches_by_id_or_time() -> None:
    with pytest.raises(ValueError, match="select"):
        Selection()
    assert Selection(mail_ids=frozenset({"a"})).matches("a", None)
    assert not Selection(mail_ids=frozenset({"a"})).matches("b", None)
    since = Selection(since=NOW)
    assert since.matches("x", NOW) and not since.matches("x", NOW - dt.timedelta(seconds=1))
    assert not since.matches("x", None)  # unknown age: not replayed by time
    assert Selection(all=True).matches("anything", None)


def test_every_replay_status_has_its_human_label() -> None:
    # Keyed by the values, so that the module needs no ops.replay (and no Pub/Sub) at import.
    assert set(_HUMAN_STATUS) == {str(status) for status in ReplayStatus}
