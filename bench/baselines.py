"""Raw baselines: what the parts the pipeline depends on do without mailpipe in between.

- SMTP: the benchmark's SMTP process (LocalSmtpServer) with a bare ``smtplib`` client, a new
  connection per mail and one reused connection.
- Pub/Sub: the emulator with the bare google-cloud-pubsub client, publishing with default
  batching (every future awaited at the end) and receiving with streaming pull (ack each).
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from bench.procstats import sample_group, sample_pid
from bench.smtp_sink import SmtpSink
from emulator.clients import publisher_client, subscriber_client
from emulator.process import RunningEmulator, start_pubsub_emulator

Progress = Callable[[int], None]


def smtp_message(body_bytes: int) -> bytes:
    line = b"mailpipe benchmark body line, 64 bytes long, ascii only....\r\n"
    body = (line * (body_bytes // len(line) + 1))[:body_bytes]
    head = (
        b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: baseline\r\n"
        b"Message-ID: <baseline@bench.local>\r\n\r\n"
    )
    return head + body


def smtp_baseline(
    sink: SmtpSink,
    *,
    count: int,
    reuse: bool,
    body_bytes: int = 1024,
    max_seconds: float = 30.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Send up to ``count`` mails one after another with smtplib; the rate the server accepts."""
    message = smtp_message(body_bytes)
    before = sink.count()
    sink_cpu = _pid_cpu(sink.pid)
    deadline = time.monotonic() + max_seconds
    sent = 0
    start = time.perf_counter()
    client: smtplib.SMTP | None = None
    try:
        while sent < count and time.monotonic() < deadline:
            if client is None:
                client = smtplib.SMTP("127.0.0.1", sink.port, local_hostname="bench.local")
            client.sendmail("bench@example.com", ["sink@example.net"], message)
            sent += 1
            if not reuse:
                client.quit()
                client = None
            if progress is not None and sent % 50 == 0:
                progress(sent)
    finally:
        if client is not None:
            client.quit()
    seconds = time.perf_counter() - start
    received = sink.count() - before
    return {
        "mails": sent,
        "received": received,
        "body_bytes": body_bytes,
        "seconds": round(seconds, 4),
        "rate": round(sent / seconds, 1),
        "server_cpu_cores": round((_pid_cpu(sink.pid) - sink_cpu) / seconds, 3),
    }


def _pid_cpu(pid: int) -> float:
    return sample_pid(pid).cpu_seconds


def pubsub_baselines(
    *,
    count: int,
    body_bytes: int = 1024,
    log_dir: Path,
    max_seconds: float = 60.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Start a fresh emulator; publish ``count`` messages, then receive them by streaming pull."""
    emulator = start_pubsub_emulator(log_dir=log_dir, reuse_env=False)
    try:
        return _pubsub_baselines(emulator, count, body_bytes, max_seconds, progress)
    finally:
        emulator.stop()


def _pubsub_baselines(
    emulator: RunningEmulator,
    count: int,
    body_bytes: int,
    max_seconds: float,
    progress: Progress | None,
) -> dict[str, Any]:
    assert emulator.pid is not None
    project = "bench-project"
    suffix = uuid.uuid4().hex[:8]
    publisher = publisher_client(emulator.host)
    subscriber = subscriber_client(emulator.host)
    topic = publisher.topic_path(project, f"bench-{suffix}")
    subscription = subscriber.subscription_path(project, f"bench-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    data = b"x" * body_bytes

    # Warm the JVM a little, as the pipeline runs do, so neither side measures class loading.
    warm = [publisher.publish(topic, data) for _ in range(500)]
    futures.wait(warm)
    # One pull may return only part of the backlog: drain all of it, or the streaming pull
    # below would count the leftovers as its own.
    drained, drain_deadline = 0, time.monotonic() + 30
    while drained < len(warm) and time.monotonic() < drain_deadline:
        response = subscriber.pull(subscription=subscription, max_messages=1000, timeout=10)
        if response.received_messages:
            subscriber.acknowledge(
                subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages]
            )
            drained += len(response.received_messages)
    java_cpu = sample_group(emulator.pid, only="java").cpu_seconds

    start = time.perf_counter()
    pending = [publisher.publish(topic, data) for _ in range(count)]
    futures.wait(pending, timeout=max_seconds)
    publish_seconds = time.perf_counter() - start
    published = sum(1 for f in pending if f.done() and f.exception() is None)
    java_publish = sample_group(emulator.pid, only="java").cpu_seconds - java_cpu
    if progress is not None:
        progress(count)

    received = 0
    lock = threading.Lock()
    done = threading.Event()

    def callback(message: Any) -> None:
        nonlocal received
        message.ack()
        with lock:
            received += 1
            if received >= published:
                done.set()

    java_cpu = sample_group(emulator.pid, only="java").cpu_seconds
    start = time.perf_counter()
    stream = subscriber.subscribe(subscription, callback=callback)
    deadline = time.monotonic() + max_seconds
    while not done.wait(0.2) and time.monotonic() < deadline:
        if progress is not None:
            progress(count + received)
    pull_seconds = time.perf_counter() - start
    java_pull = sample_group(emulator.pid, only="java").cpu_seconds - java_cpu
    stream.cancel()
    with contextlib.suppress(Exception):  # a cancelled stream raises; that is how it ends
        stream.result(timeout=10)
    subscriber.close()
    publisher.stop()

    def measured(messages: int, seconds: float, java_cpu_seconds: float) -> dict[str, Any]:
        return {
            "messages": messages,
            "body_bytes": body_bytes,
            "seconds": round(seconds, 4),
            "rate": round(messages / seconds, 1),
            "java_cpu_cores": round(java_cpu_seconds / seconds, 3),
        }

    return {
        "publish": measured(published, publish_seconds, java_publish),
        "streaming_pull": measured(received, pull_seconds, java_pull),
    }
