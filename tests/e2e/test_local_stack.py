"""End to end: the services as real processes (gunicorn, the pull worker), configured only by
environment variables, as `mailpipe up` and Cloud Run run them."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from emulator import RunningEmulator
from emulator.pipeline import LocalPipeline, run_local_pipeline, start_service
from emulator.process import free_port
from mailpipe.topology import Topology
from ops.trace_view import find_trace, read_spans
from tests.fixtures.pipeline import push_to
from tests.fixtures.processes import read_processes

MAIL: dict[str, Any] = {
    "from": "Ada Lovelace <ada@example.com>",
    "to": ["Bob <bob@example.org>"],
    "bcc": ["audit@example.org"],
    "subject": "Ünïcödé ✓ subject",
    "text": "plain body — ünïcödé\n",
    "html": "<p>html body — ünïcödé</p>",
    "attachments": [
        {
            "filename": "data.bin",
            "content_type": "application/octet-stream",
            "content": base64.b64encode(bytes(range(256))).decode(),
        }
    ],
}


@pytest.fixture
def topology(stack_topology: Topology) -> Topology:
    return stack_topology


def local_pipeline(tmp_path: Path, topology: Topology, project: str, mode: str) -> Any:
    return run_local_pipeline(
        state_dir=tmp_path / "state",
        subscriber_mode=mode,  # type: ignore[arg-type]
        project=project,
        topology=topology,
        extra_env={"MAILPIPE_SMTP_TIMEOUT": "5"},
    )


def wait_for_spans(pipeline: LocalPipeline, trace_id: str, names: Counter[str]) -> list[Any]:
    """The trace's spans once it holds at least ``names[n]`` spans named ``n`` (or after 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        spans = find_trace(read_spans(pipeline.trace_file), trace_id)
        if names <= Counter(s.name for s in spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_processes_deliver_a_mail_in_one_trace(
    tmp_path: Path, topology: Topology, pubsub_project: str, mode: str
) -> None:
    with local_pipeline(tmp_path, topology, pubsub_project, mode) as pipeline:
        accepted = pipeline.post_mail(MAIL)
        record = pipeline.wait_for_status(accepted["mail_id"], {"delivered", "bounced"})
        [received] = pipeline.smtp.wait_for(1)
        # The services as processes emit delivery events (docs/events.md), in the mail's trace.
        expected = Counter(["POST /v1/messages", "mail deliver", "smtp data"])
        # Two events (accepted, delivered), each exported when its publish is answered.
        expected[f"{topology.events_topic.name} create"] = 2
        if mode == "pull":  # the library ends its subscribe span at the ack, after delivery
            expected[f"{topology.delivery_subscription.name} subscribe"] = 1
        spans = wait_for_spans(pipeline, accepted["trace_id"], expected)

    assert record["status"] == "delivered"
    message = received.message
    assert message["Subject"] == MAIL["subject"]
    assert message["Message-ID"] == f"<{accepted['mail_id']}@mailpipe.local>"
    assert message["Bcc"] is None and "audit@example.org" in received.recipients
    # SMTP carries CRLF line ends; the text itself is unchanged.
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n") == MAIL["text"]
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content() == bytes(range(256))
    assert message["traceparent"].split("-")[1] == accepted["trace_id"]
    services = {s.service for s in spans}
    assert services == {"mailpipe-publisher", "mailpipe-subscriber"}
    by_id = {s.span_id: s for s in spans}
    deliver = next(s for s in spans if s.name == "mail deliver")
    data = next(s for s in spans if s.name == "smtp data")
    assert data.parent_span_id == deliver.span_id
    # Walk up from `mail deliver` to the HTTP request: one unbroken chain across processes.
    chain, span = [], deliver
    while span.parent_span_id:
        span = by_id[span.parent_span_id]
        chain.append(span.name)
    assert chain[-1] == "POST /v1/messages"
    assert f"{topology.mail_topic.name} create" in chain
    # The received mail's traceparent names the `mail deliver` span.
    assert message["traceparent"].split("-")[2] == deliver.span_id
    # One event per state change, published from the request (accepted) and `mail deliver`.
    event_parents = sorted(
        by_id[s.parent_span_id].name
        for s in spans
        if s.name == f"{topology.events_topic.name} create"
    )
    assert event_parents == ["POST /v1/messages", "mail deliver"]


def test_subscriber_replaced_mid_stream_loses_nothing(
    tmp_path: Path, topology: Topology, pubsub_project: str, pubsub_emulator: RunningEmulator
) -> None:
    """A deploy while mail flows, as Cloud Run does it: the new subscriber starts, the push
    endpoint moves to it, the old one gets SIGTERM and finishes the deliveries it holds.

    (Killing a pull worker cannot be tested this way on the emulator: it strands the messages
    the dead stream held, where production redelivers them after the ack deadline — see
    docs/local-vs-gcp.md and the contract test that pins it.)
    """
    total = 40
    with local_pipeline(tmp_path, topology, pubsub_project, "push") as pipeline:
        pipeline.smtp.hang("rcpt", 0.2)  # keep deliveries in flight while the subscriber stops
        with ThreadPoolExecutor(8) as pool:
            accepted = list(
                pool.map(lambda i: pipeline.post_mail({**MAIL, "subject": f"#{i}"}), range(total))
            )
        pipeline.smtp.wait_for(3, timeout=30)
        port = free_port()
        replacement = start_service(
            "subscriber-new",
            ["subscriber", "push"],
            env={**pipeline.service_env, "PORT": str(port)},
            log_dir=pipeline.state_dir / "logs",
            health_url=f"http://127.0.0.1:{port}/healthz",
        )
        try:
            replacement.wait_healthy()
            push_to(topology, pubsub_project, pubsub_emulator.host, f"http://127.0.0.1:{port}")
            assert pipeline.subscriber.stop() == 0  # SIGTERM: in-flight requests finish first
            delivered_by_the_old_one = len(pipeline.smtp.messages)
            received = pipeline.smtp.wait_for(total, timeout=120)
            records = [
                pipeline.wait_for_status(a["mail_id"], {"delivered"}, timeout=30) for a in accepted
            ]
        finally:
            replacement.stop()

    message_ids = [str(m.message["Message-ID"]) for m in received]
    assert len(message_ids) == len(set(message_ids)) == total  # every mail, none twice
    assert {f"<{a['mail_id']}@mailpipe.local>" for a in accepted} == set(message_ids)
    assert all(r["status"] == "delivered" for r in records)
    assert delivered_by_the_old_one < total, "the replacement happened after all mail was sent"


def _processes_in(directory: Path) -> list[int]:
    cwds = read_processes(lambda entry: Path(os.readlink(entry / "cwd")))
    return [pid for pid, cwd in cwds.items() if cwd == directory]


def _mailpipe_up(*options: str) -> list[str]:
    """`mailpipe up` (as `python -m ops up`) with ``options``, on free ports."""
    ports = ["--port", str(free_port()), "--smtp-port", str(free_port())]
    return [sys.executable, "-m", "ops", "up", *options, *ports]


def _env_without_emulator() -> dict[str, str]:
    """This environment without PUBSUB_EMULATOR_HOST: `mailpipe up` starts its own emulator."""
    return {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}


def test_mailpipe_up_once_runs_the_sample_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "clone"
    workdir.mkdir()
    result = subprocess.run(
        _mailpipe_up("--once", "--json"),
        cwd=workdir,
        env=_env_without_emulator(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "delivered"
    assert summary["received"] == 1
    assert summary["spans"] >= 10
    assert (workdir / ".mailpipe" / "maildir" / "new").is_dir()
    assert len(list((workdir / ".mailpipe" / "maildir" / "new").iterdir())) == 1
    assert _processes_in(workdir) == []  # emulator (java), publisher, subscriber all stopped


@pytest.mark.parametrize(
    ("stop", "exit_code"),
    [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)],
    ids=["ctrl-c", "sigterm", "sigkill"],
)
def test_mailpipe_up_leaves_nothing_running_however_it_is_stopped(
    tmp_path: Path, stop: signal.Signals, exit_code: int
) -> None:
    """Ctrl-C and SIGTERM stop everything in order; even SIGKILL of `mailpipe up` takes the
    emulator and the services with it."""
    process = subprocess.Popen(
        _mailpipe_up(),
        cwd=tmp_path,
        env={**_env_without_emulator(), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        for line in process.stdout:
            output.append(line)
            if "Ctrl-C to stop" in line or time.monotonic() > deadline:
                break
        process.send_signal(stop)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30  # after SIGKILL the children stop on their own
        while _processes_in(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "Ctrl-C to stop" in "".join(output), "".join(output)[-3000:]
    assert process.returncode == exit_code
    assert _processes_in(tmp_path) == []
