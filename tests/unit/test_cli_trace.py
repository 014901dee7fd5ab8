"""``mailpipe trace``: the waterfall of a mail's trace from a file the exporter wrote."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest

from mailpipe.tracefile import JsonLinesSpanExporter
from ops.cli import EXIT_FAILED, EXIT_OK
from ops.cli import trace as trace_cli
from tests.fixtures.telemetry import write_sample_trace

MAIL_ID = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def run(*argv: str) -> int:
    """Parse as `mailpipe trace ...` would (only this sub-command registered) and run it."""
    parser = argparse.ArgumentParser(prog="mailpipe")
    trace_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["trace", *argv])
    return int(args.handler(args))


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "traces.jsonl"
    exporter = JsonLinesSpanExporter(path)
    write_sample_trace(exporter, "another-mail")
    write_sample_trace(exporter, MAIL_ID)
    exporter.shutdown()
    return path


def test_prints_the_waterfall_by_mail_id(trace_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(MAIL_ID, "--file", str(trace_file)) == EXIT_OK

    out = capsys.readouterr().out
    assert f"mail {MAIL_ID}" in out
    for name in ("POST /v1/messages", "mail create", "mail deliver", "smtp rcpt to", "smtp data"):
        assert name in out
    assert "smtp 451 4.3.0" in out
    assert "smtp 250 2.0.0" in out
    assert "another-mail" not in out


def test_json_output_by_trace_id(trace_file: Path, capsys: pytest.CaptureFixture) -> None:
    run(MAIL_ID, "--file", str(trace_file), "--json")
    trace_id = json.loads(capsys.readouterr().out)["trace_ids"][0]

    assert run(trace_id, "--file", str(trace_file), "--json") == EXIT_OK

    document = json.loads(capsys.readouterr().out)
    assert document["trace_ids"] == [trace_id]
    assert len(document["spans"]) == 7
    assert {span["trace_id"] for span in document["spans"]} == {trace_id}
    data = next(span for span in document["spans"] if span["name"] == "smtp data")
    assert data["attributes"]["smtp.reply.code"] == 250


def test_default_file_comes_from_the_environment(
    trace_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MAILPIPE_TRACE_FILE", str(trace_file))

    assert run(MAIL_ID) == EXIT_OK
    assert "smtp data" in capsys.readouterr().out


def test_unknown_mail_exits_1_with_a_message(
    trace_file: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run("no-such-mail", "--file", str(trace_file)) == EXIT_FAILED

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no trace for 'no-such-mail'" in captured.err
    assert str(trace_file) in captured.err


def test_missing_file_says_how_to_produce_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "nope.jsonl"

    assert run(MAIL_ID, "--file", str(missing)) == EXIT_FAILED

    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "MAILPIPE_TRACES=file" in err


def test_wait_polls_until_the_spans_arrive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "traces.jsonl"
    exporter = JsonLinesSpanExporter(path)
    # The spans are written while the command is already polling, as a running pipeline would.
    writer = threading.Timer(0.5, write_sample_trace, args=(exporter, MAIL_ID))
    writer.start()
    try:
        assert run(MAIL_ID, "--file", str(path), "--wait", "30") == EXIT_OK
    finally:
        writer.join()
        exporter.shutdown()

    assert "smtp data" in capsys.readouterr().out


def test_wait_gives_up_at_its_deadline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_text("")

    assert run(MAIL_ID, "--file", str(path), "--wait", "0.3") == EXIT_FAILED
    assert "waited 0.3 s" in capsys.readouterr().err
