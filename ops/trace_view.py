"""The trace viewer: spans read back from the local trace file and drawn as a waterfall.

mailpipe/tracefile.py writes the file (one JSON object per span, the format is in its docstring).
``mailpipe trace`` reads it back (:func:`read_spans`), picks one trace (:func:`find_trace`, by trace
id or by ``mailpipe.mail_id``) and prints :func:`render_waterfall`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpipe.attributes import (
    MESSAGING_DELIVERY_ATTEMPT,
    SMTP_CONNECTION_REUSED,
    SMTP_ENHANCED_STATUS,
    SMTP_REPLY_CODE,
    SPAN_MAIL_ID,
    SPAN_OUTCOME,
)

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
