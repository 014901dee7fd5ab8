"""The push endpoint as a functions-framework target, with both bodies Pub/Sub and Eventarc send."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import functions_framework
import httpx
import pytest

import subscriber
from emulator import RunningEmulator
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus, open_record
from mailpipe.topology import Topology
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import pipeline_env

SOURCE = Path(subscriber.__file__).with_name("function.py")


@pytest.fixture
def function_client(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
    smtp_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    env = pipeline_env(
        pubsub_emulator, pubsub_project, mail_topology, tmp_path / "r.sqlite3", smtp_server.port
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # create_app sets FUNCTION_TARGET and FUNCTION_NAME for the process; registering them with
    # monkeypatch undoes that afterwards, so later tests (GCP resource detection) do not think
    # they run on Cloud Functions.
    for name in ("FUNCTION_TARGET", "FUNCTION_NAME"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    app = functions_framework.create_app(target="deliver", source=str(SOURCE))
    yield app.test_client()


def queued(subject: str) -> QueuedMail:
    request = MailRequest.model_validate(
        {"from": "a@example.com", "to": ["b@example.org"], "subject": subject, "text": "x"}
    )
    return QueuedMail.accept(request)


def push_message(mail: QueuedMail, message_id: str) -> dict[str, Any]:
    data, attributes = mail.to_pubsub()
    return {
        "data": base64.b64encode(data).decode(),
        "attributes": attributes,
        "messageId": message_id,
        "publishTime": "2026-11-23T10:00:00Z",
    }


def test_pubsub_push_envelope_is_delivered(function_client: Any, smtp_server: Any) -> None:
    mail = queued("via push envelope")
    envelope = {"message": push_message(mail, "101"), "subscription": "projects/p/subscriptions/s"}

    response = function_client.post("/", json=envelope)

    assert response.status_code == 204
    [received] = smtp_server.wait_for(1)
    assert received.message["Subject"] == "via push envelope"


def test_cloudevent_binary_form_is_delivered(
    function_client: Any, smtp_server: Any, tmp_path: Path
) -> None:
    mail = queued("via cloudevent")
    body = {"message": push_message(mail, "102"), "subscription": "projects/p/subscriptions/s"}
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
        "ce-id": "102",
        "Content-Type": "application/json",
    }

    response = function_client.post("/", data=json.dumps(body), headers=headers)

    assert response.status_code == 204
    [received] = smtp_server.wait_for(1)
    assert received.message["Subject"] == "via cloudevent"
    record = open_record(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    assert record.get(mail.mail_id).status is MailStatus.DELIVERED
    record.close()


def test_malformed_push_is_400_json(function_client: Any, smtp_server: Any) -> None:
    response = function_client.post("/", json={"message": {"data": "???"}})

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "malformed_push"
    assert smtp_server.messages == []


# --- every answer is JSON (issue 16), served over real HTTP ----------------------------------


def json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] and error["message"]
    return error


@pytest.fixture
def function_url(function_client: Any) -> Iterator[str]:
    with serve_app(function_client.application) as url:
        yield url


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_method_other_than_post_is_a_json_405(function_url: str, method: str) -> None:
    response = httpx.request(method, f"{function_url}/", timeout=30)
    json_error(response, 405)
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/robots.txt", "/favicon.ico"])
def test_the_frameworks_own_404s_are_json(function_url: str, path: str) -> None:
    json_error(httpx.get(f"{function_url}{path}", timeout=30), 404)


def test_a_hostile_body_is_a_json_400(function_url: str) -> None:
    response = httpx.post(
        f"{function_url}/",
        content=b"[" * 50_000 + b"]" * 50_000,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert json_error(response, 400)["code"] == "malformed_push"


def test_a_failure_to_start_the_handler_is_a_json_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside local mode without MAILPIPE_PUSH_AUDIENCE the handler refuses to start (no
    endpoint anyone could POST mail to): the push gets a logged JSON 500, not the framework's
    text page."""
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("MAILPIPE_PUSH_AUDIENCE", raising=False)
    monkeypatch.setenv("MAILPIPE_RECORD", f"sqlite:///{tmp_path / 'r.sqlite3'}")
    for name in ("FUNCTION_TARGET", "FUNCTION_NAME"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    app = functions_framework.create_app(target="deliver", source=str(SOURCE))
    with serve_app(app) as url:
        response = httpx.post(f"{url}/", json={"message": {}}, timeout=30)
    assert json_error(response, 500)["code"] == "internal"


def test_a_handler_that_fails_to_start_leaves_nothing_running(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    mail_topology: Topology,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host retries the start on every push: a record that cannot be opened must not leave
    a Telemetry (its span exporter's thread) and an SMTP pool behind each time."""
    env = pipeline_env(pubsub_emulator, pubsub_project, mail_topology, tmp_path / "r.sqlite3", 25)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("MAILPIPE_RECORD", f"sqlite:///{tmp_path / 'not-a-dir' / 'r.sqlite3'}")
    monkeypatch.setenv("MAILPIPE_TRACES", "file")
    monkeypatch.setenv("MAILPIPE_TRACE_FILE", str(tmp_path / "spans.jsonl"))
    for name in ("FUNCTION_TARGET", "FUNCTION_NAME"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    app = functions_framework.create_app(target="deliver", source=str(SOURCE))
    with serve_app(app) as url:
        assert httpx.post(f"{url}/", json={"message": {}}, timeout=30).status_code == 500
        threads = _threads_besides_requests()
        for _ in range(3):
            assert httpx.post(f"{url}/", json={"message": {}}, timeout=30).status_code == 500
        assert _threads_besides_requests() == threads


def _threads_besides_requests() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if "process_request" not in t.name)
