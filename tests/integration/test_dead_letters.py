"""Dead letters end to end: a mail that keeps failing is dead-lettered, listed, and replayed once.

Real parts only: Google's Pub/Sub emulator over gRPC (the test topology dead-letters after 5
attempts with 1-2 s backoff), a real aiosmtpd server, the publisher over HTTP, the streaming-pull
worker and the dead-letter consumer (the ``pipeline`` fixture), and the CLI run in-process.

The slow test lets Pub/Sub itself dead-letter the mail. The fast ones put a copy on the
dead-letter topic directly (what Pub/Sub's forwarding does) so each replay rule is checked in
seconds. Where a test asserts the replay's spans, ``dlq replay`` gets the pipeline's tracer
injected (``ReplayServices``): the in-memory exporter only sees spans of providers that feed it.
The environment-based wiring of the CLI is exercised by the calls through ``main()``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.cloud.pubsub_v1.types import PublisherOptions
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from emulator import RunningEmulator, publisher_client, subscriber_client
from emulator.process import free_port
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import Attempt, MailStatus, open_record
from mailpipe.topology import Topology
from ops.cli import EXIT_FAILED, EXIT_OK, build_parser, main
from ops.cli.dlq import ReplayServices
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.main import oldest_undelivered_age
from publisher.metrics import PublisherMetrics
from publisher.pubsub import PubSubMailPublisher
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import Pipeline, pipeline_env
from tests.fixtures.telemetry import metric_points

CliResult = tuple[int, dict[str, Any]]


@pytest.fixture
def cli_env(
    pipeline: Pipeline,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Pipeline:
    """The environment an operator's shell would have for this pipeline (record via --record)."""
    env = pipeline_env(
        pubsub_emulator, pubsub_project, pipeline.topology, tmp_path / "unused.sqlite3", 25
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MAILPIPE_RECORD")  # the tests pass --record, as after `mailpipe up`
    monkeypatch.setenv("MAILPIPE_TRACES", "none")
    return pipeline


def record_path(pipeline: Pipeline) -> str:
    return pipeline.publisher_config.record.removeprefix("sqlite:///")


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> CliResult:
    """``mailpipe ARGV --json`` in-process, configured from the environment."""
    capsys.readouterr()
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def replay_services(pipeline: Pipeline, pubsub_emulator: RunningEmulator) -> Iterator[Any]:
    """``dlq replay`` with the pipeline's record and tracer, real emulator clients."""
    publisher = publisher_client(
        pubsub_emulator.host,
        publisher_options=PublisherOptions(enable_open_telemetry_tracing=True),
    )
    subscriber = subscriber_client(pubsub_emulator.host)
    yield ReplayServices(
        record=pipeline.record,
        pubsub=pipeline.publisher_config.pubsub,
        subscriber=subscriber,
        publisher=publisher,
        tracer=pipeline.telemetry.tracer("mailpipe.cli.dlq"),
        return_immediately=True,
    )
    publisher.stop()
    subscriber.close()


@pytest.fixture
def replay(
    replay_services: ReplayServices, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """``replay("--id", X)``: ``mailpipe dlq replay ... --json`` with the injected services;
    with ``human=True`` the report is the printed text (``{"text": ...}``)."""

    def run(*argv: str, human: bool = False) -> CliResult:
        args = build_parser().parse_args(["dlq", "replay", *argv, *([] if human else ["--json"])])
        capsys.readouterr()
        code = args.handler(args, services=replay_services)
        out = capsys.readouterr().out
        return code, {"text": out} if human else json.loads(out)

    return run


def outcome_of(report: dict[str, Any], mail_id: str) -> dict[str, Any]:
    [outcome] = [o for o in report["outcomes"] if o["mail_id"] == mail_id]
    return outcome


def spans_named(pipeline: Pipeline, name: str, trace_id: str | None = None) -> list[Any]:
    return [
        s
        for s in pipeline.spans.get_finished_spans()
        if s.name == name and (trace_id is None or format(s.context.trace_id, "032x") == trace_id)
    ]


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.slow
def test_a_dead_lettered_mail_is_listed_and_replayed_once_in_a_linked_trace(
    cli_env: Pipeline,
    replay: Callable[..., CliResult],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pipeline = cli_env
    pipeline.smtp.fail("rcpt", 451, "4.3.0 Mailbox temporarily unavailable")  # until cleared
    accepted = pipeline.send(to=["ada@example.org", "bob@example.net"]).json()
    mail_id, first_trace = accepted["mail_id"], accepted["trace_id"]

    # Pub/Sub gives up after max_delivery_attempts (5) and forwards it to the dead-letter topic.
    record = pipeline.wait_for_record(
        mail_id, lambda r: r.status is MailStatus.DEAD_LETTERED, timeout=90
    )
    assert len(record.attempts) == 5

    status = httpx.get(f"{pipeline.url}/v1/messages/{mail_id}", timeout=10).json()
    assert status["status"] == "dead_lettered"
    assert [a["reply_code"] for a in status["attempts"]] == [451] * 5
    listed = httpx.get(
        f"{pipeline.url}/v1/messages", params={"status": "dead_lettered"}, timeout=10
    ).json()
    assert [item["mail_id"] for item in listed["items"]] == [mail_id]

    code, dead = run_main(capsys, "dlq", "list", "--record", record_path(pipeline))
    assert code == EXIT_OK
    [entry] = dead["items"]
    assert entry["mail_id"] == mail_id
    assert entry["recipient_domains"] == ["example.net", "example.org"]
    assert entry["attempts"] == 5
    assert entry["last_reply"].startswith("451 4.3.0 at rcpt to")
    assert entry["age_seconds"] > 0

    # The relay recovers. A dry run (env-configured, real clients) changes nothing.
    pipeline.smtp.clear_faults()
    code, dry = run_main(
        capsys, "dlq", "replay", "--id", mail_id, "--dry-run", "--record", record_path(pipeline)
    )
    assert code == EXIT_OK
    assert outcome_of(dry, mail_id)["status"] == "would_replay"
    assert pipeline.record.get(mail_id).status is MailStatus.DEAD_LETTERED  # type: ignore[union-attr]
    assert pipeline.smtp.messages == []

    code, report = replay("--id", mail_id)

    assert code == EXIT_OK, report
    replayed = outcome_of(report, mail_id)
    assert replayed["status"] == "replayed"
    new_trace = replayed["trace_id"]
    assert new_trace and new_trace != first_trace
    [received] = pipeline.smtp.wait_for(1, timeout=30)
    record = pipeline.wait_for_record(mail_id, lambda r: r.status.final)
    assert record.status is MailStatus.DELIVERED
    assert record.replays == (new_trace,)
    assert [a.outcome for a in record.attempts] == ["deferred"] * 5 + ["delivered"]
    assert received.message["Message-ID"] == f"<{mail_id}@test.mailpipe.local>"
    assert received.message["traceparent"].split("-")[1] == new_trace

    # A new trace: `mail replay` (a root) links to the first trace; the delivery continues in it.
    [replay_span] = spans_named(pipeline, "mail replay", new_trace)
    assert replay_span.parent is None
    assert [format(link.context.trace_id, "032x") for link in replay_span.links] == [first_trace]
    assert replay_span.attributes["mailpipe.mail_id"] == mail_id
    topic = pipeline.topology.mail_topic.name
    in_new_trace = pipeline.wait_for_spans(new_trace, {"mail deliver", f"{topic} create"})
    [create] = [s for s in in_new_trace if s.name == f"{topic} create"]
    assert create.kind is SpanKind.PRODUCER
    assert create.parent.span_id == replay_span.context.span_id
    [deliver] = [s for s in in_new_trace if s.name == "mail deliver"]
    assert deliver.attributes["mailpipe.outcome"] == "delivered"

    final = httpx.get(f"{pipeline.url}/v1/messages/{mail_id}", timeout=10).json()
    assert (final["status"], final["replays"]) == ("delivered", [new_trace])

    # Replaying it again sends nothing: its copy was acked and the record says delivered.
    code, again = replay("--id", mail_id)
    assert code == EXIT_OK
    assert outcome_of(again, mail_id)["status"] == "already_final"
    assert outcome_of(again, mail_id)["record_status"] == "delivered"
    code, dead = run_main(capsys, "dlq", "list", "--record", record_path(pipeline))
    assert dead["items"] == []
    assert len(pipeline.smtp.messages) == 1


# --- the replay rules, with copies put on the dead-letter topic directly -------------------------


def _new_mail(to: str = "ada@example.org") -> QueuedMail:
    return QueuedMail.accept(
        MailRequest.model_validate({"from": "a@example.com", "to": [to], "text": "again"})
    )


@pytest.fixture
def dead_letter(
    pipeline: Pipeline, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> Iterator[Callable[..., str]]:
    """``dead_letter(mail, recorded=True)``: the state Pub/Sub's forwarding leaves behind.

    The mail's record is made dead-lettered (as after 5 failed attempts) and a copy with the
    original attributes, a ``googclient_traceparent`` of an "original" span and Pub/Sub's
    dead-letter attributes goes to the dead-letter topic. Returns the original trace id.
    """
    client = publisher_client(pubsub_emulator.host)
    topic = client.topic_path(pubsub_project, pipeline.topology.dead_letter_topic.name)
    original = TracerProvider().get_tracer("original-publisher")

    def put(mail: QueuedMail, *, recorded: bool = True) -> str:
        with original.start_as_current_span("original create") as span:
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            trace_id = format(span.get_span_context().trace_id, "032x")
        if recorded:
            record = pipeline.record
            record.reserve(
                mail_id=mail.mail_id,
                accepted_at=mail.accepted_at,
                recipient_domains=mail.request.recipient_domains,
                idempotency_key=None,
            )
            record.mark_queued(mail.mail_id, message_id="1", trace_id=trace_id)
            record.mark_dead_lettered(mail.mail_id, last_error="451 4.3.0 at rcpt to: busy")
        data, attributes = mail.to_pubsub()
        client.publish(
            topic,
            data,
            **attributes,
            googclient_traceparent=carrier["traceparent"],
            CloudPubSubDeadLetterSourceDeliveryCount="5",
        ).result(timeout=10)
        return trace_id

    yield put
    client.stop()


def copies_on_dead_letter_subscription(pipeline: Pipeline, pubsub_emulator: RunningEmulator) -> Any:
    """The mail ids of the copies still on the ``dead_letter`` subscription (released again)."""
    client = subscriber_client(pubsub_emulator.host)
    path = pipeline.publisher_config.pubsub.dead_letter_subscription_path
    response = client.pull(
        request={"subscription": path, "max_messages": 100, "return_immediately": True}
    )
    ack_ids = [m.ack_id for m in response.received_messages]
    if ack_ids:
        client.modify_ack_deadline(
            request={"subscription": path, "ack_ids": ack_ids, "ack_deadline_seconds": 0}
        )
    client.close()
    return sorted(m.message.attributes["mail_id"] for m in response.received_messages)


def test_replay_of_a_delivered_mail_sends_nothing_and_removes_its_copy(
    pipeline: Pipeline,
    dead_letter: Callable[..., str],
    replay: Callable[..., CliResult],
    pubsub_emulator: RunningEmulator,
) -> None:
    accepted = pipeline.send().json()
    mail_id = accepted["mail_id"]
    pipeline.wait_for_record(mail_id, lambda r: r.status is MailStatus.DELIVERED)
    pipeline.smtp.wait_for(1)
    # A copy on the dead-letter topic although the record says delivered (a late redelivery).
    mail = _new_mail().model_copy(update={"mail_id": mail_id})
    dead_letter(mail, recorded=False)

    code, report = replay("--id", mail_id)

    assert code == EXIT_OK
    outcome = outcome_of(report, mail_id)
    assert (outcome["status"], outcome["record_status"]) == ("already_final", "delivered")
    assert len(pipeline.smtp.messages) == 1
    assert pipeline.record.get(mail_id).replays == ()  # type: ignore[union-attr]
    assert spans_named(pipeline, "mail replay") == []
    assert copies_on_dead_letter_subscription(pipeline, pubsub_emulator) == []  # acked


def test_dry_run_changes_nothing_and_replay_selects_by_mail_id(
    pipeline: Pipeline,
    dead_letter: Callable[..., str],
    replay: Callable[..., CliResult],
    pubsub_emulator: RunningEmulator,
) -> None:
    first, second = _new_mail("ada@example.org"), _new_mail("bob@example.net")
    first_trace = dead_letter(first)
    dead_letter(second)

    code, dry = replay("--all", "--dry-run")

    assert code == EXIT_OK
    assert dry["dry_run"] is True
    assert {o["mail_id"]: o["status"] for o in dry["outcomes"]} == {
        first.mail_id: "would_replay",
        second.mail_id: "would_replay",
    }
    assert pipeline.record.get(first.mail_id).status is MailStatus.DEAD_LETTERED  # type: ignore[union-attr]
    assert spans_named(pipeline, "mail replay") == []
    assert copies_on_dead_letter_subscription(pipeline, pubsub_emulator) == sorted(
        [first.mail_id, second.mail_id]
    )
    code, printed = replay("--id", second.mail_id, "--dry-run", human=True)
    assert code == EXIT_OK
    assert "would replay" in printed["text"] and "without --dry-run" in printed["text"]

    code, report = replay("--id", first.mail_id)

    assert code == EXIT_OK, report
    assert [o["mail_id"] for o in report["outcomes"]] == [first.mail_id]
    [received] = pipeline.smtp.wait_for(1)
    assert received.recipients == ("ada@example.org",)
    record = pipeline.wait_for_record(first.mail_id, lambda r: r.status.final)
    assert record.status is MailStatus.DELIVERED
    [replay_span] = spans_named(pipeline, "mail replay")
    assert [format(link.context.trace_id, "032x") for link in replay_span.links] == [first_trace]
    # The other mail's copy was released, untouched.
    assert pipeline.record.get(second.mail_id).status is MailStatus.DEAD_LETTERED  # type: ignore[union-attr]
    assert copies_on_dead_letter_subscription(pipeline, pubsub_emulator) == [second.mail_id]
    assert len(pipeline.smtp.messages) == 1


def test_a_copy_without_a_record_is_refused_and_left_in_place(
    pipeline: Pipeline,
    dead_letter: Callable[..., str],
    replay: Callable[..., CliResult],
    pubsub_emulator: RunningEmulator,
) -> None:
    """No record means replay cannot know whether it was delivered: it must not send it."""
    orphan = _new_mail()
    dead_letter(orphan, recorded=False)
    missing = "0190aaaa-0000-7000-8000-000000000000"

    code, report = replay("--id", orphan.mail_id, missing)

    assert code == EXIT_FAILED
    assert outcome_of(report, orphan.mail_id)["status"] == "no_record"
    code, printed = replay("--id", orphan.mail_id, human=True)
    assert code == EXIT_FAILED
    assert "no record" in printed["text"]
    assert outcome_of(report, missing)["status"] == "not_found"
    assert copies_on_dead_letter_subscription(pipeline, pubsub_emulator) == [orphan.mail_id]
    assert pipeline.smtp.messages == []


# --- lag visibility ------------------------------------------------------------------------------


@pytest.fixture
def publisher_only(
    mail_topology: Topology,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    tmp_path: Path,
) -> Iterator[tuple[str, Any]]:
    """The publisher over HTTP with nobody subscribed: accepted mails stay queued."""
    env = pipeline_env(pubsub_emulator, pubsub_project, mail_topology, tmp_path / "r.sqlite3", 25)
    config = PublisherConfig.from_env(env, mail_topology)
    record = open_record(config.record)
    publisher = PubSubMailPublisher(config.pubsub, timeout=10)
    app = create_app(config, publisher=publisher, record=record)
    with serve_app(app) as url:
        yield url, record
    publisher.close()
    record.close()


def test_an_undelivered_mail_shows_a_growing_lag(
    publisher_only: tuple[str, Any], metric_meter: Any, metric_reader: Any
) -> None:
    url, record = publisher_only
    assert httpx.get(f"{url}/v1/stats").json()["oldest_undelivered_age_seconds"] is None

    accepted = httpx.post(
        f"{url}/v1/messages",
        json={"from": "a@example.com", "to": ["b@example.org"], "text": "queued"},
    ).json()

    stats = httpx.get(f"{url}/v1/stats").json()
    assert stats["oldest_undelivered_mail_id"] == accepted["mail_id"]
    assert stats["oldest_undelivered_age_seconds"] >= 0
    # The gauge, as the publisher registers it, read at two moments of an injected clock.
    accepted_at = record.get(accepted["mail_id"]).accepted_at
    now = [accepted_at + dt.timedelta(minutes=11)]
    metrics = PublisherMetrics(metric_meter)
    metrics.set_oldest_undelivered_source(oldest_undelivered_age(record, clock=lambda: now[0]))
    [point] = metric_points(metric_reader)["mailpipe.oldest_undelivered_age"]
    assert point.value == pytest.approx(660)  # over the 10-minute alert threshold
    now[0] += dt.timedelta(minutes=5)
    [point] = metric_points(metric_reader)["mailpipe.oldest_undelivered_age"]
    assert point.value == pytest.approx(960)

    # Once delivered it no longer counts: the gauge reports nothing, the API says so.
    claim = record.claim(accepted["mail_id"], message_id="1", trace_id=None, lease_seconds=10)
    record.finish(
        accepted["mail_id"],
        Attempt(number=claim.attempt_number, started_at=now[0], outcome="delivered"),
    )
    assert metric_points(metric_reader).get("mailpipe.oldest_undelivered_age", []) == []
    assert httpx.get(f"{url}/v1/stats").json()["oldest_undelivered_mail_id"] is None


def test_the_publisher_process_exports_the_lag_gauge(
    mail_topology: Topology, pubsub_emulator: RunningEmulator, pubsub_project: str, tmp_path: Path
) -> None:
    """``python -m publisher`` as deployed: the gauge is on its Prometheus endpoint."""
    record_file = tmp_path / "record.sqlite3"
    http_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **pipeline_env(pubsub_emulator, pubsub_project, mail_topology, record_file, 25),
        "PORT": str(http_port),
        "MAILPIPE_METRICS_PORT": str(metrics_port),
        "MAILPIPE_TRACES": "none",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "publisher"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "publisher.log").open("wb"),
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{http_port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None  # stop waiting if it died

        assert wait_until(up, timeout=60) and process.poll() is None, (
            tmp_path / "publisher.log"
        ).read_text()
        accepted = httpx.post(
            f"{url}/v1/messages",
            json={"from": "a@example.com", "to": ["b@example.org"], "text": "queued"},
            timeout=30,
        )
        assert accepted.status_code == 202  # nobody consumes the topology: it stays queued

        def gauge() -> float | None:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name.startswith("mailpipe_oldest_undelivered_age"):
                        return float(sample.value)
            return None

        age = gauge()  # Prometheus collects on each scrape: the queued mail is already there
        assert age is not None and age > 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
