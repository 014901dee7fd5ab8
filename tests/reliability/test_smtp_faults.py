"""The SMTP relay misbehaving under the real pipeline: refusing, hanging, dropping, 4xx, 5xx.

One local stack (emulator, publisher and pull worker as processes) serves every scenario of this
module; ``MAILPIPE_SMTP_TIMEOUT=1`` so a hanging relay costs one second per attempt. The delivery
subscription retries after 1-2 s and dead-letters after 5 attempts. Each scenario scripts a fault
on the real aiosmtpd server, sends mails through the publisher's HTTP API, lets the relay recover
and then counts what the relay received and what the record says.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from emulator import RunningEmulator, delete_topology
from emulator.pipeline import LocalPipeline, run_local_pipeline
from mailpipe.record import MailRecord, MailStatus
from mailpipe.topology import Topology
from tests.reliability.harness import (
    Counts,
    StampedSmtpServer,
    mail,
    post,
    print_counts,
    read_records,
    reliability_topology,
    tally,
    wait_settled,
)

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    pipeline: LocalPipeline
    smtp: StampedSmtpServer
    topology: Topology
    project: str

    @property
    def record_path(self) -> Path:
        return self.pipeline.state_dir / "record.sqlite3"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
) -> Iterator[Stack]:
    topology = reliability_topology()
    smtp = StampedSmtpServer().start()
    try:
        with run_local_pipeline(
            state_dir=tmp_path_factory.mktemp("smtp-faults"),
            subscriber_mode="pull",
            project=pubsub_project,
            topology=topology,
            smtp_server=smtp,
            extra_env={"MAILPIPE_SMTP_TIMEOUT": "1"},
        ) as pipeline:
            yield Stack(pipeline, smtp, topology, pubsub_project)
    finally:
        smtp.stop()
        delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)


@pytest.fixture
def relay(stack: Stack) -> Iterator[StampedSmtpServer]:
    """The stack's SMTP server; its scripted faults are cleared after the test."""
    yield stack.smtp
    stack.smtp.clear_faults()


def send(stack: Stack, count: int, tag: str, **overrides: object) -> list[str]:
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda i: post(stack.pipeline.publisher_url, mail(f"{tag}-{i}", **overrides)),
                range(count),
            )
        )
    assert [r.status for r in results] == [202] * count, [r.body for r in results]
    return [r.mail_id for r in results if r.mail_id]


def settle(stack: Stack, ids: list[str], name: str, timeout: float = 60) -> tuple[Counts, dict]:
    records = wait_settled(stack.record_path, ids, timeout=timeout)
    time.sleep(0.3)  # a late extra copy would arrive now
    counts = tally(ids, stack.smtp.receipts(), records)
    deferred = sum(1 for r in records.values() if r for a in r.attempts if a.outcome == "deferred")
    counts.notes["deferred_attempts"] = deferred
    print_counts(name, counts)
    return counts, records


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def failed_steps(records: dict[str, MailRecord | None]) -> set[str]:
    return {
        a.failed_step or ""
        for r in records.values()
        if r
        for a in r.attempts
        if a.outcome == "deferred"
    }


def test_relay_refusing_connections_then_recovering(stack: Stack, relay: StampedSmtpServer) -> None:
    relay.refuse_connections()
    relay.close_connections()  # pooled connections too: nothing reaches the relay
    ids = send(stack, 10, "refused")

    def some_attempt_refused() -> bool:
        records = read_records(stack.record_path, ids)
        return any(r and any(a.outcome == "deferred" for a in r.attempts) for r in records.values())

    wait_until(some_attempt_refused)
    relay.accept_connections()
    counts, records = settle(stack, ids, "smtp refuses connections, then accepts")

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == 10
    assert "connect" in failed_steps(records)


def test_relay_hanging_times_out_and_is_retried(stack: Stack, relay: StampedSmtpServer) -> None:
    relay.close_connections()
    relay.hang("ehlo", 4.0, times=3)
    relay.hang("mail", 4.0, times=3)
    ids = send(stack, 10, "hang")
    counts, records = settle(stack, ids, "smtp hangs (timeout 1 s), then answers")

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == 10
    assert counts.notes["deferred_attempts"] >= 1
    assert any(
        "timed out" in (a.reply_message or "").lower() or a.failed_step
        for r in records.values()
        if r
        for a in r.attempts
        if a.outcome == "deferred"
    )


def test_relay_hanging_after_the_data_is_an_ambiguous_timeout(
    stack: Stack, relay: StampedSmtpServer
) -> None:
    """The relay has the whole mail but answers after our timeout: did it take it? Retrying is
    right (not losing it); a second copy is possible only for a mail whose DATA timed out."""
    relay.hang("data", 3.0, times=2)
    ids = send(stack, 6, "hang-data")
    counts, records = settle(stack, ids, "smtp hangs after DATA")

    assert counts.lost == 0
    assert counts.delivered == 6
    assert "data" in failed_steps(records)
    for mail_id in counts.duplicate_ids:
        record = records[mail_id]
        assert record and any(a.failed_step == "data" for a in record.attempts)


def test_relay_dropping_the_connection_mid_data(stack: Stack, relay: StampedSmtpServer) -> None:
    relay.drop_connection("data", times=3)
    ids = send(stack, 8, "drop")
    counts, records = settle(stack, ids, "smtp drops the connection mid-DATA")

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == 8
    assert "data" in failed_steps(records)


@pytest.mark.parametrize(
    ("step", "code", "text", "times"),
    [
        # A 421 at MAIL FROM on a pooled connection is first taken for a relay that closed it
        # while idle and retried once on a fresh connection: 6 faults defer about 3 attempts.
        ("mail", 421, "4.3.2 Service shutting down", 6),
        ("rcpt", 451, "4.3.0 Try again later", 3),
        ("data", 452, "4.3.1 Insufficient storage", 3),
    ],
)
def test_transient_replies_then_recovery(
    stack: Stack, relay: StampedSmtpServer, step: str, code: int, text: str, times: int
) -> None:
    relay.fail(step, code, text, times=times)  # type: ignore[arg-type]
    ids = send(stack, 5, f"{code}")
    counts, records = settle(stack, ids, f"smtp answers {code} at {step} x{times}, then 250")

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == 5
    codes = {a.reply_code for r in records.values() if r for a in r.attempts}
    assert code in codes


def test_permanent_refusal_bounces_once_and_is_recorded(
    stack: Stack, relay: StampedSmtpServer
) -> None:
    relay.fail("rcpt", 550, "5.1.1 No such user", address="nobody@example.org")
    bounced_ids = send(stack, 3, "bounce", to=["nobody@example.org"])
    ok_ids = send(stack, 3, "bounce-neighbour")
    counts, records = settle(stack, bounced_ids + ok_ids, "smtp 550 for one recipient")

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.bounced == 3 and counts.delivered == 3
    for mail_id in bounced_ids:
        record = records[mail_id]
        assert record is not None and record.status is MailStatus.BOUNCED
        assert [a.reply_code for a in record.attempts] == [550]  # never retried
        assert record.last_error and "5.1.1" in record.last_error


def test_a_lasting_transient_failure_is_dead_lettered_and_visible(
    stack: Stack, relay: StampedSmtpServer
) -> None:
    relay.fail("rcpt", 451, "4.2.2 Mailbox full", address="full@example.org")
    ids = send(stack, 2, "dead", to=["full@example.org"])
    counts, records = settle(stack, ids, "smtp 451 forever -> dead-letter", timeout=90)

    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.dead_lettered == 2
    for mail_id in ids:
        record = records[mail_id]
        assert record is not None and len(record.attempts) >= 5
    # Its data waits on the dead-letter subscription for inspection and `mailpipe dlq replay`.
    subscriber = pubsub_v1.SubscriberClient()
    try:
        path = subscriber.subscription_path(
            stack.project, stack.topology.dead_letter_subscription.name
        )
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while not set(ids) <= seen and time.monotonic() < deadline:
            response = subscriber.pull(subscription=path, max_messages=50, timeout=10)
            seen |= {m.message.attributes.get("mail_id", "") for m in response.received_messages}
    finally:
        subscriber.close()
    assert set(ids) <= seen
