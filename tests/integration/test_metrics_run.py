"""The pipeline's metrics from a real run, scraped from the services' Prometheus endpoints.

The publisher and the subscriber run as their own processes (``python -m publisher``,
``python -m subscriber pull``, as ``mailpipe up`` runs them), each with its own
``MAILPIPE_METRICS_PORT``. Three mails go through one after another, on one pooled SMTP
connection, so every count below is exact: one delivered on the first try, one deferred once
(451 4.3.0) then delivered, one bounced (550 5.1.1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.process import free_port
from emulator.smtp import LocalSmtpServer
from mailpipe.topology import Topology
from tests.fixtures.pipeline import pipeline_processes

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def topology(stack_topology: Topology) -> Topology:
    return stack_topology


def scrape(port: int) -> Samples:
    """Every sample on the endpoint, keyed by (sample name, labels)."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    text = response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when it is not there)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def scrape_until(port: int, ready: Any, timeout: float = 15.0) -> Samples:
    """Scrape until ``ready(samples)`` (the last measurements land just after the record)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_metrics_of_delivered_deferred_and_bounced_mails(
    tmp_path: Path, topology: Topology, pubsub_project: str
) -> None:
    publisher_port, subscriber_port = free_port(), free_port()
    smtp = LocalSmtpServer()
    smtp.fail("rcpt", 451, "4.3.0 try later", times=1, address="deferred@example.org")
    smtp.fail("rcpt", 550, "5.1.1 no such user", address="bounced@example.org")
    with pipeline_processes(
        smtp,
        tmp_path,
        pubsub_project,
        topology,
        extra_env={"MAILPIPE_SMTP_TIMEOUT": "5", "MAILPIPE_SMTP_POOL_SIZE": "1"},
        # One port each: the two processes would otherwise fight over one.
        publisher_env={"MAILPIPE_METRICS_PORT": str(publisher_port)},
        subscriber_env={"MAILPIPE_METRICS_PORT": str(subscriber_port)},
    ) as pipeline:
        for to, status in [
            ("delivered@example.org", "delivered"),
            ("deferred@example.org", "delivered"),
            ("bounced@example.org", "bounced"),
        ]:
            accepted = pipeline.post_mail(
                {"from": "sender@example.com", "to": [to], "subject": "hi", "text": "hello"}
            )
            pipeline.wait_for_status(accepted["mail_id"], {status})

        published = scrape(publisher_port)
        assert value(published, "mailpipe_mails_accepted_total") == 3
        # The publisher delivers nothing: its endpoint has no subscriber-side points.
        assert total(published, "mailpipe_mails_delivered_total") == 0

        samples = scrape_until(
            subscriber_port,
            lambda s: total(s, "mailpipe_delivery_attempts_count") >= 3,
        )

    assert value(samples, "mailpipe_mails_delivered_total") == 2
    reply_451 = {"smtp_reply_code": "451", "smtp_reply_enhanced_status": "4.3.0"}
    reply_550 = {"smtp_reply_code": "550", "smtp_reply_enhanced_status": "5.1.1"}
    assert value(samples, "mailpipe_mails_deferred_total", **reply_451) == 1
    assert total(samples, "mailpipe_mails_deferred_total") == 1
    assert value(samples, "mailpipe_mails_bounced_total", **reply_550) == 1
    assert total(samples, "mailpipe_mails_bounced_total") == 1
    assert total(samples, "mailpipe_mails_dead_lettered_total") == 0

    # End-to-end latency: both delivered mails, one on its first attempt, one on its second.
    latency = "mailpipe_delivery_latency_seconds_count"
    assert value(samples, latency, mailpipe_first_attempt="true") == 1
    assert value(samples, latency, mailpipe_first_attempt="false") == 1
    assert total(samples, "mailpipe_delivery_latency_seconds_sum") > 0

    # SMTP steps: one connection (connect + ehlo once), then 4 transactions (the deferred mail
    # twice); RSET after the 451 and after the 550.
    steps = "mailpipe_smtp_step_duration_seconds_count"
    assert {
        step: total(samples, steps, smtp_step=step)
        for step in ("connect", "ehlo", "mail from", "rcpt to", "data", "rset", "auth")
    } == {"connect": 1, "ehlo": 1, "mail from": 4, "rcpt to": 4, "data": 2, "rset": 2, "auth": 0}
    assert total(samples, steps, smtp_step="rcpt to", smtp_reply_code="451") == 1
    assert total(samples, steps, smtp_step="rcpt to", smtp_reply_code="550") == 1

    # Attempts to the final outcome: delivered on 1 and on 2, bounced on 1.
    assert value(samples, "mailpipe_delivery_attempts_count") == 3
    assert value(samples, "mailpipe_delivery_attempts_sum") == 4
    assert value(samples, "mailpipe_delivery_attempts_bucket", le="1.0") == 2
    assert value(samples, "mailpipe_delivery_attempts_bucket", le="2.0") == 3
