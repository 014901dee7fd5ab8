"""The canary against a real Dovecot, through the whole local stack.

Real parts only: the publisher over HTTP, Google's Pub/Sub emulator, the streaming-pull worker,
aiosmtpd writing every accepted mail into a Maildir, and Dovecot (``tests/fixtures/imap.py``)
serving that Maildir over IMAP on loopback. Spans go to the in-memory exporter, metrics to an
in-memory reader.
"""

from __future__ import annotations

import json
import mailbox
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from canary.probe import (
    Canary,
    CanaryConfig,
    CanaryResult,
    Outcome,
    build_canary,
)
from emulator.smtp import LocalSmtpServer
from mailpipe.config import ConfigError
from mailpipe.telemetry import setup_telemetry
from ops.cli import main as mailpipe_main
from tests.fixtures.imap import Dovecot, free_port
from tests.fixtures.pipeline import Pipeline
from tests.fixtures.telemetry import metric_points

MAILBOX_ADDRESS = "canary@example.org"
POLL_STEPS = ["connect", "starttls", "login", "select", "noop", "search", "fetch", "logout"]
READ_STEPS = ["connect", "starttls", "login", "select", "search", "fetch", "store", "expunge"]
READ_STEPS += ["logout"]


@pytest.fixture
def smtp_server(dovecot: Dovecot) -> Iterator[LocalSmtpServer]:
    """The pipeline's relay, writing what it accepts into the Maildir Dovecot serves.

    Overrides ``smtp_server`` from tests/fixtures/smtp.py, so ``pipeline`` delivers into it.
    """
    with LocalSmtpServer(maildir=dovecot.maildir) as server:
        yield server


def canary_env(dovecot: Dovecot, publisher_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "MAILPIPE_URL": publisher_url,
        **dovecot.canary_env(),
        "MAILPIPE_CANARY_TO": MAILBOX_ADDRESS,
        "MAILPIPE_CANARY_DEADLINE": "30",
        "MAILPIPE_CANARY_POLL_INTERVAL": "0.1",
        "MAILPIPE_CANARY_IMAP_TIMEOUT": "10",
        "MAILPIPE_MESSAGE_ID_DOMAIN": "test.mailpipe.local",  # as tests/fixtures/pipeline.py
    }
    env.update(overrides)
    return env


MakeCanary = Callable[..., Canary]


@pytest.fixture
def make_canary(
    dovecot: Dovecot, spans: InMemorySpanExporter, metric_reader: InMemoryMetricReader
) -> Iterator[MakeCanary]:
    """``make_canary(publisher_url, **env_overrides)``: a canary reporting to the test exporters."""
    telemetries: list[Any] = []

    def make(publisher_url: str, **overrides: str) -> Canary:
        config = CanaryConfig.from_env(canary_env(dovecot, publisher_url, **overrides))
        telemetry = setup_telemetry(
            config.telemetry,
            span_exporter=spans,
            metric_readers=[metric_reader] if not telemetries else [],
            set_global=False,
        )
        telemetries.append(telemetry)
        return build_canary(config, telemetry)

    yield make
    for telemetry in telemetries:
        telemetry.shutdown()


def probe_in_maildir(dovecot: Dovecot, mail_id: str) -> bool:
    wanted = f"<{mail_id}@test.mailpipe.local>"
    return any(
        str(message["Message-ID"]).strip() == wanted
        for message in mailbox.Maildir(dovecot.maildir, create=False)
    )


def spans_named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def steps_of(spans: list[ReadableSpan], parent: ReadableSpan) -> list[str]:
    """Names of the ``imap *`` spans under ``parent`` (directly or below a child), in order."""
    ids = {parent.context.span_id}
    for span in spans:  # one level of intermediate spans (canary wait)
        if (
            span.parent is not None
            and span.parent.span_id in ids
            and span.name.startswith("canary")
        ):
            ids.add(span.context.span_id)
    imap = [s for s in spans if s.name.startswith("imap ") and s.parent and s.parent.span_id in ids]
    imap.sort(key=lambda s: s.start_time or 0)
    # The poll repeats noop + search until the probe shows up: keep each step's first occurrence.
    return list(dict.fromkeys(s.name.removeprefix("imap ") for s in imap))


def assert_no_secret(result: CanaryResult, spans: InMemorySpanExporter, password: str) -> None:
    assert password not in json.dumps(result.to_json())
    for span in spans.get_finished_spans():
        assert password not in json.dumps(dict(span.attributes or {}))
        assert password not in (span.status.description or "")


# --- the probe through the whole stack -----------------------------------------------------------


def test_probe_reaches_the_inbox_and_joins_the_mail_trace(
    pipeline: Pipeline,
    dovecot: Dovecot,
    make_canary: MakeCanary,
    spans: InMemorySpanExporter,
    metric_reader: InMemoryMetricReader,
) -> None:
    result = make_canary(pipeline.url).run()

    assert result.outcome == Outcome.OK, result.message
    assert result.exit_code == 0
    assert result.mail_id is not None and result.trace_id is not None
    assert result.record_status == "delivered"
    assert result.accepted_after is not None and result.visible_after is not None
    assert result.delivered_after is not None
    assert result.accepted_after <= result.visible_after
    # The relay got it once, and the canary deleted it from the mailbox afterwards.
    received = pipeline.smtp.messages
    assert [m.recipients for m in received] == [(MAILBOX_ADDRESS,)]
    assert not probe_in_maildir(dovecot, result.mail_id)

    # One trace: HTTP request → Pub/Sub → mail deliver → SMTP steps → canary read → IMAP steps.
    in_trace = pipeline.wait_for_spans(
        result.trace_id,
        {"POST /v1/messages", "mail deliver", "smtp data", "canary read", "imap expunge"},
    )
    names = {s.name for s in in_trace}
    assert {"POST /v1/messages", "mail deliver", "smtp connect", "smtp data"} <= names
    deliver = next(s for s in in_trace if s.name == "mail deliver")
    read = next(s for s in in_trace if s.name == "canary read")
    assert read.parent is not None and read.parent.span_id == deliver.context.span_id
    assert steps_of(in_trace, read) == READ_STEPS
    read_spans = [s for s in in_trace if s.name.startswith("imap ")]
    assert all(s.kind == SpanKind.CLIENT for s in read_spans)
    assert all(s.attributes["mailpipe.canary.phase"] == "read" for s in read_spans)
    assert all(s.attributes["server.port"] == dovecot.port for s in read_spans)

    # The canary's own trace: the poll session, linked to the mail's deliver span.
    probe = spans_named(spans, "canary probe")
    assert len(probe) == 1
    assert format(probe[0].context.trace_id, "032x") == result.canary_trace_id
    assert deliver.context.span_id in {link.context.span_id for link in probe[0].links}
    canary_trace = [
        s for s in spans.get_finished_spans() if s.context.trace_id == probe[0].context.trace_id
    ]
    assert steps_of(canary_trace, probe[0]) == POLL_STEPS
    assert {"canary send", "canary wait"} <= {s.name for s in canary_trace}

    # Metrics: a histogram sample for every step of both sessions, the time to inbox, the run.
    points = metric_points(metric_reader)
    step_points = {
        (p.attributes["mailpipe.canary.phase"], p.attributes["imap.step"]): p.count
        for p in points["mailpipe.canary.imap.step.duration"]
    }
    for step in POLL_STEPS:
        assert step_points[("poll", step)] >= 1, step
    for step in READ_STEPS:
        assert step_points[("read", step)] == 1, step
    (time_to_inbox,) = points["mailpipe.canary.time_to_inbox"]
    assert time_to_inbox.count == 1
    assert time_to_inbox.sum == pytest.approx(result.visible_after)
    # Recorded in the mail's trace context: the exemplar points at the mail's trace.
    assert {format(e.trace_id, "032x") for e in time_to_inbox.exemplars} == {result.trace_id}
    runs = {
        p.attributes["mailpipe.canary.outcome"]: p.value for p in points["mailpipe.canary.runs"]
    }
    assert runs == {"ok": 1}
    assert_no_secret(result, spans, dovecot.password)


@pytest.mark.parametrize("tls", ["imaps", "none"])
def test_probe_over_imaps_and_plain_imap(
    tls: str, pipeline: Pipeline, dovecot: Dovecot, make_canary: MakeCanary, spans: Any
) -> None:
    port = dovecot.imaps_port if tls == "imaps" else dovecot.port
    canary = make_canary(
        pipeline.url, MAILPIPE_CANARY_IMAP_TLS=tls, MAILPIPE_CANARY_IMAP_PORT=str(port)
    )
    result = canary.run()

    assert result.outcome == Outcome.OK, result.message
    assert "starttls" not in {s.step for s in result.steps}
    assert result.mail_id is not None and not probe_in_maildir(dovecot, result.mail_id)


@pytest.fixture
def cli_env(pipeline: Pipeline, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment `mailpipe canary` reads, pointing at the pipeline and Dovecot."""
    for name, value in canary_env(dovecot, pipeline.url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MAILPIPE_TRACES", "none")


def test_cli_prints_one_json_line_per_run(
    cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:

    code = mailpipe_main(["canary", "--json", "--every", "0.1s", "--runs", "2"])

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [line["outcome"] for line in lines] == ["ok", "ok"]
    assert len({line["mail_id"] for line in lines}) == 2
    assert all(line["record_status"] == "delivered" for line in lines)
    assert {s["step"] for s in lines[0]["imap_steps"] if s["phase"] == "read"} == set(READ_STEPS)


def test_cli_human_output_and_exit_code(
    cli_env: None,
    dovecot: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:

    assert mailpipe_main(["canary"]) == 0
    ok = capsys.readouterr().out
    assert ok.startswith("ok probe ")
    assert "accepted" in ok and "SMTP 250" in ok and "in inbox" in ok

    monkeypatch.setenv("MAILPIPE_CANARY_IMAP_PASSWORD", "wrong")
    assert mailpipe_main(["canary", "--imap-port", str(dovecot.port)]) == 13
    assert "login_refused" in capsys.readouterr().out


# --- bad conditions: clear outcomes, no hang -----------------------------------------------------


def test_wrong_password_is_login_refused(
    pipeline: Pipeline, dovecot: Dovecot, make_canary: MakeCanary, spans: InMemorySpanExporter
) -> None:
    wrong = "not-the-password-4b1d"
    result = make_canary(pipeline.url, MAILPIPE_CANARY_IMAP_PASSWORD=wrong).run()

    assert result.outcome == Outcome.LOGIN_REFUSED
    assert result.exit_code == 13
    assert result.mail_id is None  # checked before sending: no stray probe
    assert pipeline.smtp.messages == []
    (login,) = spans_named(spans, "imap login")
    assert login.status.status_code == StatusCode.ERROR
    assert_no_secret(result, spans, wrong)


def test_server_down_is_imap_unavailable(
    dovecot: Dovecot, make_canary: MakeCanary, spans: InMemorySpanExporter
) -> None:
    nobody_listens = str(free_port())
    result = make_canary("http://127.0.0.1:9", MAILPIPE_CANARY_IMAP_PORT=nobody_listens).run()

    assert result.outcome == Outcome.IMAP_UNAVAILABLE
    assert result.exit_code == 11
    assert f"127.0.0.1:{nobody_listens}" in result.message
    (connect,) = spans_named(spans, "imap connect")
    assert connect.status.status_code == StatusCode.ERROR


def test_untrusted_certificate_is_tls_failed(dovecot: Dovecot, make_canary: MakeCanary) -> None:
    # Without the test CA, Dovecot's certificate does not verify against the system's CAs.
    canary = make_canary(
        "http://127.0.0.1:9",
        MAILPIPE_CANARY_IMAP_TLS="imaps",
        MAILPIPE_CANARY_IMAP_PORT=str(dovecot.imaps_port),
        MAILPIPE_CANARY_IMAP_CA_FILE="",
    )
    result = canary.run()

    assert result.outcome == Outcome.TLS_FAILED
    assert result.exit_code == 12
    assert "CERTIFICATE_VERIFY_FAILED" in result.message


def test_missing_mailbox(dovecot: Dovecot, make_canary: MakeCanary) -> None:
    result = make_canary("http://127.0.0.1:9", MAILPIPE_CANARY_MAILBOX="Nope").run()

    assert result.outcome == Outcome.MAILBOX_MISSING
    assert result.exit_code == 14
    assert "'Nope'" in result.message


def test_publisher_unreachable_is_publish_failed(dovecot: Dovecot, make_canary: MakeCanary) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = make_canary(url).run()

    assert result.outcome == Outcome.PUBLISH_FAILED
    assert result.exit_code == 10
    assert result.message == f"cannot reach the publisher at {url}: Connection refused"
    assert [s.step for s in result.steps] == ["connect", "starttls", "login", "select"]


def test_probe_not_delivered_reports_the_record(
    pipeline: Pipeline, make_canary: MakeCanary, metric_reader: InMemoryMetricReader
) -> None:
    pipeline.smtp.fail("rcpt", 451, "4.3.0 mailbox busy, try again")  # until cleared
    canary = make_canary(pipeline.url, MAILPIPE_CANARY_DEADLINE="6")

    result = canary.run()

    assert result.outcome == Outcome.NOT_DELIVERED
    assert result.exit_code == 15
    assert result.record_status == "deferred"
    assert "last delivery record status: deferred" in result.message
    assert "451 4.3.0" in result.message
    assert "rcpt to" in result.message
    runs = metric_points(metric_reader)["mailpipe.canary.runs"]
    assert {p.attributes["mailpipe.canary.outcome"]: p.value for p in runs} == {"not_delivered": 1}
    assert "mailpipe.canary.time_to_inbox" not in metric_points(metric_reader)


def test_bounced_probe_ends_the_wait_early(pipeline: Pipeline, make_canary: MakeCanary) -> None:
    pipeline.smtp.fail("rcpt", 550, "5.1.1 no such mailbox")
    # A deadline the test would notice: the bounce must end the run long before it.
    canary = make_canary(pipeline.url, MAILPIPE_CANARY_DEADLINE="120")

    result = canary.run()

    assert result.outcome == Outcome.NOT_DELIVERED
    assert result.record_status == "bounced"
    assert "was bounced" in result.message and "550 5.1.1" in result.message


# --- configuration ------------------------------------------------------------------------------


def test_config_lists_every_problem_and_refuses_plain_imap_across_a_network() -> None:
    with pytest.raises(ConfigError) as caught:
        CanaryConfig.from_env(
            {
                "MAILPIPE_CANARY_IMAP_HOST": "imap.example.com",
                "MAILPIPE_CANARY_IMAP_TLS": "none",
                "MAILPIPE_CANARY_DEADLINE": "soon",
            }
        )
    assert set(caught.value.problems) == {
        "MAILPIPE_CANARY_IMAP_USER",
        "MAILPIPE_CANARY_IMAP_PASSWORD",
        "MAILPIPE_CANARY_TO",
        "MAILPIPE_CANARY_IMAP_TLS",
        "MAILPIPE_CANARY_DEADLINE",
    }


def test_config_defaults_and_password_kept_out_of_repr() -> None:
    config = CanaryConfig.from_env(
        {
            "MAILPIPE_CANARY_IMAP_HOST": "imap.example.com",
            "MAILPIPE_CANARY_IMAP_USER": "probe@example.com",
            "MAILPIPE_CANARY_IMAP_PASSWORD": "s3cret-canary",
        }
    )
    assert (config.imap_tls, config.imap_port, config.mailbox) == ("imaps", 993, "INBOX")
    assert config.to == "probe@example.com"
    assert config.deadline == 300
    assert "s3cret-canary" not in repr(config)
