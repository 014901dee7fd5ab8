"""A receiving-side SMTP hook that continues mailpipe's trace: the downstream-MTA end of a mail.

mailpipe puts a W3C ``traceparent`` header in every mail it sends, naming its ``mail deliver``
span. A server that receives the mail can read that header and open its own span as a child of
it, so the trace in Cloud Trace (or ``mailpipe trace``) goes on past mailpipe's SMTP reply: into
the relay, a filter, or the mailbox store.

This example is an aiosmtpd handler doing exactly that with a ``mail receive`` SERVER span::

    from aiosmtpd.controller import Controller
    from opentelemetry import trace
    from examples.traceparent_hook import TraceparentHandler

    handler = TraceparentHandler(trace.get_tracer("downstream-mta"))
    Controller(handler, hostname="127.0.0.1", port=2526).start()

Only headers reach the span, never the body. A mail without a valid ``traceparent`` (not sent by
mailpipe, or stripped on the way) gets a span in a new trace. Only trust the header from senders
you know: anyone can write one, and all it can do is attach your span to a trace of their choice.

A Postfix milter does the same in its ``header`` callback (see docs/observability.md).
"""

from __future__ import annotations

import email
import re
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from typing import Any

from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT_HEADER = "traceparent"
_MESSAGE_ID = re.compile(r"^<([^@>]+)@[^>]+>$")
_propagator = TraceContextTextMapPropagator()


def mail_id_from(message_id: str | None) -> str | None:
    """The left part of ``Message-ID: <left@domain>``: for a mailpipe mail, its mail id.

    None when the header is missing or not of that form.
    """
    match = _MESSAGE_ID.match((message_id or "").strip())
    return match.group(1) if match else None


@dataclass
class TraceparentHandler:
    """aiosmtpd handler: accepts every mail and records a ``mail receive`` span for it."""

    tracer: Tracer
    received: list[Message] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        # Only headers reach the span; the body is never looked at.
        message = email.message_from_bytes(raw, policy=policy.default)
        parent = _propagator.extract({TRACEPARENT_HEADER: str(message.get(TRACEPARENT_HEADER, ""))})
        with self.tracer.start_as_current_span(
            "mail receive", context=parent, kind=SpanKind.SERVER
        ) as span:
            mail_id = mail_id_from(message.get("Message-ID"))
            if mail_id is not None:
                span.set_attribute("mailpipe.mail_id", mail_id)
            span.set_attribute("smtp.recipient.count", len(envelope.rcpt_tos))
            span.set_attribute("messaging.message.body.size", len(raw))
            self.received.append(message)
        return "250 2.0.0 OK"
