"""Structured logs: Cloud Logging's JSON fields, trace correlation, secrets and addresses."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from mailpipe import logs
from mailpipe.config import PubSubConfig, TelemetryConfig
from mailpipe.logs import configure_logging, redact_address, redact_addresses, register_secret
from subscriber.pull import make_subscriber_client

CONFIG = TelemetryConfig(service_name="mailpipe-subscriber")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logs configured to a buffer; the handler and any registered secrets removed after."""
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(CONFIG, stream=buffer, level="DEBUG", project="mailpipe-prod")
    secrets = logs._secrets
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)
    logs._secrets = secrets


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_has_cloud_loggings_fields(stream: io.StringIO) -> None:
    logging.getLogger("subscriber.delivery").warning("deferred %s", "m-1")

    (line,) = _lines(stream)
    assert line["severity"] == "WARNING"
    assert line["message"] == "deferred m-1"
    assert line["logger"] == "subscriber.delivery"
    assert line["time"].endswith("Z")
    assert line["serviceContext"] == {"service": "mailpipe-subscriber"}
    assert line["logging.googleapis.com/sourceLocation"]["function"] == (
        "test_a_line_has_cloud_loggings_fields"
    )
    assert "logging.googleapis.com/trace" not in line  # no current span


def test_inside_a_span_the_line_joins_its_trace(stream: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("mail deliver") as span:
        logging.getLogger("x").info("sending")
    context = span.get_span_context()

    (line,) = _lines(stream)
    assert line["logging.googleapis.com/trace"] == (
        f"projects/mailpipe-prod/traces/{trace.format_trace_id(context.trace_id)}"
    )
    assert line["logging.googleapis.com/spanId"] == trace.format_span_id(context.span_id)
    assert line["logging.googleapis.com/trace_sampled"] is True


def test_an_unsampled_span_is_marked_so(stream: io.StringIO) -> None:
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("t").start_as_current_span("s"):
        logging.getLogger("x").info("quiet")

    (line,) = _lines(stream)
    assert line["logging.googleapis.com/trace_sampled"] is False


def test_without_a_project_the_trace_field_is_the_bare_trace_id() -> None:
    buffer = io.StringIO()
    handler = configure_logging(CONFIG, stream=buffer)
    try:
        with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
            logging.getLogger("x").warning("w")
    finally:
        logging.getLogger().removeHandler(handler)

    (line,) = _lines(buffer)
    assert line["logging.googleapis.com/trace"] == trace.format_trace_id(
        span.get_span_context().trace_id
    )


def test_json_fields_become_top_level_fields(stream: io.StringIO) -> None:
    logging.getLogger("x").info(
        "deferred",
        extra={"json_fields": {"mailpipe.mail_id": "m-1", "smtp.reply.code": 451}},
    )

    (line,) = _lines(stream)
    assert line["mailpipe.mail_id"] == "m-1"
    assert line["smtp.reply.code"] == 451


def test_registered_secrets_never_reach_a_line(stream: io.StringIO) -> None:
    secret = "hunter2-s3cr3t"
    register_secret(secret)
    log = logging.getLogger("subscriber.smtp")

    log.info("AUTH PLAIN with %s", secret)
    log.info("login", extra={"json_fields": {"password": secret, "nested": [f"x{secret}x"]}})
    try:
        raise RuntimeError(f"535 authentication failed for password {secret}")
    except RuntimeError:
        log.exception("auth failed")

    text = stream.getvalue()
    assert secret not in text
    lines = _lines(stream)
    assert lines[0]["message"] == "AUTH PLAIN with [REDACTED]"
    assert lines[1]["password"] == "[REDACTED]"
    assert lines[1]["nested"] == ["x[REDACTED]x"]
    assert "535 authentication failed for password [REDACTED]" in lines[2]["message"]
    assert "Traceback" in lines[2]["message"]


def test_a_secret_in_a_set_field_is_redacted_too(stream: io.StringIO) -> None:
    # A set is written as a list: its items are escaped like any string, so the secret's
    # registered JSON form matches even with a quote, a backslash and a tab in it.
    secret = 'pa\\ss"w\tord'
    register_secret(secret)
    formatter = logs.CloudLoggingFormatter(project=None)
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "login", None, None)
    record.json_fields = {"tried": {secret}}

    assert json.loads(formatter.format(record))["tried"] == ["[REDACTED]"]


@pytest.mark.parametrize("before", ["\n", "\t", "\x01", "\\", '"'])
def test_an_address_right_after_an_escaped_character_leaves_valid_json(before: str) -> None:
    formatter = logs.CloudLoggingFormatter(project=None, address_style="domain")
    text = f"refused:{before}bob@example.com"
    record = logging.LogRecord("t", logging.INFO, __file__, 1, text, None, None)

    assert json.loads(formatter.format(record))["message"] == f"refused:{before}@example.com"


def test_secrets_are_redacted_for_handlers_installed_before_ours() -> None:
    earlier = io.StringIO()
    other = logging.StreamHandler(earlier)  # e.g. gunicorn's, added before configure_logging
    root = logging.getLogger()
    root.addHandler(other)
    secrets = logs._secrets
    handler = configure_logging(CONFIG, stream=io.StringIO())
    try:
        register_secret("tok-123456")
        logging.getLogger("x").warning("token is %s", "tok-123456")
    finally:
        root.removeHandler(other)
        root.removeHandler(handler)
        logs._secrets = secrets

    assert earlier.getvalue() == "token is [REDACTED]\n"


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("full", "Ada.Lovelace@Example.com"),
        ("domain", "@example.com"),
        ("hashed", "sha256:"),
    ],
)
def test_redact_address(style: Any, expected: str) -> None:
    assert redact_address("Ada.Lovelace@Example.com", style).startswith(expected)


def test_hashed_addresses_are_stable_and_case_insensitive() -> None:
    first = redact_address("ada@example.com", "hashed")

    assert first == redact_address("ADA@example.com ", "hashed")
    assert first != redact_address("bob@example.com", "hashed")
    assert len(first) == len("sha256:") + 12
    assert "ada" not in first


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(CONFIG, stream=first)
    handler = configure_logging(CONFIG, stream=second)
    try:
        logging.getLogger("x").warning("once")
    finally:
        logging.getLogger().removeHandler(handler)

    assert first.getvalue() == ""
    assert [line["message"] for line in _lines(second)] == ["once"]


@pytest.mark.parametrize(
    ("style", "expected"),
    [
        ("full", "550 5.1.1 <bob@example.org>: no such user"),
        ("domain", "550 5.1.1 <@example.org>: no such user"),
    ],
)
def test_addresses_inside_text_follow_the_configured_style(style: str, expected: str) -> None:
    assert redact_addresses("550 5.1.1 <bob@example.org>: no such user", style) == expected  # type: ignore[arg-type]


def test_hashed_style_hides_the_address_but_keeps_it_recognisable() -> None:
    text = redact_addresses("refused bob@example.org and bob@example.org", "hashed")
    assert "bob@" not in text
    assert text.count("sha256:") == 2 and len(set(text.split()[1::2])) == 1


def test_the_pubsub_clients_double_end_warning_is_not_logged() -> None:
    stream = io.StringIO()
    configure_logging(TelemetryConfig(service_name="t"), stream=stream)
    # The subscriber's streaming-pull client is the one that ends its spans twice.
    pubsub = PubSubConfig(project="p", topic="t", subscription="s", emulator_host="127.0.0.1:1")
    make_subscriber_client(pubsub).close()

    logging.getLogger("opentelemetry.sdk.trace").warning("Calling end() on an ended span.")
    logging.getLogger("opentelemetry.sdk.trace").warning("a real warning")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "a real warning" in lines[0]
