"""The local trace store's writer: spans as JSON lines in one file (``MAILPIPE_TRACES=file``).

The publisher and the subscriber can share the file: each line is one ``write()`` on a file
opened with ``O_APPEND``. ``mailpipe trace`` reads it back (ops/trace_view.py); a line is
:func:`span_to_dict` of one span.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import format_span_id, format_trace_id


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: _jsonable(value) for key, value in (attributes or {}).items()}


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """The JSON object written for one finished span."""
    context, parent = span.get_span_context(), span.parent
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
        "events": [{"name": e.name, "attributes": _attributes(e.attributes)} for e in span.events],
        "links": [
            {
                "trace_id": format_trace_id(ln.context.trace_id),
                "span_id": format_span_id(ln.context.span_id),
            }
            for ln in span.links
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

    def _still_at_path(self, fd: int) -> bool:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [
            (json.dumps(span_to_dict(s), separators=(",", ":")) + "\n").encode() for s in spans
        ]
        try:
            with self._lock:
                fd = self._open()
                for line in lines:  # one write() each: O_APPEND never interleaves two processes'
                    os.write(fd, line)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written straight through
