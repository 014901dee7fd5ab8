"""mailpipe.attributes: the names dashboards and Trace Explorer filters select on, and the
trace-context helpers that read ``googclient_traceparent`` and the mail's ``traceparent``."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from mailpipe import attributes

VALID = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


def test_the_names_are_the_documented_interface() -> None:
    # Literal on purpose: a renamed value breaks dashboards, alerts and saved trace filters.
    assert [
        attributes.PUBSUB_MAIL_ID,
        attributes.PUBSUB_SCHEMA_VERSION,
        attributes.PUBSUB_TRACEPARENT,
        attributes.SPAN_MAIL_ID,
        attributes.SPAN_OUTCOME,
        attributes.SMTP_REPLY_CODE,
        attributes.SMTP_ENHANCED_STATUS,
        attributes.MESSAGING_DELIVERY_ATTEMPT,
        attributes.MAIL_TRACEPARENT_HEADER,
    ] == [
        "mail_id",
        "schema_version",
        "googclient_traceparent",
        "mailpipe.mail_id",
        "mailpipe.outcome",
        "smtp.reply.code",
        "smtp.reply.enhanced_status",
        "messaging.gcp_pubsub.message.delivery_attempt",
        "traceparent",
    ]


def test_the_publishers_context_comes_from_googclient_traceparent() -> None:
    context = attributes.publisher_context({"googclient_traceparent": VALID, "mail_id": "m1"})
    assert context is not None
    span_context = trace.get_current_span(context).get_span_context()
    assert (format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")) == (
        "a" * 32,
        "b" * 16,
    )
    assert span_context.is_remote


def test_missing_or_invalid_context_is_none_not_an_error() -> None:
    assert attributes.publisher_context({}) is None
    assert attributes.publisher_context({"googclient_traceparent": "garbage"}) is None
    assert (
        attributes.publisher_context({"googclient_traceparent": "00-" + "0" * 32 + "-1-01"}) is None
    )
    assert attributes.context_from_traceparent(None) is None
    assert attributes.publisher_link({"googclient_traceparent": "garbage"}) is None


def test_a_folded_mail_header_value_still_reads() -> None:
    context = attributes.context_from_traceparent(f" {VALID}\r\n")
    assert context is not None


def test_the_current_span_round_trips_through_its_traceparent() -> None:
    with TracerProvider().get_tracer("t").start_as_current_span("mail deliver") as span:
        traceparent = attributes.current_traceparent()
    assert traceparent is not None
    context = attributes.context_from_traceparent(traceparent)
    assert context is not None
    read = trace.get_current_span(context).get_span_context()
    assert (read.trace_id, read.span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )
    assert attributes.current_traceparent() is None  # no span outside


def test_a_link_keeps_its_attributes() -> None:
    context = attributes.context_from_traceparent(VALID)
    link = attributes.context_link(context, {attributes.SPAN_LINK_KIND: "cloud_run_request"})
    assert link is not None
    assert dict(link.attributes or {}) == {"mailpipe.link": "cloud_run_request"}
    assert attributes.context_link(None) is None


def test_http_headers_match_in_any_case() -> None:
    # WSGI servers pass "Traceparent"; HTTP header names are case-insensitive.
    assert attributes.extract_context({"Traceparent": VALID, "Host": "x"}) is not None
    assert attributes.extract_context({"TRACEPARENT": VALID}) is not None
