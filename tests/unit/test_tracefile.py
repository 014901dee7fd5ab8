"""The JSON-lines trace file: written by the core (mailpipe/tracefile.py), read back, a mail's
trace found and drawn as a waterfall by the viewer (ops/trace_view.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from mailpipe.tracefile import JsonLinesSpanExporter
from ops.trace_view import find_trace, format_duration, read_spans, render_waterfall
from tests.fixtures.telemetry import SAMPLE_START_NS, write_sample_trace

MAIL_ID = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return tmp_path / ".mailpipe" / "traces.jsonl"


@pytest.fixture
def sample(trace_file: Path) -> str:
    """The sample mail's trace id, written next to another mail's trace."""
    exporter = JsonLinesSpanExporter(trace_file)
    trace_id = write_sample_trace(exporter, MAIL_ID)
    write_sample_trace(exporter, "another-mail")
    exporter.shutdown()
    return trace_id


def test_each_span_is_one_json_line_with_every_field(trace_file: Path, sample: str) -> None:
    lines = trace_file.read_text().splitlines()

    assert len(lines) == 14
    rows = [json.loads(line) for line in lines]
    rcpt = next(r for r in rows if r["name"] == "smtp rcpt to" and r["trace_id"] == sample)
    deliver = next(r for r in rows if r["span_id"] == rcpt["parent_span_id"])
    assert rcpt == {
        "trace_id": sample,
        "span_id": rcpt["span_id"],
        "parent_span_id": deliver["span_id"],
        "name": "smtp rcpt to",
        "kind": "CLIENT",
        "service": "mailpipe-subscriber",
        "start": SAMPLE_START_NS + 60_000_000,
        "end": SAMPLE_START_NS + 70_000_000,
        "status": {"code": "ERROR", "description": "451 4.3.0 try again later"},
        "attributes": {"smtp.reply.code": 451, "smtp.reply.enhanced_status": "4.3.0"},
        "events": [],
        "links": [],
    }
    retry = next(r for r in rows if r["links"] and r["trace_id"] == sample)
    assert retry["links"] == [{"trace_id": sample, "span_id": deliver["span_id"]}]


def test_read_spans_round_trips(trace_file: Path, sample: str) -> None:
    spans = read_spans(trace_file)

    data = next(s for s in spans if s.name == "smtp data" and s.trace_id == sample)
    assert data.service == "mailpipe-subscriber"
    assert data.duration_ns == 15_000_000
    assert data.attributes["smtp.reply.code"] == 250
    assert [json.loads(line) for line in trace_file.read_text().splitlines()] == [
        s.to_dict() for s in spans
    ]


def test_find_trace_by_mail_id_or_trace_id(trace_file: Path, sample: str) -> None:
    spans = read_spans(trace_file)

    by_mail = find_trace(spans, MAIL_ID)
    by_trace = find_trace(spans, sample.upper())

    assert {s.trace_id for s in by_mail} == {sample}
    assert by_trace == by_mail
    assert [s.name for s in by_mail][:3] == ["POST /v1/messages", "mail create", "mail deliver"]
    assert len(by_mail) == 7
    assert find_trace(spans, "no-such-mail") == []
    assert find_trace(spans, "0" * 32) == []


def test_missing_file_and_torn_last_line(trace_file: Path, sample: str) -> None:
    assert read_spans(trace_file.parent / "nothing-here.jsonl") == []

    with trace_file.open("a") as handle:
        handle.write('{"trace_id": "half a line')

    assert len(read_spans(trace_file)) == 14


def test_a_deleted_file_is_recreated(trace_file: Path) -> None:
    exporter = JsonLinesSpanExporter(trace_file)
    write_sample_trace(exporter, "before")
    trace_file.unlink()  # a developer clears old traces while the services run

    write_sample_trace(exporter, MAIL_ID)
    exporter.shutdown()

    assert {s.attributes.get("mailpipe.mail_id") for s in read_spans(trace_file)} == {
        MAIL_ID,
        None,
    }


def test_two_processes_can_append_to_one_file(trace_file: Path) -> None:
    writer = textwrap.dedent(
        """
        import sys
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from mailpipe.tracefile import JsonLinesSpanExporter

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(sys.argv[1])))
        tracer = provider.get_tracer("w")
        for index in range(300):
            with tracer.start_as_current_span(sys.argv[2] + str(index)) as span:
                span.set_attribute("padding", "x" * 2000)
        provider.shutdown()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", writer, str(trace_file), name])
        for name in ("pub", "sub")
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0

    lines = trace_file.read_text().splitlines()
    assert len(lines) == 600
    names = sorted(json.loads(line)["name"] for line in lines)  # every line parses whole
    assert names == sorted([f"pub{i}" for i in range(300)] + [f"sub{i}" for i in range(300)])


def test_waterfall_shows_every_span_with_service_timing_status_and_replies(
    trace_file: Path, sample: str
) -> None:
    console = Console(record=True, width=200)

    console.print(render_waterfall(find_trace(read_spans(trace_file), MAIL_ID)))
    text = console.export_text()

    assert f"trace {sample}" in text
    assert f"mail {MAIL_ID}" in text
    rows = {}  # span name → its row (the last one for the repeated "mail deliver")
    for line in text.splitlines():
        # A row: the table's left border, the tree's prefix, the span's name, the next column.
        if match := re.match(r"│[ │├└─]*(.+?)\s+│", line):
            rows[match.group(1)] = line
    assert set(rows) >= {
        "POST /v1/messages",
        "mail create",
        "mail deliver",
        "smtp connect",
        "smtp rcpt to",
        "smtp data",
    }
    rcpt = rows["smtp rcpt to"]
    assert "mailpipe-subscriber" in rcpt
    assert "+60.0 ms" in rcpt  # offset from the trace's start
    assert "10.0 ms" in rcpt  # duration
    assert "ERROR" in rcpt
    assert "smtp 451 4.3.0" in rcpt
    assert "smtp 250 2.0.0" in rows["smtp data"]
    assert "+10.05 s" in rows["smtp data"]
    assert "mailpipe-publisher" in rows["POST /v1/messages"]
    assert "40.0 ms" in rows["POST /v1/messages"]
    assert "└─ smtp rcpt to" in text  # drawn as a tree
    assert "attempt 2" in text
    assert "link → span" in text


@pytest.mark.parametrize(
    ("nanoseconds", "text"),
    [
        (0, "0 ms"),
        (420_000, "0.42 ms"),
        (12_300_000, "12.3 ms"),
        (1_250_000_000, "1.25 s"),
        (125_000_000_000, "2m 05s"),
        (3_720_000_000_000, "1h 02m"),
    ],
)
def test_format_duration(nanoseconds: int, text: str) -> None:
    assert format_duration(nanoseconds) == text


@pytest.mark.parametrize("width", [80, 100, 130])
def test_waterfall_keeps_the_smtp_replies_on_narrow_terminals(
    trace_file: Path, sample: str, width: int
) -> None:
    console = Console(record=True, width=width)

    console.print(render_waterfall(find_trace(read_spans(trace_file), MAIL_ID)))
    text = console.export_text()

    assert all(len(line) <= width for line in text.splitlines())
    assert "smtp 451 4.3.0" in text  # the reply a reader came for survives every width
    assert ("mailpipe-subscriber" in text) == (width >= 120)
