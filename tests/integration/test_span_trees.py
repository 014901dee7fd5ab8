"""The exact span tree of a mail's journey, through the in-memory exporter, for each outcome.

Real parts: the publisher app over HTTP, Google's Pub/Sub emulator over gRPC, the streaming-pull
worker and a real aiosmtpd server with scripted replies (``tests/fixtures/pipeline.py``). Each test
asserts every span of the mail's trace: name, kind, parent, and mailpipe's attributes exactly.

In this in-process pipeline both services share one Telemetry, so mailpipe's spans and the Pub/Sub
client's all carry the service name ``mailpipe-publisher``, and the client's helper spans are not
recorded, as in the services. ``test_file_exporter_across_processes`` runs the services as real
processes (as ``mailpipe up`` does) and reads the trees back from the JSON-lines trace file, where
each span names its own service.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from emulator import RunningEmulator, delete_topology
from emulator.pipeline import LocalPipeline
from emulator.smtp import LocalSmtpServer
from mailpipe.topology import Topology
from ops.cli import main as mailpipe_main
from ops.trace_view import SpanRecord, find_trace, read_spans
from tests.fixtures.emulators import FAST_DELIVERY_SETTINGS
from tests.fixtures.pipeline import Pipeline, pipeline_processes
from tests.fixtures.topology import unique_topology

BODY = "body-marker-7f3c9e: the text of the mail must never reach a span"
SMTP_USER = "mailer"
SMTP_PASSWORD = "pw-marker-51d0e8"  # the local server's test login
Tree = tuple[str, str, tuple[Any, ...]]


# --- building and comparing trees ----------------------------------------------------------------


def _sorted_children(parent_name: str, children: Iterable[Tree]) -> tuple[Tree, ...]:
    """Siblings in a stable order: SMTP steps in the order they ran, everything else by name.

    The Pub/Sub client's helper spans (flow control, batching, scheduler...) start within
    microseconds of each other in no fixed order, so they are compared by name; same-name
    siblings (one ``subscribe`` per delivery attempt) keep their start order.
    """
    items = list(children)
    if parent_name == "mail deliver":
        return tuple(items)
    return tuple(sorted(items, key=lambda t: t[0]))  # stable: same names keep start order


@dataclass(frozen=True)
class Flat:
    """What a tree needs of a span, from the SDK (in memory) or from the trace file."""

    span_id: str
    parent_id: str | None
    name: str
    kind: str
    start: int


def flat_sdk(spans: Iterable[ReadableSpan], trace_id: str) -> list[Flat]:
    return [
        Flat(
            format(s.context.span_id, "016x"),
            format(s.parent.span_id, "016x") if s.parent else None,
            s.name,
            s.kind.name,
            s.start_time or 0,
        )
        for s in spans
        if format(s.context.trace_id, "032x") == trace_id
    ]


def flat_file(spans: Iterable[SpanRecord]) -> list[Flat]:
    return [Flat(s.span_id, s.parent_span_id, s.name, s.kind, s.start) for s in spans]


def tree_of(spans: Iterable[Flat]) -> tuple[Tree, ...]:
    """Spans as nested ``(name, kind, children)``; roots are spans whose parent is not among
    them. Children are in start order, then :func:`_sorted_children` order."""
    ordered = sorted(spans, key=lambda s: s.start)
    ids = {s.span_id for s in ordered}
    kids: dict[str | None, list[Flat]] = {}
    for span in ordered:
        kids.setdefault(span.parent_id if span.parent_id in ids else None, []).append(span)

    def build(span: Flat) -> Tree:
        children = [build(child) for child in kids.get(span.span_id, [])]
        return (span.name, span.kind, _sorted_children(span.name, children))

    return _sorted_children("", [build(root) for root in kids.get(None, [])])


def actual_tree(spans: Sequence[ReadableSpan], trace_id: str) -> tuple[Tree, ...]:
    return tree_of(flat_sdk(spans, trace_id))


def node(name: str, kind: SpanKind, *children: Tree) -> Tree:
    return (name, kind.name, _sorted_children(name, children))


def smtp_steps(*names: str) -> list[Tree]:
    return [node(f"smtp {name}", SpanKind.CLIENT) for name in names]


def deliver(*steps: str) -> Tree:
    return node("mail deliver", SpanKind.INTERNAL, *smtp_steps(*steps))


def subscribe(subscription: str, handler: Tree) -> Tree:
    """The client library's streaming-pull spans around one delivery of one message."""
    return node(
        f"{subscription} subscribe",
        SpanKind.CONSUMER,
        node("subscriber concurrency control", SpanKind.INTERNAL),
        node("subscriber scheduler", SpanKind.INTERNAL),
        node(f"{subscription} process", SpanKind.INTERNAL),
        handler,
    )


def published(pipeline: Pipeline | Topology, *subscribes: Tree) -> tuple[Tree, ...]:
    """``POST /v1/messages`` → ``<topic> create`` (+ the library's helpers) → ``subscribes``."""
    topology = pipeline if isinstance(pipeline, Topology) else pipeline.topology
    topic = topology.mail_topic.name
    return (
        node(
            "POST /v1/messages",
            SpanKind.SERVER,
            node(
                f"{topic} create",
                SpanKind.PRODUCER,
                node("publisher flow control", SpanKind.INTERNAL),
                node("publisher batching", SpanKind.INTERNAL),
                *subscribes,
            ),
        ),
    )


# The Pub/Sub client's childless helper spans, spelled out here rather than taken from
# mailpipe.telemetry: if the services started recording them again, these tests must fail.
HELPER_SPANS = {
    "publisher flow control",
    "publisher batching",
    "subscriber concurrency control",
    "subscriber scheduler",
}


def exported(tree: Iterable[Tree]) -> tuple[Tree, ...]:
    """``tree`` as mailpipe's own exporter has it: without the client's helper spans, which the
    services never record."""
    return tuple(
        (name, kind, exported(children))
        for name, kind, children in tree
        if name not in HELPER_SPANS
    )


def count(tree: Iterable[Tree]) -> int:
    return sum(1 + count(children) for _, _, children in tree)


def wait_for_tree(pipeline: Pipeline, trace_id: str, expected: tuple[Tree, ...]) -> Any:
    """Poll until the trace has as many spans as expected (spans end asynchronously: the
    library ends ``subscribe`` after the ack/nack), then return the actual tree."""
    wanted = count(expected)
    deadline = time.monotonic() + 30
    while True:
        tree = actual_tree(pipeline.spans.get_finished_spans(), trace_id)
        if count(tree) >= wanted or time.monotonic() > deadline:
            return tree
        time.sleep(0.05)


def spans_named(pipeline: Pipeline, trace_id: str, name: str) -> list[ReadableSpan]:
    return sorted(
        (
            s
            for s in pipeline.spans.get_finished_spans()
            if s.name == name and format(s.context.trace_id, "032x") == trace_id
        ),
        key=lambda s: s.start_time or 0,
    )


def children_of(pipeline: Pipeline, span: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (
            s
            for s in pipeline.spans.get_finished_spans()
            if s.parent is not None and s.parent.span_id == span.context.span_id
        ),
        key=lambda s: s.start_time or 0,
    )


def parent_of(pipeline: Pipeline, span: ReadableSpan) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    [parent] = [
        s for s in pipeline.spans.get_finished_spans() if s.context.span_id == span.parent.span_id
    ]
    return parent


def span_texts(spans: Iterable[ReadableSpan]) -> list[str]:
    """Every attribute value, event attribute and status text of ``spans``, as strings."""
    texts: list[str] = []
    for span in spans:
        texts.extend(str(v) for v in (span.attributes or {}).values())
        for event in span.events:
            texts.extend(str(v) for v in (event.attributes or {}).values())
        texts.append(span.status.description or "")
    return texts


def assert_no_body_in_spans(pipeline: Pipeline) -> None:
    texts = span_texts(pipeline.spans.get_finished_spans())
    assert texts, "no span was exported"
    assert not [t for t in texts if "body-marker-7f3c9e" in t]


# --- expected attributes -------------------------------------------------------------------------


def deliver_attributes(
    accepted: dict[str, Any],
    *,
    attempt: int,
    outcome: str,
    code: int,
    enhanced: str,
    reused: bool,
) -> dict[str, Any]:
    return {
        "mailpipe.mail_id": accepted["mail_id"],
        "messaging.system": "gcp_pubsub",
        "messaging.message.id": accepted["message_id"],  # the 202's Pub/Sub message id
        "messaging.gcp_pubsub.message.delivery_attempt": attempt,
        "smtp.connection.reused": reused,
        "mailpipe.outcome": outcome,
        "smtp.reply.code": code,
        "smtp.reply.enhanced_status": enhanced,
    }


def step_attributes(
    pipeline: Pipeline, code: int, enhanced: str | None = None, **extra: Any
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "server.address": "127.0.0.1",
        "server.port": pipeline.smtp.port,
        "smtp.reply.code": code,
        **extra,
    }
    if enhanced is not None:
        attributes["smtp.reply.enhanced_status"] = enhanced
    return attributes


# --- the outcomes --------------------------------------------------------------------------------


def test_delivered_mail(pipeline: Pipeline) -> None:
    accepted = pipeline.send(text=BODY).json()
    mail_id, trace_id = accepted["mail_id"], accepted["trace_id"]
    pipeline.wait_for_record(mail_id, lambda r: r.status == "delivered")
    subscription = pipeline.topology.delivery_subscription.name

    expected = exported(
        published(
            pipeline,
            subscribe(subscription, deliver("connect", "ehlo", "mail from", "rcpt to", "data")),
        )
    )
    assert wait_for_tree(pipeline, trace_id, expected) == expected

    [request] = spans_named(pipeline, trace_id, "POST /v1/messages")
    assert request.parent is None
    assert request.attributes is not None
    assert request.attributes["mailpipe.mail_id"] == mail_id
    assert request.attributes["http.status_code"] == 202

    [delivery] = spans_named(pipeline, trace_id, "mail deliver")
    assert dict(delivery.attributes or {}) == deliver_attributes(
        accepted, attempt=1, outcome="delivered", code=250, enhanced="2.0.0", reused=False
    )
    assert delivery.status.status_code is StatusCode.UNSET
    # The pull callback has no current span: `mail deliver` is parented on the library's
    # subscribe span explicitly, which is itself a child of the publisher's create span.
    subscribe_span = parent_of(pipeline, delivery)
    assert subscribe_span.name == f"{subscription} subscribe"
    assert parent_of(pipeline, subscribe_span).name == f"{pipeline.topology.mail_topic.name} create"

    steps = children_of(pipeline, delivery)
    assert [dict(s.attributes or {}) for s in steps] == [
        step_attributes(pipeline, 220),
        step_attributes(pipeline, 250),
        step_attributes(pipeline, 250, "2.1.0"),
        step_attributes(pipeline, 250, "2.1.5", **{"smtp.recipient": "@example.org"}),
        step_attributes(pipeline, 250, "2.0.0"),
    ]
    assert {s.status.status_code for s in steps} == {StatusCode.UNSET}
    assert_no_body_in_spans(pipeline)


def test_deferred_then_delivered_mail(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 451, "4.3.0 try later", times=1)
    accepted = pipeline.send(text=BODY).json()
    mail_id, trace_id = accepted["mail_id"], accepted["trace_id"]
    pipeline.wait_for_record(mail_id, lambda r: r.status == "delivered")
    subscription = pipeline.topology.delivery_subscription.name

    # Both attempts are in the publisher's ONE trace. The nacked message comes back as a new
    # delivery of the same Pub/Sub message, still carrying googclient_traceparent = the create
    # span, so the library opens a second `subscribe` span under `create` and the second
    # `mail deliver` hangs below it: two sibling subscribe chains, not a link between traces.
    # The second attempt reuses the pooled connection (RSET kept it healthy): no connect/ehlo.
    expected = exported(
        published(
            pipeline,
            subscribe(subscription, deliver("connect", "ehlo", "mail from", "rcpt to", "rset")),
            subscribe(subscription, deliver("mail from", "rcpt to", "data")),
        )
    )
    assert wait_for_tree(pipeline, trace_id, expected) == expected

    first, second = spans_named(pipeline, trace_id, "mail deliver")
    assert dict(first.attributes or {}) == deliver_attributes(
        accepted, attempt=1, outcome="deferred", code=451, enhanced="4.3.0", reused=False
    )
    assert first.status.status_code is StatusCode.ERROR
    assert "451" in (first.status.description or "")
    assert dict(second.attributes or {}) == deliver_attributes(
        accepted, attempt=2, outcome="delivered", code=250, enhanced="2.0.0", reused=True
    )
    assert second.status.status_code is StatusCode.UNSET

    # The library's own spans tell the same story: the first delivery was nacked, the second acked.
    subscribes = spans_named(pipeline, trace_id, f"{subscription} subscribe")
    assert [parent_of(pipeline, d) for d in (first, second)] == subscribes
    assert [(s.attributes or {})["messaging.gcp_pubsub.result"] for s in subscribes] == [
        "nacked",
        "acked",
    ]

    [refused] = [s for s in children_of(pipeline, first) if s.name == "smtp rcpt to"]
    assert dict(refused.attributes or {}) == step_attributes(
        pipeline, 451, "4.3.0", **{"smtp.recipient": "@example.org"}
    )
    assert refused.status.status_code is StatusCode.ERROR
    [rset] = [s for s in children_of(pipeline, first) if s.name == "smtp rset"]
    assert dict(rset.attributes or {}) == step_attributes(pipeline, 250)
    [data] = [s for s in children_of(pipeline, second) if s.name == "smtp data"]
    assert dict(data.attributes or {}) == step_attributes(pipeline, 250, "2.0.0")
    assert_no_body_in_spans(pipeline)


def test_bounced_mail(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 550, "5.1.1 no such user")
    accepted = pipeline.send(text=BODY).json()
    mail_id, trace_id = accepted["mail_id"], accepted["trace_id"]
    pipeline.wait_for_record(mail_id, lambda r: r.status == "bounced")
    subscription = pipeline.topology.delivery_subscription.name

    expected = exported(
        published(
            pipeline,
            subscribe(subscription, deliver("connect", "ehlo", "mail from", "rcpt to", "rset")),
        )
    )
    assert wait_for_tree(pipeline, trace_id, expected) == expected

    [delivery] = spans_named(pipeline, trace_id, "mail deliver")
    assert dict(delivery.attributes or {}) == deliver_attributes(
        accepted, attempt=1, outcome="bounced", code=550, enhanced="5.1.1", reused=False
    )
    assert delivery.status.status_code is StatusCode.ERROR
    assert "550" in (delivery.status.description or "")
    [subscribe_span] = spans_named(pipeline, trace_id, f"{subscription} subscribe")
    assert (subscribe_span.attributes or {})["messaging.gcp_pubsub.result"] == "acked"
    [refused] = [s for s in children_of(pipeline, delivery) if s.name == "smtp rcpt to"]
    assert dict(refused.attributes or {}) == step_attributes(
        pipeline, 550, "5.1.1", **{"smtp.recipient": "@example.org"}
    )
    assert refused.status.status_code is StatusCode.ERROR
    assert_no_body_in_spans(pipeline)


@pytest.mark.slow
def test_dead_lettered_mail(pipeline: Pipeline) -> None:
    pipeline.smtp.fail("rcpt", 451, "4.3.0 try later")  # every time
    accepted = pipeline.send(text=BODY).json()
    mail_id, trace_id = accepted["mail_id"], accepted["trace_id"]
    pipeline.wait_for_record(mail_id, lambda r: r.status == "dead_lettered")
    topology = pipeline.topology
    delivery_sub = topology.delivery_subscription.name
    record_sub = topology.dead_letter_record_subscription.name

    # Five deferred attempts (the subscription's max_delivery_attempts), then Pub/Sub forwards
    # the message to the dead-letter topic. The copy keeps googclient_traceparent, so the
    # dead-letter consumer's subscribe span (and `mail dead-letter` under it) is again a child
    # of the publisher's create span: the whole story is one trace.
    first = deliver("connect", "ehlo", "mail from", "rcpt to", "rset")
    retry = deliver("mail from", "rcpt to", "rset")
    dead_letter = node("mail dead-letter", SpanKind.CONSUMER)
    expected = exported(
        published(
            pipeline,
            subscribe(delivery_sub, first),
            *[subscribe(delivery_sub, retry) for _ in range(4)],
            subscribe(record_sub, dead_letter),
        )
    )
    assert wait_for_tree(pipeline, trace_id, expected) == expected

    attempts = spans_named(pipeline, trace_id, "mail deliver")
    assert [dict(s.attributes or {}) for s in attempts] == [
        deliver_attributes(
            accepted,
            attempt=n,
            outcome="deferred",
            code=451,
            enhanced="4.3.0",
            reused=n > 1,
        )
        for n in range(1, 6)
    ]
    assert {s.status.status_code for s in attempts} == {StatusCode.ERROR}

    [dead] = spans_named(pipeline, trace_id, "mail dead-letter")
    attributes = dict(dead.attributes or {})
    dlq_message_id = attributes.pop("messaging.message.id")
    # The dead-letter copy is a new Pub/Sub message with its own id.
    assert dlq_message_id != accepted["message_id"]
    assert attributes == {
        "mailpipe.mail_id": mail_id,
        "messaging.system": "gcp_pubsub",
        "messaging.gcp_pubsub.message.delivery_attempt": 5,
        "mailpipe.outcome": "dead_lettered",
    }
    assert parent_of(pipeline, dead).name == f"{record_sub} subscribe"
    assert_no_body_in_spans(pipeline)


# --- the same trees through the file exporter, across real processes ----------------------------

PUBLISHER_SPANS = {"POST /v1/messages"}


@pytest.fixture
def process_topology(pubsub_emulator: RunningEmulator, pubsub_project: str) -> Iterator[Topology]:
    topology = unique_topology(**FAST_DELIVERY_SETTINGS)
    yield topology
    delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)


def wait_for_file_tree(path: Path, mail_id: str, expected: tuple[Tree, ...]) -> list[SpanRecord]:
    """Poll the trace file until the mail's trace has all expected spans (the services export
    every 200 ms); return its spans."""
    wanted = count(expected)
    deadline = time.monotonic() + 30
    while True:
        spans = find_trace(read_spans(path), mail_id)
        if len(spans) >= wanted or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def post(pipeline: LocalPipeline, to: str) -> dict[str, Any]:
    return pipeline.post_mail(
        {"from": "sender@example.com", "to": [to], "subject": "hi", "text": BODY}
    )


@pytest.mark.slow  # ~16 s: includes a dead-lettered mail's five attempts
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_file_exporter_across_processes(
    tmp_path: Path,
    process_topology: Topology,
    pubsub_project: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The four outcomes, one after another, through `python -m publisher` and `python -m
    subscriber pull` writing one JSON-lines trace file (as `mailpipe up` runs them).

    One mail at a time on one pooled, authenticated SMTP connection, so which attempt opens the
    connection (connect, ehlo, auth) is known: only the very first.
    """
    topology = process_topology
    delivery_sub = topology.delivery_subscription.name
    record_sub = topology.dead_letter_record_subscription.name
    smtp = LocalSmtpServer(auth={SMTP_USER: SMTP_PASSWORD})
    smtp.fail("rcpt", 451, "4.3.0 try later", times=1, address="deferred@example.org")
    smtp.fail("rcpt", 550, "5.1.1 no such user", address="bounced@example.org")
    smtp.fail("rcpt", 451, "4.3.0 try later", address="stuck@example.org")
    env = {
        "MAILPIPE_SMTP_TIMEOUT": "5",
        "MAILPIPE_SMTP_POOL_SIZE": "1",
        "MAILPIPE_SMTP_USERNAME": SMTP_USER,
        "MAILPIPE_SMTP_PASSWORD": SMTP_PASSWORD,
        "MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH": "1",  # loopback only
        # The mail path's trees only: the event publishes in them (an `<events topic> create`
        # under the request and each handler span) are checked in test_delivery_events.py.
        "MAILPIPE_EVENTS_TOPIC": "none",
    }
    with pipeline_processes(smtp, tmp_path, pubsub_project, topology, extra_env=env) as pipeline:
        # (recipient, final status, SMTP steps of each attempt, outcome of each handler span)
        plan: list[tuple[str, str, list[tuple[str, ...]], list[str]]] = [
            ("delivered@example.org", "delivered",
             [("connect", "ehlo", "auth", "mail from", "rcpt to", "data")], ["delivered"]),
            ("deferred@example.org", "delivered",
             [("mail from", "rcpt to", "rset"), ("mail from", "rcpt to", "data")],
             ["deferred", "delivered"]),
            ("bounced@example.org", "bounced", [("mail from", "rcpt to", "rset")], ["bounced"]),
            ("stuck@example.org", "dead_lettered", [("mail from", "rcpt to", "rset")] * 5,
             ["deferred"] * 5 + ["dead_lettered"]),
        ]  # fmt: skip
        cases: list[tuple[dict[str, Any], tuple[Tree, ...], list[str]]] = []
        for to, status, attempts, outcomes in plan:
            accepted = post(pipeline, to)
            pipeline.wait_for_status(accepted["mail_id"], {status}, timeout=60)
            subscribes = [subscribe(delivery_sub, deliver(*steps)) for steps in attempts]
            if status == "dead_lettered":
                dead_letter = node("mail dead-letter", SpanKind.CONSUMER)
                subscribes.append(subscribe(record_sub, dead_letter))
            # No helper span, and none missing from its place: any orphan would be a root.
            cases.append((accepted, exported(published(topology, *subscribes)), outcomes))

        publisher_side = PUBLISHER_SPANS | {f"{topology.mail_topic.name} create"}
        for accepted, expected, outcomes in cases:
            spans = wait_for_file_tree(pipeline.trace_file, accepted["mail_id"], expected)
            assert tree_of(flat_file(spans)) == expected, accepted
            assert {s.trace_id for s in spans} == {accepted["trace_id"]}
            # Two processes, one trace: each span names the service that made it.
            assert {s.service for s in spans if s.name in publisher_side} == {"mailpipe-publisher"}
            assert {s.service for s in spans if s.name not in publisher_side} == {
                "mailpipe-subscriber"
            }
            handlers = [s for s in spans if s.name in ("mail deliver", "mail dead-letter")]
            assert [s.attributes["mailpipe.outcome"] for s in handlers] == outcomes
            assert {s.attributes["mailpipe.mail_id"] for s in handlers} == {accepted["mail_id"]}
            for span in handlers:
                if span.name == "mail deliver":
                    assert span.attributes["messaging.message.id"] == accepted["message_id"]
                    assert isinstance(span.attributes["smtp.reply.code"], int)
                    assert span.status_code == (
                        "UNSET" if span.attributes["mailpipe.outcome"] == "delivered" else "ERROR"
                    )

        # Nothing in the file carries the body or the SMTP password (the AUTH step is traced).
        text = pipeline.trace_file.read_text(encoding="utf-8")
        assert '"smtp auth"' in text
        assert "body-marker-7f3c9e" not in text
        assert SMTP_PASSWORD not in text

        # `mailpipe trace MAIL_ID --file ...` draws the deferred-then-delivered mail's waterfall.
        deferred = cases[1][0]
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()
        assert (
            mailpipe_main(["trace", deferred["mail_id"], "--file", str(pipeline.trace_file)]) == 0
        )
        out = capsys.readouterr().out
        assert f"trace {deferred['trace_id']} · mail {deferred['mail_id']}" in out
        assert "mailpipe-publisher" in out and "mailpipe-subscriber" in out
        assert "smtp 451 4.3.0; deferred; attempt 1" in out
        assert "smtp 250 2.0.0; delivered; attempt 2; reused connection" in out
        assert out.count("mail deliver") == 2


def test_health_probes_make_no_trace_and_api_calls_do(pipeline: Pipeline) -> None:
    # Cloud Run's startup and liveness probes call GET /healthz every few seconds per instance.
    before = len(pipeline.spans.get_finished_spans())
    for _ in range(3):
        assert pipeline.http.get("/healthz").status_code == 200
    assert pipeline.http.get("/healthz?probe=1").status_code == 200
    assert pipeline.http.get("/v1/stats").status_code == 200
    new = [s.name for s in pipeline.spans.get_finished_spans()[before:]]
    assert not [name for name in new if "healthz" in name], new
    assert "GET /v1/stats" in new, new
