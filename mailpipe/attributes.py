"""The attribute names mailpipe writes (an interface: docs/observability.md), and reading trace
context back from them. ``PUBSUB_*`` are Pub/Sub message attributes, the rest span (and metric)
attributes. :func:`publisher_context` and :func:`publisher_link` read ``googclient_traceparent``
where the client library does not (push requests, dead-letter replays).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# The mail header that carries the `mail deliver` span's context to the recipient (the canary).
MAIL_TRACEPARENT_HEADER = "traceparent"

# --- Pub/Sub message attributes ------------------------------------------------------------------
PUBSUB_MAIL_ID = "mail_id"
PUBSUB_SCHEMA_VERSION = "schema_version"
PUBSUB_DELIVER_BY = "deliver_by"  # RFC 3339: the mail's give-up time (docs/deliver-by.md)
PUBSUB_TRACEPARENT = "googclient_traceparent"  # W3C traceparent of the publisher's create span
# Added by Pub/Sub to a dead-lettered copy: how many deliveries the original had.
PUBSUB_DEAD_LETTER_DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"

# --- span attributes: mailpipe's own ------------------------------------------------------------
SPAN_MAIL_ID = "mailpipe.mail_id"
SPAN_OUTCOME = "mailpipe.outcome"  # subscriber.delivery.Outcome, or "dead_lettered"
SPAN_DUPLICATE = "mailpipe.duplicate"  # a redelivery of a mail already final: nothing sent
SPAN_LINK_KIND = "mailpipe.link"  # on a span link: why it links (e.g. "cloud_run_request")
SPAN_REPLAY_SOURCE_MESSAGE_ID = "mailpipe.replay.source_message_id"
SPAN_REPLAY_ORIGINAL_TRACE_ID = "mailpipe.replay.original_trace_id"
SPAN_REPLAY_OUTCOME = "mailpipe.replay.outcome"

# --- span (and metric) attributes: SMTP ----------------------------------------------------------
SMTP_REPLY_CODE = "smtp.reply.code"
SMTP_ENHANCED_STATUS = "smtp.reply.enhanced_status"
SMTP_STEP = "smtp.step"
SMTP_RECIPIENT = "smtp.recipient"
SMTP_CONNECTION_REUSED = "smtp.connection.reused"

# --- metric attributes ---------------------------------------------------------------------------
METRIC_FIRST_ATTEMPT = "mailpipe.first_attempt"  # on delivery latency: the first attempt or a retry
METRIC_STUCK_KIND = "mailpipe.stuck.kind"  # on the stuck-mail gauge: reserved, queued, ...

# --- span attributes: OpenTelemetry semantic conventions -----------------------------------------
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_SYSTEM_PUBSUB = "gcp_pubsub"  # the value of MESSAGING_SYSTEM
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_DELIVERY_ATTEMPT = "messaging.gcp_pubsub.message.delivery_attempt"

# --- trace context -------------------------------------------------------------------------------
_propagator = TraceContextTextMapPropagator()


def extract_context(carrier: Mapping[str, str]) -> Context | None:
    """The remote context in W3C ``traceparent``/``tracestate`` entries, or None if not valid.
    Keys match in any case: WSGI servers hand headers over as ``Traceparent``."""
    lowered = {key.lower(): value for key, value in carrier.items()}
    context = _propagator.extract(lowered)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def context_from_traceparent(traceparent: str | None) -> Context | None:
    """The remote context in one ``traceparent`` value (a header, an attribute), if valid."""
    return extract_context({"traceparent": traceparent.strip()}) if traceparent else None


def publisher_context(attributes: Mapping[str, str]) -> Context | None:
    """The publisher's trace context from a message's ``googclient_traceparent``, if valid."""
    return context_from_traceparent(attributes.get(PUBSUB_TRACEPARENT))


def context_link(
    context: Context | None, attributes: Mapping[str, str] | None = None
) -> Link | None:
    """A span link to the span of ``context``, or None without one."""
    if context is None:
        return None
    return Link(trace.get_current_span(context).get_span_context(), attributes)


def publisher_link(attributes: Mapping[str, str]) -> Link | None:
    """A link to the original publish (its ``create`` span) from ``googclient_traceparent``."""
    return context_link(publisher_context(attributes))


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span (for a mail header), or None without one."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")
