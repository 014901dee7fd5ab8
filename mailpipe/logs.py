"""Structured logs in Cloud Logging's JSON format, joined to traces, with secrets kept out.

``configure_logging`` writes each record as one JSON line, which Cloud Run parses into a
structured entry carrying the current span's trace fields (docs/observability.md, "Logs ↔
traces"); extra fields: ``extra={"json_fields": {}}``. :func:`register_secret` makes a value
``[REDACTED]`` everywhere in every line (message, arguments, extra fields, tracebacks). Bodies
are never logged; addresses only as :func:`redact_address` shows them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from typing import Any, TextIO

from opentelemetry import trace

from mailpipe.config import AddressStyle, TelemetryConfig

REDACTED = "[REDACTED]"

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Never let ``value`` appear in a log line from now on (empty values are ignored)."""
    global _secrets  # noqa: PLW0603 - a process-wide registry, read on every log line
    if not value:
        return
    # Also as a JSON string carries it (quotes, backslashes and control characters escaped), for
    # the serialised lines; longest first, so a secret containing another is replaced whole.
    forms = {value, json.dumps(value, ensure_ascii=False)[1:-1]}
    with _secrets_lock:
        _secrets = tuple(sorted({*_secrets, *forms}, key=len, reverse=True))


def redact_secrets(text: str) -> str:
    """``text`` with every registered secret replaced by ``[REDACTED]``."""
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_address(address: str, style: AddressStyle) -> str:
    """An address as logs and spans may show it: ``full``, ``domain`` (``@example.com``) or
    ``hashed`` (``sha256:`` + 12 hex digits of the lower-cased address). An unkeyed hash of a
    guessable address can be brute-forced: it hides addresses from casual readers only."""
    address = address.strip()
    if style == "full":
        return address
    if style == "domain":
        _, at, domain = address.rpartition("@")
        return f"@{domain.lower()}" if at else "@"
    return f"sha256:{hashlib.sha256(address.lower().encode()).hexdigest()[:12]}"


# Addresses in free text (SMTP replies, exception messages); not an RFC 5322 parser. \w, not
# A-Za-z0-9: internationalised addresses (RFC 6531, "jürgen@bücher.example") are addresses too.
_ADDRESS_IN_TEXT = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


# In a JSON line: an escape (``\\n``, ``\\u0009``) is skipped whole, so an address right after one
# is redacted without taking the escape's last character with it (the line stays valid JSON).
_ESCAPE_OR_ADDRESS = re.compile(r"(\\(?:u[0-9a-fA-F]{4}|.))|" + _ADDRESS_IN_TEXT.pattern)


def _jsonable(value: Any) -> Any:
    """What json.dumps writes for a value it cannot: a set as a list (its items then escaped like
    any string, so a registered secret's JSON form is found), anything else as its ``str``."""
    return list(value) if isinstance(value, set | frozenset) else str(value)


def redact_addresses(text: str, style: AddressStyle) -> str:
    """``text`` with every address in it shown as ``style`` allows (see :func:`redact_address`)."""
    if style == "full" or "@" not in text:
        return text
    return _ADDRESS_IN_TEXT.sub(lambda match: redact_address(match.group(0), style), text)


# A record's severity is the standard level at or below its own (custom levels). Spelled out, not
# logging.getLevelName(): a library may rename a level; Cloud Logging may not.
_SEVERITIES = ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO"))


@dataclasses.dataclass(eq=False, kw_only=True)
class CloudLoggingFormatter(logging.Formatter):
    """Formats a record as one line of Cloud Logging structured JSON."""

    project: str | None
    service_name: str | None = None
    address_style: AddressStyle = "full"

    def __post_init__(self) -> None:
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # Cloud Error Reporting groups errors by a traceback inside the message.
            message = f"{message}\n{self.formatException(record.exc_info)}"
        elif record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        created = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        severity = next((name for level, name in _SEVERITIES if record.levelno >= level), "DEBUG")
        payload: dict[str, Any] = {
            "severity": severity,
            "message": message,
            "time": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "logger": record.name,
            "logging.googleapis.com/sourceLocation": {
                "file": record.pathname,
                "line": str(record.lineno),
                "function": record.funcName,
            },
        }
        if self.service_name:
            payload["serviceContext"] = {"service": self.service_name}
        payload.update(self._trace_fields())
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                payload.setdefault(str(key), value)
        line = redact_secrets(json.dumps(payload, default=_jsonable, ensure_ascii=False))
        if self.address_style == "full" or "@" not in line:
            return line
        style = self.address_style
        return _ESCAPE_OR_ADDRESS.sub(lambda m: m[1] or redact_address(m[0], style), line)

    def _trace_fields(self) -> dict[str, Any]:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return {}
        trace_id = trace.format_trace_id(context.trace_id)
        return {  # the fields Cloud Logging joins a line to its trace by
            "logging.googleapis.com/trace": (
                f"projects/{self.project}/traces/{trace_id}" if self.project else trace_id
            ),
            "logging.googleapis.com/spanId": trace.format_span_id(context.span_id),
            "logging.googleapis.com/trace_sampled": context.trace_flags.sampled,
        }


@functools.cache  # once per process
def _install_redacting_record_factory() -> None:
    """Wrap the log record factory so that every handler (gunicorn's, a test's caplog) gets each
    message with the secrets redacted. ``extra`` fields, set on the record after the factory made
    it, and tracebacks are redacted by :class:`CloudLoggingFormatter`."""
    factory = logging.getLogRecordFactory()

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if _secrets:
            record.msg = redact_secrets(record.getMessage())
            record.args = None
        return record

    logging.setLogRecordFactory(redacting_factory)


def configure_logging(
    config: TelemetryConfig,
    *,
    stream: TextIO | None = None,
    level: str | int = "INFO",
    project: str | None = None,
) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stdout) as Cloud Logging JSON lines through
    one handler (returned; a second call replaces it); ``project`` goes into the trace field."""
    _install_redacting_record_factory()
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    formatter = CloudLoggingFormatter(
        project=project, service_name=config.service_name, address_style=config.address_style
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, CloudLoggingFormatter)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
