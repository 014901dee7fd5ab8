"""The mail carries its trace past mailpipe: a downstream SMTP server continues it.

A mail goes through the real pipeline (HTTP → emulator → SMTP); the mail the relay received is
then handed, unchanged, to a second real SMTP server running the receiving-side hook from
examples/traceparent_hook.py — as a relay forwards it to the next MTA. The hook's
``mail receive`` span must be a child of mailpipe's ``mail deliver`` span, in the publisher's trace.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from aiosmtpd.controller import Controller
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from emulator.process import free_port
from examples.traceparent_hook import TraceparentHandler, mail_id_from
from tests.fixtures.pipeline import Pipeline


@pytest.fixture
def downstream() -> Iterator[tuple[Controller, TraceparentHandler, InMemorySpanExporter]]:
    """The example hook on a real aiosmtpd server, with its own service's tracer."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "downstream-mta"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = TraceparentHandler(provider.get_tracer("downstream-mta"))
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), server_hostname="downstream.localhost"
    )
    controller.start()
    yield controller, handler, exporter
    controller.stop()
    provider.shutdown()


def forward(controller: Controller, mail_from: str, recipients: list[str], raw: bytes) -> None:
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.sendmail(mail_from, recipients, raw)


def test_downstream_mta_continues_the_trace(
    pipeline: Pipeline,
    downstream: tuple[Controller, TraceparentHandler, InMemorySpanExporter],
) -> None:
    controller, handler, exporter = downstream
    accepted = pipeline.send(text="hello downstream").json()
    [received] = pipeline.smtp.wait_for(1, timeout=30)
    spans = pipeline.wait_for_spans(accepted["trace_id"], {"mail deliver"})
    [deliver] = [s for s in spans if s.name == "mail deliver"]

    forward(controller, received.mail_from, list(received.recipients), received.raw)

    [receive] = exporter.get_finished_spans()
    assert receive.name == "mail receive"
    assert receive.kind is SpanKind.SERVER
    assert receive.resource.attributes["service.name"] == "downstream-mta"
    assert format(receive.context.trace_id, "032x") == accepted["trace_id"]
    assert receive.parent is not None and receive.parent.span_id == deliver.context.span_id
    assert receive.parent.is_remote
    assert dict(receive.attributes or {}) == {
        "mailpipe.mail_id": accepted["mail_id"],
        "smtp.recipient.count": 1,
        "messaging.message.body.size": len(received.raw),
    }
    [message] = handler.received
    assert message["traceparent"] == received.message["traceparent"]


def test_a_mail_without_traceparent_starts_a_new_trace(
    downstream: tuple[Controller, TraceparentHandler, InMemorySpanExporter],
) -> None:
    controller, _, exporter = downstream
    raw = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nno trace here\r\n"
    forward(controller, "a@example.com", ["b@example.org"], raw)
    [receive] = exporter.get_finished_spans()
    assert receive.parent is None
    assert "mailpipe.mail_id" not in (receive.attributes or {})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "<01a209fa-3a9a-70ee-a838-206d6f3614d4@mailpipe.local>",
            "01a209fa-3a9a-70ee-a838-206d6f3614d4",
        ),
        ("<abc@example.com>", "abc"),
        ("not a message id", None),
        (None, None),
    ],
)
def test_mail_id_from_message_id(header: str | None, expected: str | None) -> None:
    assert mail_id_from(header) == expected
