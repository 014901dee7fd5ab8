"""The whole pipeline on one machine: emulators, a local SMTP server, publisher and subscriber.

Used by ``mailpipe up`` and by the end-to-end tests, so both run exactly what a user runs: the
services are started as their own processes (``python -m publisher``, ``python -m subscriber``)
configured only through environment variables, as on Cloud Run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from client import PublisherApi
from emulator.errors import EmulatorError
from emulator.process import free_port
from emulator.smtp import SIMULATOR_DOMAIN, LocalSmtpServer, MailboxSimulator
from emulator.stack import DEFAULT_LOCAL_PROJECT, EmulatorStack, run_emulators
from mailpipe.topology import Topology, load_topology

SubscriberMode = Literal["pull", "push"]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PULL_READY_MARKER = "pulling from"  # logged by subscriber.main.run_pull once it is receiving


class ServiceStartError(EmulatorError):
    """A local service process exited or did not become healthy; carries its log's tail."""


@dataclass
class ServiceProcess:
    """A service running as its own process group, with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    health_url: str | None = None
    ready_marker: str | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _ready(self) -> bool:
        if self.ready_marker is not None:
            return self.ready_marker in self.log_tail(200)
        if self.health_url is None:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as response:  # noqa: S310 - loopback URL we built
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Poll the health URL, or the log for ``ready_marker``, until the service is ready."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServiceStartError(
                    f"{self.name} exited with {self.process.returncode}; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"{self.name} was not ready ({self.health_url or self.ready_marker!r}) "
                    f"within {timeout:g} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the group (graceful), SIGKILL after ``timeout``; return the exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the process that started us dies.

    The services run in their own sessions (so Ctrl-C in the terminal reaches only the owner,
    which stops them in order); this covers an owner killed outright, which could not.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_service(
    name: str,
    args: list[str],
    *,
    env: Mapping[str, str],
    log_dir: Path,
    health_url: str | None = None,
    ready_marker: str | None = None,
) -> ServiceProcess:
    """Start ``python -m <args>`` in its own process group, logging to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", *args],
        env=dict(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
    )
    return ServiceProcess(name, process, log_path, health_url, ready_marker, log)


@dataclass
class LocalPipeline:
    """A running local pipeline and how to reach each part."""

    emulators: EmulatorStack
    smtp: LocalSmtpServer
    publisher: ServiceProcess
    subscriber: ServiceProcess
    publisher_url: str
    subscriber_mode: SubscriberMode
    state_dir: Path
    service_env: dict[str, str]
    subscriber_url: str | None = None

    @property
    def trace_file(self) -> Path:
        return Path(self.service_env["MAILPIPE_TRACE_FILE"])

    @property
    def api(self) -> PublisherApi:
        """The publisher's API client (the CLI's and the canary's); it raises
        :class:`client.ApiError`."""
        return PublisherApi(self.publisher_url)

    def post_mail(self, mail: Mapping[str, Any]) -> dict[str, Any]:
        """POST a mail to the publisher; return its 202 answer (or raise ``ApiError``)."""
        return self.api.send(mail).body

    def get_record(self, mail_id: str) -> dict[str, Any] | None:
        """The mail's delivery record; None if the publisher has none (or raise ``ApiError``)."""
        return self.api.record(mail_id)

    def wait_for_status(
        self, mail_id: str, statuses: set[str], *, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Poll the status API until the mail reaches one of ``statuses``; TimeoutError if not."""
        record = self.api.wait(mail_id, statuses, timeout=timeout, interval=0.1)
        if record is not None and record["status"] in statuses:
            return record
        raise TimeoutError(
            f"mail {mail_id} did not reach {sorted(statuses)} within {timeout:g} s; "
            f"last record: {record}"
        )


def service_env(
    stack: EmulatorStack,
    *,
    smtp_port: int,
    state_dir: Path,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment both local services run with (everything else is the embedded default)."""
    topology = stack.topology
    env = {
        key: value
        for key, value in os.environ.items()
        # Services must see only this stack's settings, not the caller's MAILPIPE_* overrides.
        if not key.startswith("MAILPIPE_")
    }
    env.update(stack.env)
    env.update(
        {
            "MAILPIPE_TOPIC": topology.mail_topic.name,
            "MAILPIPE_SUBSCRIPTION": topology.delivery_subscription.name,
            "MAILPIPE_DEAD_LETTER_SUBSCRIPTION": topology.dead_letter_subscription.name,
            "MAILPIPE_DEAD_LETTER_RECORD_SUBSCRIPTION": (
                topology.dead_letter_record_subscription.name
            ),
            "MAILPIPE_EVENTS_TOPIC": topology.events_topic.name,
            "MAILPIPE_SMTP_HOST": "127.0.0.1",
            "MAILPIPE_SMTP_PORT": str(smtp_port),
            "MAILPIPE_SMTP_TLS": "none",  # the local server is plain SMTP on loopback
            "MAILPIPE_DELIVERY_LEASE_SECONDS": str(
                topology.delivery_subscription.ack_deadline_seconds
            ),
            "MAILPIPE_RECORD": f"sqlite:///{state_dir / 'record.sqlite3'}",
            "MAILPIPE_TRACES": "file",
            "MAILPIPE_TRACE_FILE": str(state_dir / "traces.jsonl"),
            "MAILPIPE_MESSAGE_ID_DOMAIN": "mailpipe.local",
            "MAILPIPE_SUPPRESSION_KEY": local_suppression_key(state_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def local_suppression_key(state_dir: Path) -> str:
    """The local stack's suppression-list key: random, made once per state directory and kept
    there, so the list (hashed, as on GCP by default) outlives a restart of ``./dev up``."""
    path = state_dir / "suppression.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


@contextmanager
def run_local_pipeline(
    *,
    state_dir: Path,
    subscriber_mode: SubscriberMode = "pull",
    publisher_port: int | None = None,
    smtp_port: int | None = None,
    project: str = DEFAULT_LOCAL_PROJECT,
    topology: Topology | None = None,
    extra_env: Mapping[str, str] | None = None,
    reuse_env: bool = True,
    smtp_server: LocalSmtpServer | None = None,
    publisher_env: Mapping[str, str] | None = None,
    subscriber_env: Mapping[str, str] | None = None,
    simulator_domain: str | None = SIMULATOR_DOMAIN,
) -> Iterator[LocalPipeline]:
    """Start everything, yield the running pipeline, stop everything (also on errors/Ctrl-C).

    The local SMTP server runs the mailbox simulator at ``simulator_domain`` (None: off; see
    :class:`emulator.smtp.MailboxSimulator`); a given ``smtp_server`` is used as it is.

    ``extra_env`` goes to both services; ``publisher_env`` / ``subscriber_env`` to one only
    (settings that must differ per process, such as ``MAILPIPE_METRICS_PORT``).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir = state_dir / "logs"
    topology = topology or load_topology()
    publisher_port = publisher_port or free_port()
    subscriber_port = free_port() if subscriber_mode == "push" else None
    push_endpoints: dict[str, str] = {}
    if subscriber_port is not None:
        base = f"http://127.0.0.1:{subscriber_port}"
        push_endpoints = {
            sub.key: base + sub.push_path
            for sub in topology.subscriptions.values()
            if sub.delivery == "push"
        }
    with ExitStack() as stack:
        emulators = stack.enter_context(
            run_emulators(
                project=project,
                topology=topology,
                push_endpoints=push_endpoints,
                log_dir=log_dir,
                reuse_env=reuse_env,
            )
        )
        if smtp_server is None:
            simulator = MailboxSimulator(simulator_domain) if simulator_domain else None
            smtp_server = LocalSmtpServer(
                port=smtp_port or 0, maildir=state_dir / "maildir", simulator=simulator
            )
            smtp_server.start()
            stack.callback(smtp_server.stop)
        env = service_env(
            emulators, smtp_port=smtp_server.port, state_dir=state_dir, extra=extra_env
        )
        publisher_url = f"http://127.0.0.1:{publisher_port}"
        publisher = start_service(
            "publisher",
            ["publisher"],
            env={**env, **(publisher_env or {}), "PORT": str(publisher_port)},
            log_dir=log_dir,
            health_url=f"{publisher_url}/healthz",
        )
        stack.callback(publisher.stop)
        subscriber_url = f"http://127.0.0.1:{subscriber_port}" if subscriber_port else None
        subscriber_port_env = {"PORT": str(subscriber_port)} if subscriber_port else {}
        subscriber = start_service(
            "subscriber",
            ["subscriber", subscriber_mode],
            env={**env, **(subscriber_env or {}), **subscriber_port_env},
            log_dir=log_dir,
            health_url=f"{subscriber_url}/healthz" if subscriber_url else None,
            # The pull worker serves no HTTP: it is ready once its streams are open.
            ready_marker=None if subscriber_url else PULL_READY_MARKER,
        )
        stack.callback(subscriber.stop)
        publisher.wait_healthy()
        subscriber.wait_healthy()
        yield LocalPipeline(
            emulators=emulators,
            smtp=smtp_server,
            publisher=publisher,
            subscriber=subscriber,
            publisher_url=publisher_url,
            subscriber_mode=subscriber_mode,
            state_dir=state_dir,
            service_env=env,
            subscriber_url=subscriber_url,
        )
