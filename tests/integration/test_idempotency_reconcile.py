"""Idempotency keys and reconcile, end to end: the real publisher app over real HTTP, the real
Pub/Sub client against the emulator, each record backend (an SQLite file; Google's Firestore
emulator), the real delivery core and SMTP server, and ``mailpipe reconcile`` / ``mailpipe
status`` as a user runs them.

Stand-ins, each at a boundary that cannot run here: ``identify_caller`` reads an ``X-Test-Caller``
header in place of the Cloud Run-verified ID token the production function reads; a crash is a
publisher collaborator that SIGKILLs its own process, or one that raises; a failed record write is
a record wrapper whose ``finish`` raises :class:`RecordUnavailable`. Time is the records' injected
clock (the crashed child process used the real one), so expiry needs no sleeping.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from werkzeug.serving import make_server

from emulator import RunningEmulator, subscriber_client
from emulator.smtp import LocalSmtpServer
from mailpipe.mail import QueuedMail
from mailpipe.record import DeliveryRecord, MailStatus, RecordUnavailable
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.record.sqlite import SqliteRecord
from mailpipe.topology import Topology
from ops.cli import main as cli_main
from ops.cli import reconcile as reconcile_cli
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.listing import list_mails
from publisher.main import oldest_undelivered_age
from publisher.metrics import PublisherMetrics
from publisher.pubsub import PubSubMailPublisher
from publisher.reconcile import stuck_counts
from subscriber.delivery import DeliveryService, Outcome, ReceivedMessage
from subscriber.smtp import SmtpSender
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.publishing import key_holder
from tests.fixtures.smtp import make_smtp_config
from tests.fixtures.telemetry import metric_points
from tests.fixtures.topic import pull_acked

MAIL: dict[str, Any] = {
    "from": "Ada <ada@example.com>",
    "to": ["bob@example.org"],
    "subject": "Invoice 42",
    "text": "Hi Bob",
}
RESERVATION = 300.0
GRACE = 120.0
LEASE = 60.0
CALLER_HEADER = "X-Test-Caller"


class FakeClock:
    """The record's and the app's clock: starts now, moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def caller_from_test_header(request: Any) -> str | None:
    """Stands in for the Cloud Run identity function: names the caller from a test header."""
    return request.headers.get(CALLER_HEADER)


@dataclass(frozen=True)
class Store:
    """Where the record lives, so a second handle (or process) opens the same one."""

    backend: str
    sqlite_path: Path | None = None
    project: str = ""
    suffix: str = ""

    def open(self, clock: Callable[[], dt.datetime] | None = None) -> DeliveryRecord:
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        if self.backend == "sqlite":
            assert self.sqlite_path is not None
            return SqliteRecord(self.sqlite_path, **kwargs)
        return FirestoreRecord(
            project=self.project,
            collection=f"mails-{self.suffix}",
            idempotency_collection=f"keys-{self.suffix}",
            **kwargs,
        )


@dataclass
class Service:
    """The publisher app served over HTTP, its record, its clock and its topic."""

    url: str
    http: httpx.Client
    record: DeliveryRecord
    clock: FakeClock
    store: Store
    env: dict[str, str]
    pull: Callable[[], list[ReceivedMessage]]
    received: list[ReceivedMessage] = field(default_factory=list)

    def post(self, body: Any, *, caller: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if caller is not None:
            headers[CALLER_HEADER] = caller
        return self.http.post("/v1/messages", json=body, headers=headers, **kwargs)

    def published(self) -> list[QueuedMail]:
        """Every mail on the topic so far (pulled and acknowledged; none is delivered here)."""
        self.received += self.pull()
        return [QueuedMail.from_pubsub(m.data, dict(m.attributes)) for m in self.received]

    def stats(self) -> dict[str, Any]:
        response = self.http.get("/v1/stats")
        assert response.status_code == 200, response.text
        return dict(response.json())


class FailingOncePublisher:
    """The real publisher, except that its first publish raises what ``error`` makes."""

    def __init__(self, real: PubSubMailPublisher, error: Callable[[], BaseException]) -> None:
        self._real = real
        self._error: Callable[[], BaseException] | None = error

    def publish(self, mail: QueuedMail) -> str:
        if self._error is not None:
            error, self._error = self._error, None
            raise error()
        return self._real.publish(mail)

    def close(self) -> None:
        self._real.close()


@pytest.fixture(params=["sqlite", "firestore"])
def store(request: pytest.FixtureRequest, tmp_path: Path, pubsub_project: str) -> Store:
    if request.param == "sqlite":
        return Store("sqlite", sqlite_path=tmp_path / "record.sqlite3")
    request.getfixturevalue("firestore_emulator")  # sets FIRESTORE_EMULATOR_HOST
    return Store("firestore", project=pubsub_project, suffix=uuid.uuid4().hex[:10])


@pytest.fixture
def service_env(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
    tmp_path: Path,
) -> dict[str, str]:
    env = pipeline_env(pubsub_emulator, pubsub_project, mail_topology, tmp_path / "unused", 25)
    env["MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS"] = str(RESERVATION)
    env["MAILPIPE_RECONCILE_GRACE_SECONDS"] = str(GRACE)
    env["MAILPIPE_PUBLISH_TIMEOUT"] = "10"
    return env


@pytest.fixture
def make_service(
    store: Store,
    service_env: dict[str, str],
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
) -> Iterator[Callable[..., Service]]:
    """Factory: the publisher app on its own port; ``wrap`` wraps the real Pub/Sub publisher."""
    config = PublisherConfig.from_env(service_env, mail_topology)
    subscriber = subscriber_client(pubsub_emulator.host)
    subscription = subscriber.subscription_path(
        pubsub_project, mail_topology.delivery_subscription.name
    )
    clock = FakeClock()
    record = store.open(clock)
    stack: list[Any] = []

    def pull() -> list[ReceivedMessage]:
        return [
            ReceivedMessage(
                data=m.message.data,
                attributes=dict(m.message.attributes),
                message_id=m.message.message_id,
            )
            for m in pull_acked(subscriber, subscription)
        ]

    def make(wrap: Callable[[PubSubMailPublisher], Any] = lambda p: p) -> Service:
        real = PubSubMailPublisher(config.pubsub, timeout=10)
        app = create_app(
            config,
            publisher=wrap(real),
            record=record,
            identify_caller=caller_from_test_header,
            clock=clock,
        )
        serving = serve_app(app)
        url = serving.__enter__()
        http = httpx.Client(base_url=url, timeout=30)
        stack.append((serving, http, real))
        return Service(url, http, record, clock, store, service_env, pull)

    yield make
    for serving, http, real in stack:
        http.close()
        serving.__exit__(None, None, None)
        real.close()
    record.close()
    subscriber.close()


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    return make_service()


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return dict(error)


def reconcile(service: Service, *flags: str) -> tuple[int, list[dict[str, Any]]]:
    """``mailpipe reconcile FLAGS --json`` on the service's record, at the service's time: the
    exit code and the JSON lines it printed."""
    parser = argparse.ArgumentParser()
    reconcile_cli.add_arguments(parser)
    args = parser.parse_args([*flags, "--json"])
    out = _Capture()
    saved, sys.stdout = sys.stdout, out  # type: ignore[assignment]
    try:
        code = reconcile_cli.run(
            args, record=service.record, environ=service.env, now=service.clock
        )
    finally:
        sys.stdout = saved
    return code, [json.loads(line) for line in out.text.splitlines() if line.strip()]


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# --- the same key -----------------------------------------------------------------------------


def test_the_same_key_with_a_different_request_is_422_and_nothing_is_published(
    service: Service,
) -> None:
    key = f"invoice-{uuid.uuid4()}"
    first = service.post({**MAIL, "idempotency_key": key})
    assert first.status_code == 202, first.text

    changed = service.post({**MAIL, "subject": "Invoice 43", "idempotency_key": key})
    by_header = service.post({**MAIL, "text": "other"}, headers={"Idempotency-Key": key})

    error = assert_json_error(changed, 422, "idempotency_key_reused")
    assert "idempotency_key" in error["fields"]
    assert "Idempotent-Replayed" not in changed.headers
    assert first.json()["mail_id"] not in changed.text  # the other mail's ids are not told
    assert_json_error(by_header, 422, "idempotency_key_reused")
    assert [m.mail_id for m in service.published()] == [first.json()["mail_id"]]
    again = service.post({**MAIL, "idempotency_key": key})  # the original is still answered
    assert again.status_code == 202
    assert again.json() == first.json()


def test_the_same_request_reordered_or_keyed_by_header_gets_the_original_answer(
    service: Service,
) -> None:
    key = f"invoice-{uuid.uuid4()}"
    body = (
        f'{{"idempotency_key": "{key}", "from": "Ada <ada@example.com>", '
        '"to": ["bob@example.org"], "subject": "Invoice 42", "text": "Hi Bob", '
        '"reply_to": "ada@example.com", "metadata": {"order": 42, "vip": true}}'
    )
    first = service.http.post(
        "/v1/messages", content=body, headers={"Content-Type": "application/json"}
    )
    assert first.status_code == 202, first.text

    # Members reordered (metadata too), the key by header in the IETF draft's quoted form,
    # defaults spelled out and a one-item list for reply_to: the same validated request.
    reordered = {
        "metadata": {"vip": True, "order": 42},
        "text": "Hi Bob",
        "subject": "Invoice 42",
        "reply_to": ["ada@example.com"],
        "cc": [],
        "to": ["bob@example.org"],
        "from": "Ada <ada@example.com>",
    }
    retries = [
        service.post(reordered, headers={"Idempotency-Key": f'"{key}"'}),
        service.post({**reordered, "idempotency_key": key}),
        service.post(reordered, headers={"Idempotency-Key": key}),
    ]

    for retry in retries:
        assert retry.status_code == 202, retry.text
        assert retry.json() == first.json()
        assert retry.headers["Idempotent-Replayed"] == "true"
    assert [m.mail_id for m in service.published()] == [first.json()["mail_id"]]


def test_a_malformed_or_repeated_idempotency_header_is_400(service: Service) -> None:
    repeated = service.http.post(
        "/v1/messages",
        json=MAIL,
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    repeated_quoted = service.http.post(
        "/v1/messages",
        json=MAIL,
        headers=[("Idempotency-Key", '"a"'), ("Idempotency-Key", '"b"')],
    )
    bad_escape = service.post(MAIL, headers={"Idempotency-Key": '"a\\x"'})

    for response in (repeated, repeated_quoted, bad_escape):
        error = assert_json_error(response, 400, "invalid_request")
        assert "Idempotency-Key" in error["fields"]
    quoted_comma = service.post(MAIL, headers={"Idempotency-Key": '"a,b"'})
    assert quoted_comma.status_code == 202, quoted_comma.text  # one quoted key may hold a comma
    assert [m.mail_id for m in service.published()] == [quoted_comma.json()["mail_id"]]


# --- scope ------------------------------------------------------------------------------------


def test_keys_are_scoped_to_the_caller(service: Service) -> None:
    key = f"invoice-{uuid.uuid4()}"
    alice = service.post({**MAIL, "idempotency_key": key}, caller="alice@example.com")
    bob = service.post({**MAIL, "idempotency_key": key}, caller="bob@example.com")
    anonymous = service.post({**MAIL, "idempotency_key": key})  # no identity: the shared scope

    ids = [r.json()["mail_id"] for r in (alice, bob, anonymous)]
    assert [r.status_code for r in (alice, bob, anonymous)] == [202, 202, 202]
    assert len(set(ids)) == 3  # bob reusing alice's key learns nothing of her mail
    assert "Idempotent-Replayed" not in bob.headers
    for caller, original in (("alice@example.com", alice), ("bob@example.com", bob)):
        retry = service.post({**MAIL, "idempotency_key": key}, caller=caller)
        assert retry.json() == original.json()
        assert retry.headers["Idempotent-Replayed"] == "true"
    # Within a scope a different request is still refused, whoever else used the key.
    assert_json_error(
        service.post({**MAIL, "subject": "x", "idempotency_key": key}, caller="bob@example.com"),
        422,
        "idempotency_key_reused",
    )
    assert sorted(m.mail_id for m in service.published()) == sorted(ids)


# --- failures before the publish --------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        lambda: RuntimeError("injected: a bug in the publish path"),
        lambda: TimeoutError("injected: a timeout outside the client library"),
    ],
    ids=["bug", "timeout"],
)
def test_any_failure_before_the_publish_releases_the_key(
    make_service: Callable[..., Service], error: Callable[[], BaseException]
) -> None:
    service = make_service(wrap=lambda real: FailingOncePublisher(real, error))
    key = f"invoice-{uuid.uuid4()}"

    failed = service.post({**MAIL, "idempotency_key": key})
    assert_json_error(failed, 500, "internal")
    assert key_holder(service.record, key) is None
    assert list_mails(service.record).items == []

    retry = service.post({**MAIL, "idempotency_key": key})
    assert retry.status_code == 202, retry.text  # not a 409 for a request that never published
    assert "Idempotent-Replayed" not in retry.headers
    assert [m.mail_id for m in service.published()] == [retry.json()["mail_id"]]


class _KillingPublisher:
    """A publisher collaborator that SIGKILLs its own process: a crash right after the key was
    reserved (the instance killed, out of memory...). Nothing after it runs."""

    def publish(self, mail: QueuedMail) -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


def _serve_then_crash(env: dict[str, str], store: Store, ports: Any) -> None:
    """In a child process: the publisher app on the shared record, with the killing publisher."""
    config = PublisherConfig.from_env(env)
    app = create_app(config, publisher=_KillingPublisher(), record=store.open())  # type: ignore[arg-type]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    ports.put(server.server_port)
    server.serve_forever()


def crash_with_a_reserved_key(service: Service, key: str) -> None:
    """POST ``key`` to a publisher process that dies between the reserve and the publish."""
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    child = ctx.Process(target=_serve_then_crash, args=(service.env, service.store, ports))
    child.start()
    try:
        port = ports.get(timeout=120)
        with pytest.raises(httpx.TransportError):
            httpx.post(
                f"http://127.0.0.1:{port}/v1/messages",
                json={**MAIL, "idempotency_key": key},
                timeout=60,
            )
        child.join(timeout=60)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_a_crash_between_reserve_and_publish_is_seen_expires_and_is_released_by_reconcile(
    service: Service, metric_meter: Any, metric_reader: Any
) -> None:
    metrics = PublisherMetrics(metric_meter)
    metrics.set_stuck_source(stuck_counts(service.record, grace_seconds=GRACE, clock=service.clock))
    key = f"invoice-{uuid.uuid4()}"
    crash_with_a_reserved_key(service, key)

    held = key_holder(service.record, key)
    assert held is not None
    assert held.status is MailStatus.ACCEPTING
    assert_json_error(service.post({**MAIL, "idempotency_key": key}), 409, "idempotency_conflict")
    # The lag metric and /v1/stats see the reservation from the start...
    stats = service.stats()
    assert stats["oldest_undelivered_mail_id"] == held.mail_id
    assert oldest_undelivered_age(service.record, clock=service.clock)() is not None
    assert stats["stuck"]["expired_reservations"] == 0  # ...it may still be publishing
    assert reconcile(service)[0] == 0

    service.clock.advance(RESERVATION + 60)
    stats = service.stats()
    assert stats["stuck"]["expired_reservations"] == 1
    assert [m["mail_id"] for m in stats["stuck"]["mails"]] == [held.mail_id]
    assert service.http.get(f"/v1/messages/{held.mail_id}").json()["stuck"]["kind"] == (
        "expired_reservation"
    )
    gauge = metric_points(metric_reader)["mailpipe.mails.stuck"]
    assert {p.attributes["mailpipe.stuck.kind"]: p.value for p in gauge}["expired_reservation"] == 1
    code, lines = reconcile(service)
    assert code == reconcile_cli.EXIT_STUCK
    assert [(line["message"], line["mail_id"]) for line in lines[:-1]] == [
        ("stuck mail", held.mail_id)
    ]
    assert lines[-1]["message"] == "reconcile finished"
    assert lines[-1]["expired_reservations"] == 1
    assert service.record.get(held.mail_id) is not None  # the report changes nothing

    code, lines = reconcile(service, "--fix")
    assert code == 0
    assert lines[0]["action"] == "released"
    assert lines[-1]["released"] == 1
    assert service.record.get(held.mail_id) is None
    assert service.stats()["stuck"]["expired_reservations"] == 0
    gauge = metric_points(metric_reader)["mailpipe.mails.stuck"]
    assert {p.attributes["mailpipe.stuck.kind"]: p.value for p in gauge}["expired_reservation"] == 0
    assert reconcile(service, "--fix")[0] == 0  # nothing left: a scheduled run is a no-op

    retry = service.post({**MAIL, "idempotency_key": key})
    assert retry.status_code == 202, retry.text
    assert [m.mail_id for m in service.published()] == [retry.json()["mail_id"]]


def test_a_crashed_reservation_is_taken_over_by_the_retry_once_expired(service: Service) -> None:
    key = f"invoice-{uuid.uuid4()}"
    crash_with_a_reserved_key(service, key)
    held = key_holder(service.record, key)
    assert held is not None

    service.clock.advance(RESERVATION + 60)
    retry = service.post({**MAIL, "idempotency_key": key})

    assert retry.status_code == 202, retry.text
    assert retry.json()["mail_id"] != held.mail_id
    assert service.record.get(held.mail_id) is None
    assert [m.mail_id for m in service.published()] == [retry.json()["mail_id"]]
    assert service.stats()["stuck"]["expired_reservations"] == 0


# --- stuck deliveries -------------------------------------------------------------------------


class FinishFailsRecord:
    """The record, except that writing an attempt's outcome fails (Firestore or the disk down
    right after the relay's answer)."""

    def __init__(self, record: DeliveryRecord) -> None:
        self._record = record

    def finish(self, mail_id: str, attempt: Any) -> Any:
        raise RecordUnavailable("injected: the record is unreachable after the relay's answer")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record, name)


def delivery(record: Any, server: LocalSmtpServer) -> tuple[DeliveryService, SmtpSender]:
    tracer = TracerProvider().get_tracer("tests")
    sender = SmtpSender(make_smtp_config(server), tracer=tracer)
    service = DeliveryService(
        sender=sender,
        record=record,
        tracer=tracer,
        message_id_domain="mailpipe.test",
        lease_seconds=LEASE,
    )
    return service, sender


def test_a_delivery_whose_final_write_failed_is_found_and_marked_unconfirmed(
    service: Service, smtp_server: LocalSmtpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    accepted = service.post(MAIL)
    assert accepted.status_code == 202
    mail_id = accepted.json()["mail_id"]
    service.published()
    [message] = service.received
    core, sender = delivery(FinishFailsRecord(service.record), smtp_server)
    try:
        result = core.deliver(message, parent=None)
    finally:
        sender.close()
    assert result.outcome is Outcome.DELIVERED  # the relay said 250: acknowledged, never again
    assert len(smtp_server.messages) == 1
    stuck = service.record.get(mail_id)
    assert stuck is not None
    assert stuck.status is MailStatus.SENDING  # before: `sending` forever

    service.clock.advance(LEASE + GRACE - 1)
    assert service.stats()["stuck"]["stalled_deliveries"] == 0  # a redelivery may be coming
    service.clock.advance(2)
    stats = service.stats()
    assert stats["stuck"]["stalled_deliveries"] == 1
    assert stats["stuck"]["mails"][0]["mail_id"] == mail_id
    assert stats["oldest_undelivered_mail_id"] == mail_id  # the lag alert sees it
    assert cli_main(["status", "--url", service.url]) == reconcile_cli.EXIT_STUCK
    assert mail_id in capsys.readouterr().out
    assert reconcile(service)[0] == reconcile_cli.EXIT_STUCK

    code, lines = reconcile(service, "--fix")

    assert code == 0
    assert (lines[0]["mail_id"], lines[0]["action"]) == (mail_id, "marked_unconfirmed")
    settled = service.record.get(mail_id)
    assert settled is not None
    assert settled.status is MailStatus.UNCONFIRMED
    assert settled.last_error is not None
    assert "never recorded" in settled.last_error
    assert not settled.status.final  # a copy Pub/Sub still held would be claimed and delivered
    stats = service.stats()
    assert (stats["stuck"]["stalled_deliveries"], stats["stuck"]["unconfirmed"]) == (0, 1)
    assert stats["oldest_undelivered_mail_id"] is None
    assert cli_main(["status", "--url", service.url]) == 0
    assert cli_main(["status", mail_id, "--url", service.url]) == 0
    assert "unconfirmed" in capsys.readouterr().out
    listed = service.http.get("/v1/messages", params={"status": "unconfirmed"}).json()
    assert [item["mail_id"] for item in listed["items"]] == [mail_id]


def test_a_delivery_whose_worker_died_is_settled_then_delivered_by_the_redelivery(
    service: Service, smtp_server: LocalSmtpServer
) -> None:
    mail_id = service.post(MAIL).json()["mail_id"]
    service.published()
    [message] = service.received
    # The delivery core's claim, then its worker is killed before the relay is reached.
    claim = service.record.claim(
        mail_id, message_id=message.message_id, trace_id=None, lease_seconds=LEASE
    )
    assert claim.attempt_number == 1
    service.clock.advance(LEASE + GRACE + 1)

    code, lines = reconcile(service, "--fix")
    assert code == 0
    assert lines[0]["action"] == "marked_unconfirmed"

    # Pub/Sub redelivers the unacknowledged message: the mail is sent, once.
    core, sender = delivery(service.record, smtp_server)
    try:
        result = core.deliver(message, parent=None)
    finally:
        sender.close()
    assert result.outcome is Outcome.DELIVERED
    assert len(smtp_server.messages) == 1
    done = service.record.get(mail_id)
    assert done is not None
    assert (done.status, done.attempt_count) == (MailStatus.DELIVERED, 2)
    assert reconcile(service)[0] == 0
    assert service.stats()["stuck"]["unconfirmed"] == 0


def test_reconcile_fix_as_the_scheduled_job_runs_it(
    store: Store, service_env: dict[str, str], tmp_path: Path, pubsub_project: str
) -> None:
    # The Cloud Run job's command line, in a process without the `emulator` and `subscriber`
    # packages (the publisher image lacks them), on the backend's own URL: JSON lines, exit 0.
    past = FakeClock()
    past.advance(-3600)  # records written an hour ago, judged by the job's real clock
    env = {**os.environ, **service_env}
    if store.backend == "firestore":
        project = f"reconcile-job-{uuid.uuid4().hex[:8]}"  # default collection names, own project
        seed: DeliveryRecord = FirestoreRecord(project=project, clock=past)
        env.update(GOOGLE_CLOUD_PROJECT=project, MAILPIPE_RECORD="firestore://(default)")
    else:
        seed = SqliteRecord(tmp_path / "job.sqlite3", clock=past)
        env["MAILPIPE_RECORD"] = f"sqlite:///{tmp_path / 'job.sqlite3'}"
    accepted = past()
    crashed = f"mail-{uuid.uuid4().hex}"
    seed.reserve(mail_id=crashed, accepted_at=accepted, recipient_domains=(), idempotency_key="k")
    stalled = f"mail-{uuid.uuid4().hex}"
    seed.reserve(mail_id=stalled, accepted_at=accepted, recipient_domains=(), idempotency_key=None)
    seed.mark_queued(stalled, message_id="1", trace_id=None)
    seed.claim(stalled, message_id="1", trace_id=None, lease_seconds=LEASE)
    env["CLOUD_RUN_JOB"] = "mailpipe-reconcile"
    program = (
        "import sys; sys.modules['emulator'] = sys.modules['subscriber'] = None; "
        "from ops.cli import main; sys.exit(main(sys.argv[1:]))"
    )

    def run_job() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", program, "reconcile", "--fix"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    job = run_job()

    assert job.returncode == 0, job.stderr
    lines = [json.loads(line) for line in job.stdout.splitlines()]
    assert {line["mail_id"]: line["action"] for line in lines[:-1]} == {
        crashed: "released",
        stalled: "marked_unconfirmed",
    }
    assert [line["severity"] for line in lines] == ["WARNING"] * 3  # stuck mails: worth a look
    summary = lines[-1]
    assert summary["message"] == "reconcile finished"
    assert (summary["released"], summary["marked_unconfirmed"], summary["exit_code"]) == (1, 1, 0)
    assert summary["unconfirmed"] == 1
    assert summary["serviceContext"] == {"service": "mailpipe-reconcile"}
    assert seed.get(crashed) is None
    settled = seed.get(stalled)
    assert settled is not None
    assert settled.status is MailStatus.UNCONFIRMED
    again = run_job()
    assert again.returncode == 0, again.stderr  # nothing stuck any more: a quiet INFO line
    [quiet] = [json.loads(line) for line in again.stdout.splitlines()]
    assert (quiet["severity"], quiet["unconfirmed"], quiet["released"]) == ("INFO", 1, 0)
    seed.close()


def test_reconcile_exit_codes_for_failures_and_usage(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sqlite3"
    assert cli_main(["reconcile", "--record", str(missing)]) == 2
    assert "no delivery record" in capsys.readouterr().err
    assert cli_main(["reconcile", "--grace", "-1", "--record", str(missing)]) == 2

    class DownStore:  # a backend that cannot be reached
        def query(self, *_: Any) -> Any:
            raise RecordUnavailable("injected: the record is unreachable")

        def close(self) -> None:
            pass

    parser = argparse.ArgumentParser()
    reconcile_cli.add_arguments(parser)
    down = DeliveryRecord(DownStore())  # type: ignore[arg-type]
    code = reconcile_cli.run(
        parser.parse_args(["--fix", "--json"]), record=down, environ=service.env
    )
    assert code == 1
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (line["severity"], line["message"], line["exit_code"]) == (
        "ERROR",
        "reconcile failed",
        1,
    )


def test_the_openapi_document_lists_422_and_the_stuck_records(service: Service) -> None:
    document = service.http.get("/openapi.json").json()

    post = document["paths"]["/v1/messages"]["post"]
    assert {"202", "400", "409", "422", "503"} <= set(post["responses"])
    stats = document["paths"]["/v1/stats"]["get"]["responses"]["200"]
    properties = stats["content"]["application/json"]["schema"]["properties"]
    assert {"expired_reservations", "stalled_deliveries", "unconfirmed", "mails"} <= set(
        properties["stuck"]["properties"]
    )
    statuses = document["components"]["schemas"]["MailRecord"]["properties"]["status"]["enum"]
    assert "unconfirmed" in statuses
