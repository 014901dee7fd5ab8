"""The publisher stopped under load, and the Pub/Sub emulator restarted under the running stack.

Production Pub/Sub is durable: a message it confirmed survives anything on our side. The emulator is
not (no persistence: a restart loses topics, subscriptions and undelivered messages), so what is
meaningful to test here is the publisher's side of the promise: while Pub/Sub is unreachable it
answers 503 and never 202, none of the refused mails is sent later, and once Pub/Sub is back (and,
for the emulator, the topology re-applied) new mails flow again without restarting the publisher.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from emulator import RunningEmulator, delete_topology, start_pubsub_emulator, sync_topology
from emulator.pipeline import ServiceProcess, run_local_pipeline, start_service
from mailpipe.serving import STOP_DROP_LOG
from tests.reliability.harness import (
    PostResult,
    StampedSmtpServer,
    mail,
    post,
    print_counts,
    reliability_topology,
    tally,
    wait_settled,
)


def subjects(smtp: StampedSmtpServer) -> list[str]:
    return [str(m.message["Subject"]) for m in smtp.messages]


@pytest.mark.slow
def test_publisher_sigterm_under_load_never_accepts_a_mail_it_does_not_deliver(
    tmp_path: Path, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> None:
    topology = reliability_topology()
    smtp = StampedSmtpServer().start()
    results: list[PostResult] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        with run_local_pipeline(
            state_dir=tmp_path / "state",
            project=pubsub_project,
            topology=topology,
            smtp_server=smtp,
        ) as pipeline:

            def client(worker: int) -> None:
                failures = 0
                for i in range(300):  # bounded even if the publisher never stops
                    if stop.is_set() or failures >= 3:
                        return
                    result = post(pipeline.publisher_url, mail(f"w{worker}-{i}"), timeout=20)
                    with lock:
                        results.append(result)
                    if result.status != 202:
                        failures += 1
                        time.sleep(0.05)

            threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while sum(r.status == 202 for r in list(results)) < 40:
                assert time.monotonic() < deadline, "the publisher accepted too little"
                time.sleep(0.02)
            pipeline.publisher.signal(signal.SIGTERM)
            exit_code = pipeline.publisher.process.wait(30)
            stop.set()
            for thread in threads:
                thread.join(30)

            accepted = [r.mail_id for r in results if r.status == 202 and r.mail_id]
            records = wait_settled(pipeline.state_dir / "record.sqlite3", accepted, timeout=60)
            time.sleep(1.0)  # anything refused but sent anyway would show up by now
            receipts = smtp.receipts()
            received_subjects = set(subjects(smtp))
        publisher_log = pipeline.publisher.log_path.read_text(encoding="utf-8", errors="replace")
    finally:
        smtp.stop()
        delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)

    http_errors = [r for r in results if r.status is not None and r.status != 202]
    no_answer = [r for r in results if r.status is None]
    counts = tally(accepted, receipts, records, not_accepted=len(http_errors) + len(no_answer))
    counts.notes.update(
        http_errors=len(http_errors),
        no_answer=len(no_answer),
        no_answer_but_sent=sum(r.tag in received_subjects for r in no_answer),
        closed_without_response=sum("Remote end closed" in (r.error or "") for r in no_answer),
        logged_closed_unread=publisher_log.count(STOP_DROP_LOG.split("(")[0]),
        publisher_exit=exit_code,
    )
    print_counts("publisher SIGTERM under load", counts)

    assert exit_code == 0  # graceful: in-flight requests answered, publisher flushed
    assert counts.lost == 0 and counts.duplicated == 0, counts.lost_ids
    assert counts.delivered == len(accepted)
    for result in http_errors:
        assert result.status in (503,) and isinstance(result.body, dict), result
        assert result.tag not in received_subjects, f"{result.tag}: refused, then sent"
    # No answer means the connection was refused (the port is closed), reset while it still
    # waited in the listen backlog, or closed while the client was still sending its request (a
    # broken pipe: the worker drops requests it has only partly received when it stops): never
    # read whole, so none of those mails was sent. A request the server had read was answered
    # before the worker exited.
    unread = ("Connection refused", "Connection reset", "Broken pipe")
    # The same drop, when the client's last bytes (urllib sends the body after the head) left
    # after the worker had read what had arrived: the client finished sending, then read the
    # close. Only as many as the publisher logged closing with its request not whole.
    cut_short = "Remote end closed connection without response"
    assert all(any(sign in (r.error or "") for sign in (*unread, cut_short)) for r in no_answer), (
        no_answer[:3]
    )
    closed = counts.notes["closed_without_response"]
    assert closed <= counts.notes["logged_closed_unread"], no_answer
    assert counts.notes["no_answer_but_sent"] == 0


@pytest.mark.slow
def test_emulator_restart_publisher_answers_503_then_recovers(
    tmp_path: Path, pubsub_project: str
) -> None:
    topology = reliability_topology()
    smtp = StampedSmtpServer().start()
    restarted: list[RunningEmulator] = []
    services: list[ServiceProcess] = []
    try:
        with run_local_pipeline(
            state_dir=tmp_path / "state",
            project=pubsub_project,
            topology=topology,
            smtp_server=smtp,
            reuse_env=False,  # this test's own emulator: it is stopped and started again
            publisher_env={"MAILPIPE_PUBLISH_TIMEOUT": "3"},
        ) as pipeline:
            record_path = pipeline.state_dir / "record.sqlite3"
            before = [post(pipeline.publisher_url, mail(f"before-{i}")) for i in range(5)]
            assert [r.status for r in before] == [202] * 5
            before_ids = [r.mail_id for r in before if r.mail_id]
            wait_settled(record_path, before_ids, timeout=30)

            port = pipeline.emulators.pubsub.port
            pipeline.emulators.pubsub.stop()
            during = [post(pipeline.publisher_url, mail(f"during-{i}")) for i in range(5)]

            emulator = start_pubsub_emulator(
                port=port, reuse_env=False, log_dir=pipeline.state_dir / "logs"
            )
            restarted.append(emulator)
            sync_topology(topology, project=pubsub_project, emulator_host=emulator.host)
            # A pull worker whose subscription vanished exits; its supervisor (Cloud Run, or
            # `mailpipe up`) starts it again. Do the same here if it did.
            subscriber_survived = pipeline.subscriber.process.poll() is None
            if not subscriber_survived:
                worker = start_service(
                    "subscriber-after-emulator-restart",
                    ["subscriber", "pull"],
                    env=pipeline.service_env,
                    log_dir=pipeline.state_dir / "logs",
                    ready_marker="pulling from",
                )
                services.append(worker)
                worker.wait_healthy(timeout=60)

            after: list[PostResult] = []
            deadline = time.monotonic() + 30
            while len(after) < 5 and time.monotonic() < deadline:
                result = post(pipeline.publisher_url, mail(f"after-{len(after)}"))
                if result.status == 202:
                    after.append(result)
                else:  # the publisher's channel reconnects within a few seconds
                    time.sleep(0.5)
            after_ids = [r.mail_id for r in after if r.mail_id]
            records = wait_settled(record_path, before_ids + after_ids, timeout=60)
            time.sleep(2.0)  # a refused mail published late would be delivered by now
            receipts = smtp.receipts()
            received_subjects = set(subjects(smtp))
    finally:
        for service in services:
            service.stop()
        for emulator in restarted:
            emulator.stop()
        smtp.stop()

    counts = tally(before_ids + after_ids, receipts, records, not_accepted=len(during))
    counts.notes.update(
        during_statuses=sorted({str(r.status) for r in during}),
        subscriber_survived_restart=subscriber_survived,
    )
    print_counts("emulator restarted (503 while down)", counts)

    assert [r.status for r in during] == [503] * 5, [r.body for r in during]
    assert all(r.body["error"]["code"] == "publish_failed" for r in during)
    assert not {r.tag for r in during} & received_subjects, "a mail answered 503 was sent"
    assert len(after) == 5
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == 10
