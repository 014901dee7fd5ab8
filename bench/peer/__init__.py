"""The benchmark's peer: the simplest pipeline a user would write instead of mailpipe.

Issue 18's yardstick, measured in the same run as mailpipe against the same kind of stack: a
fresh Pub/Sub emulator with mailpipe's topology (the same topic and delivery subscription), the
benchmark's SMTP sink, the same load. Two processes, each its own process group as mailpipe's
services are, so :mod:`bench.procstats` counts them the same way:

- :mod:`bench.peer.publisher`: Flask route → ``PublisherClient.publish(...).result()`` → 202,
  under gunicorn with one worker and 16 threads (mailpipe's publisher: the same);
- :mod:`bench.peer.subscriber`: streaming pull → ``EmailMessage`` → smtplib on a connection
  reused per callback thread → ack.

No validation, no record, no tracing, no metrics, no logs per mail: it is what the issue's table
calls "the simplest pipeline written as Google's samples suggest", kept that plain on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.peer.subscriber import READY_MARKER
from emulator.pipeline import ServiceProcess, start_service
from emulator.process import free_port
from emulator.stack import EmulatorStack, run_emulators
from mailpipe.topology import load_topology

THREADS = 16  # mailpipe's publisher serves with 16 gunicorn threads (mailpipe.serving)


@dataclass
class PeerPipeline:
    """The running peer: what :class:`bench.pipeline.ScenarioRunner` reads of a pipeline."""

    emulators: EmulatorStack
    publisher: ServiceProcess
    subscriber: ServiceProcess
    publisher_url: str
    state_dir: Path
    service_env: dict[str, str]


@contextmanager
def run_peer_pipeline(*, state_dir: Path, smtp_port: int) -> Iterator[PeerPipeline]:
    """Start a fresh emulator and the peer's two processes; stop everything on the way out."""
    state_dir = state_dir.resolve()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    topology = load_topology()
    with ExitStack() as stack:
        emulators = stack.enter_context(
            run_emulators(topology=topology, log_dir=log_dir, reuse_env=False)
        )
        env = {
            **_inherited_env(),
            **emulators.env,
            "PEER_TOPIC": topology.mail_topic.name,
            "PEER_SUBSCRIPTION": topology.delivery_subscription.name,
            "PEER_SMTP_HOST": "127.0.0.1",
            "PEER_SMTP_PORT": str(smtp_port),
            "PYTHONUNBUFFERED": "1",
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        publisher = start_service(
            "peer-publisher",
            [
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                str(THREADS),
                "--timeout",
                "0",
                "bench.peer.publisher:create_app()",
            ],
            env=env,
            log_dir=log_dir,
            health_url=f"{url}/healthz",
        )
        stack.callback(publisher.stop)
        subscriber = start_service(
            "peer-subscriber",
            ["bench.peer.subscriber"],
            env=env,
            log_dir=log_dir,
            ready_marker=READY_MARKER,
        )
        stack.callback(subscriber.stop)
        publisher.wait_healthy(timeout=60)
        subscriber.wait_healthy(timeout=60)
        yield PeerPipeline(emulators, publisher, subscriber, url, state_dir, env)


def _inherited_env() -> dict[str, str]:
    # The peer sees none of mailpipe's settings, as a user's own code would not.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAILPIPE_", "PEER_"))}
