"""The local trace store: spans as JSON lines in one file, read back and drawn as a waterfall.

``JsonLinesSpanExporter`` appends one JSON object per span; the publisher and the subscriber can
share the file because each line is written with a single ``write()`` on a file opened with
``O_APPEND``. ``mailpipe trace`` reads it back (:func:`read_spans`), picks one trace
(:func:`find_trace`, by trace id or by ``mailpipe.mail_id``) and prints :func:`render_waterfall`.

A line looks like::

    {"trace_id": "4bf9…", "span_id": "00f0…", "parent_span_id": null, "name": "POST /v1/messages",
     "kind": "SERVER", "service": "mailpipe-publisher", "start": 1700000000000000000,
     "end": 1700000000004000000, "status": {"code": "UNSET", "description": null},
     "attributes": {...}, "events": [{"name": "...", "attributes": {...}}],
     "links": [{"trace_id": "…", "span_id": "…"}]}
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import format_span_id, format_trace_id

from mailpipe.attributes import (
    MESSAGING_DELIVERY_ATTEMPT,
    SMTP_CONNECTION_REUSED,
    SMTP_ENHANCED_STATUS,
    SMTP_REPLY_CODE,
    SPAN_MAIL_ID,
    SPAN_OUTCOME,
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _line(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: _jsonable(value) for key, value in (attributes or {}).items()}


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """The JSON object written for one finished span."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "trace_id": format_trace_id(context.trace_id) if context else None,
        "span_id": format_span_id(context.span_id) if context else None,
        "parent_span_id": format_span_id(parent.span_id) if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start": span.start_time,
        "end": span.end_time,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": _attributes(span.attributes),
        "events": [
            {"name": event.name, "attributes": _attributes(event.attributes)}
            for event in span.events
        ],
        "links": [
            {
                "trace_id": format_trace_id(link.context.trace_id),
                "span_id": format_span_id(link.context.span_id),
            }
            for link in span.links
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span as one JSON line to ``path`` (created with its parent folders)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is not None and not self._still_at_path(self._fd):
            # The file was deleted or replaced (a developer cleared old traces): start a new one.
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [_line(span_to_dict(span)) for span in spans]
        try:
            with self._lock:
                fd = self._open()
                for line in lines:
                    # One write() per line: with O_APPEND the kernel places each line whole at the
                    # end of the file, so two processes' lines never interleave.
                    os.write(fd, line)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _still_at_path(self, fd: int) -> bool:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written straight through


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanRecord:
    """One span read back from the file."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: str | None
    start: int
    end: int
    status_code: str = "UNSET"
    status_description: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[Mapping[str, Any]] = ()
    links: Sequence[Mapping[str, str]] = ()

    @property
    def duration_ns(self) -> int:
        return max(0, self.end - self.start)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpanRecord:
        status = data.get("status") or {}
        return cls(
            trace_id=str(data["trace_id"]),
            span_id=str(data["span_id"]),
            parent_span_id=data.get("parent_span_id"),
            name=str(data.get("name", "")),
            kind=str(data.get("kind", "INTERNAL")),
            service=data.get("service"),
            start=int(data.get("start") or 0),
            end=int(data.get("end") or data.get("start") or 0),
            status_code=str(status.get("code", "UNSET")),
            status_description=status.get("description"),
            attributes=dict(data.get("attributes") or {}),
            events=list(data.get("events") or []),
            links=list(data.get("links") or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "service": self.service,
            "start": self.start,
            "end": self.end,
            "status": {"code": self.status_code, "description": self.status_description},
            "attributes": dict(self.attributes),
            "events": [dict(e) for e in self.events],
            "links": [dict(link) for link in self.links],
        }


def read_spans(path: str | os.PathLike[str]) -> list[SpanRecord]:
    """Every span in the file, in file order. A missing file is empty; a torn line is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return list(_parse(text.splitlines()))


def _parse(lines: Iterable[str]) -> Iterable[SpanRecord]:
    for line in lines:
        if not line.strip():
            continue
        try:
            yield SpanRecord.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError):
            # The last line can be half-written while an exporter appends; skip it.
            continue


# --- finding -------------------------------------------------------------------------------------


def _is_trace_id(key: str) -> bool:
    return len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def find_trace(spans: Iterable[SpanRecord], key: str) -> list[SpanRecord]:
    """The spans of the trace(s) ``key`` names, ordered by start time.

    ``key`` is a trace id (32 hex digits) or a mail id: then every trace that has a span with
    ``mailpipe.mail_id == key`` (a replayed mail has a second trace, linked to the first).
    Empty when nothing matches.
    """
    spans = list(spans)
    wanted = key.strip()
    trace_ids: set[str] = set()
    if _is_trace_id(wanted.lower()):
        trace_ids = {s.trace_id for s in spans if s.trace_id == wanted.lower()}
    if not trace_ids:
        trace_ids = {s.trace_id for s in spans if s.attributes.get(SPAN_MAIL_ID) == wanted}
    found = [s for s in spans if s.trace_id in trace_ids]
    # A span exported twice (a retried export) is shown once.
    unique = {(s.trace_id, s.span_id): s for s in found}
    return sorted(unique.values(), key=lambda s: (s.start, s.end))


def group_by_trace(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Spans by trace id, traces in order of their first span, spans by start time."""
    groups: dict[str, list[SpanRecord]] = {}
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        groups.setdefault(span.trace_id, []).append(span)
    return groups


# --- drawing -------------------------------------------------------------------------------------

BAR_WIDTH = 24
_STATUS_STYLE = {"OK": "green", "ERROR": "red", "UNSET": "cyan"}


def format_duration(nanoseconds: int) -> str:
    """A human duration: ``0.42 ms``, ``12.3 ms``, ``1.25 s``, ``2m 05s``, ``1h 02m``."""
    seconds = nanoseconds / 1e9
    if nanoseconds == 0:
        return "0 ms"
    if seconds < 0.001:
        return f"{nanoseconds / 1e6:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _details(span: SpanRecord) -> str:
    parts: list[str] = []
    code = span.attributes.get(SMTP_REPLY_CODE)
    if code is not None:
        enhanced = span.attributes.get(SMTP_ENHANCED_STATUS)
        parts.append(f"smtp {code}" + (f" {enhanced}" if enhanced else ""))
    outcome = span.attributes.get(SPAN_OUTCOME)
    if outcome:
        parts.append(str(outcome))
    attempt = span.attributes.get(MESSAGING_DELIVERY_ATTEMPT)
    if attempt is not None:
        parts.append(f"attempt {attempt}")
    if span.attributes.get(SMTP_CONNECTION_REUSED):
        parts.append("reused connection")
    if span.status_code == "ERROR" and span.status_description not in (None, "", outcome):
        parts.append(str(span.status_description))
    for link in span.links:
        target = link.get("span_id", "?")
        if link.get("trace_id") != span.trace_id:
            target = f"trace {link.get('trace_id', '?')} span {target}"
        else:
            target = f"span {target}"
        parts.append(f"link → {target}")
    return "; ".join(parts)


def _bar(span: SpanRecord, start: int, total: int) -> Any:
    from rich.text import Text

    if total <= 0:
        left, width = 0, BAR_WIDTH
    else:
        left = min(BAR_WIDTH - 1, int((span.start - start) / total * BAR_WIDTH))
        width = max(1, min(BAR_WIDTH - left, round(span.duration_ns / total * BAR_WIDTH)))
    text = Text(" " * left)
    text.append("━" * width, style=_STATUS_STYLE.get(span.status_code, "cyan"))
    return text


def _tree_order(spans: list[SpanRecord]) -> list[tuple[str, SpanRecord]]:
    """(prefix, span) in depth-first order; spans whose parent is missing are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in ids else None
        children.setdefault(parent, []).append(span)
    ordered: list[tuple[str, SpanRecord]] = []

    def walk(parent: str | None, indent: str) -> None:
        kids = sorted(children.get(parent, []), key=lambda s: (s.start, s.end))
        for index, span in enumerate(kids):
            last = index == len(kids) - 1
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            ordered.append((indent + branch, span))
            walk(span.span_id, indent + ("" if parent is None else ("   " if last else "│  ")))

    walk(None, "")
    return ordered


def render_waterfall(spans: Sequence[SpanRecord]) -> Any:
    """A rich renderable: one table per trace, every span as a tree row with its service,
    offset from the trace's start, duration, status, SMTP reply and links, and — when the
    terminal is wide enough — a timeline bar."""
    return _Waterfall(list(spans))


# Narrower terminals drop columns so the details (SMTP replies, outcome) always fit: below
# TIMELINE_MIN_WIDTH the timeline goes; below SERVICE_MIN_WIDTH the service and status columns go
# too (an ERROR status then leads the details).
TIMELINE_MIN_WIDTH = 150
SERVICE_MIN_WIDTH = 120


class _Waterfall:
    def __init__(self, spans: list[SpanRecord]) -> None:
        self.spans = spans

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.console import Group

        width = options.max_width
        yield Group(
            *self._tables(
                with_timeline=width >= TIMELINE_MIN_WIDTH, with_service=width >= SERVICE_MIN_WIDTH
            )
        )

    def _tables(self, *, with_timeline: bool, with_service: bool) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        tables: list[Any] = []
        for trace_id, trace_spans in group_by_trace(self.spans).items():
            start = min(s.start for s in trace_spans)
            end = max(s.end for s in trace_spans)
            mail_ids = sorted(
                {str(m) for s in trace_spans if (m := s.attributes.get(SPAN_MAIL_ID))}
            )
            title = f"trace {trace_id}"
            if mail_ids:
                title += f" · mail {', '.join(mail_ids)}"
            title += f" · {len(trace_spans)} spans · {format_duration(end - start)}"
            table = Table(title=title, title_justify="left", expand=False, pad_edge=False)
            table.add_column("span", no_wrap=True, overflow="ellipsis")
            if with_service:
                table.add_column("service", no_wrap=True)
            table.add_column("offset", justify="right", no_wrap=True)
            table.add_column("duration", justify="right", no_wrap=True)
            if with_service:
                table.add_column("status", no_wrap=True)
            if with_timeline:
                table.add_column("timeline", no_wrap=True)
            table.add_column("details")
            for prefix, span in _tree_order(trace_spans):
                name = Text(prefix, style="dim")
                name.append(span.name, style="bold" if not prefix else "")
                # UNSET is the norm for successful spans: show only what was decided.
                status = Text(
                    "" if span.status_code == "UNSET" else span.status_code,
                    style=_STATUS_STYLE.get(span.status_code, ""),
                )
                details: Text | str = _details(span)
                cells: list[Any] = [name]
                if with_service:
                    cells.append(span.service or "?")
                cells += [
                    "+" + format_duration(span.start - start),
                    format_duration(span.duration_ns),
                ]
                if with_service:
                    cells.append(status)
                elif status.plain:
                    details = Text.assemble(status, " ", details)
                if with_timeline:
                    cells.append(_bar(span, start, end - start))
                cells.append(details)
                table.add_row(*cells)
            tables.append(table)
        return tables
