"""The local trace store's writer: spans as JSON lines in one file (``MAILPIPE_TRACES=file``),
read back by ``mailpipe trace`` (ops/trace_view.py). The publisher and the subscriber can share
the file: each line is one ``write()`` on a file opened with ``O_APPEND``."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def _attributes(attributes: Any) -> dict[str, Any]:
    """A plain dict of span or event attributes. The SDK's BoundedAttributes reads each item under
    a lock; its inner dict, read-only once the span ended, copies at C speed."""
    return dict(getattr(attributes, "_dict", None) or attributes or {})


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """The JSON object written for one finished span."""
    context, parent = span.context, span.parent
    return {
        "trace_id": format(context.trace_id, "032x") if context else None,
        "span_id": format(context.span_id, "016x") if context else None,
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start": span.start_time,
        "end": span.end_time,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": _attributes(getattr(span, "_attributes", None) or span.attributes),
        "events": [{"name": e.name, "attributes": _attributes(e.attributes)} for e in span.events],
        "links": [
            {
                "trace_id": format(ln.context.trace_id, "032x"),
                "span_id": format(ln.context.span_id, "016x"),
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
        if self._fd is not None:
            with suppress(FileNotFoundError):
                if os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
                    return self._fd
            # The file was deleted or replaced (a developer cleared old traces): start a new one.
            os.close(self._fd)
            self._fd = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [
            (json.dumps(span_to_dict(s), separators=(",", ":"), default=str) + "\n").encode()
            for s in spans
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
