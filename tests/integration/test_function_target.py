"""The push endpoint as a functions-framework target, with both bodies Pub/Sub and Eventarc send."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import functions_framework
import pytest

import subscriber
from emulator import RunningEmulator
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import MailStatus, open_record
from mailpipe.topology import Topology
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
