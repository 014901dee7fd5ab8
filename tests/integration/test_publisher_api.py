"""The publisher's HTTP API over real HTTP, publishing to the Pub/Sub emulator over gRPC."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulator import RunningEmulator, delete_topology
from mailpipe.mail import Mailbox, QueuedMail
from mailpipe.record import MailStatus, open_record
from mailpipe.telemetry import setup_telemetry
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.listing import list_mails
from publisher.metrics import PublisherMetrics
from publisher.pubsub import PubSubMailPublisher
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.publishing import Publishing, key_holder, publishing
from tests.fixtures.topology import unique_topology

VALID: dict[str, Any] = {
    "from": "Ada <ada@example.com>",
    "to": ["bob@example.org"],
    "subject": "Hello",
    "text": "Hi Bob",
}


class Api:
    def __init__(self, http: httpx.Client, parts: Publishing) -> None:
        self.http = http
        self.record = parts.record
        self._parts = parts

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        return self.http.post("/v1/messages", json=body, **kwargs)

    def published(self, expect: int = 0) -> list[QueuedMail]:
        """Mails on the topic since the last call (pulled and acked); polls until ``expect``."""
        return self._parts.published(expect)


@pytest.fixture(scope="module")
def api(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    span_exporter: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    with publishing(pubsub_emulator, pubsub_project, tmp_path_factory.mktemp("api")) as parts:
        config = parts.config
        telemetry = setup_telemetry(config.telemetry, span_exporter=span_exporter)
        app = create_app(
            config,
            publisher=parts.publisher,
            record=parts.record,
            metrics=PublisherMetrics(telemetry.meter),
            tracer_provider=telemetry.tracer_provider,
        )
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            api = Api(http, parts)
            api.published()  # start empty
            yield api
        telemetry.shutdown()


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


def test_accepted_mail_is_on_pubsub_with_its_ids(api: Api) -> None:
    response = api.post(VALID)

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert len(body["trace_id"]) == 32
    assert response.headers["Location"] == f"/v1/messages/{body['mail_id']}"
    [published] = api.published(expect=1)
    assert published.mail_id == body["mail_id"]
    assert published.request.to == [Mailbox(address="bob@example.org")]
    record = api.record.get(body["mail_id"])
    assert record.status is MailStatus.QUEUED
    assert record.message_id == body["message_id"]
    assert record.trace_id == body["trace_id"]
    assert record.accepted_at == published.accepted_at
    assert record.recipient_domains == ("example.org",)


def test_every_field_is_carried_to_pubsub(api: Api) -> None:
    mail = {
        **VALID,
        "to": ["Bob <bob@example.org>", "carol@example.org"],
        "cc": ["dave@example.org"],
        "bcc": ["eve@example.org"],
        "reply_to": "support@example.com",
        "subject": "Grüße, 世界",
        "html": "<p>Hi</p>",
        "headers": {"X-Campaign": "spring"},
        "attachments": [
            {
                "filename": "a.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(b"attached").decode(),
            }
        ],
        "metadata": {"customer": 42, "vip": True},
    }
    response = api.post(mail)

    assert response.status_code == 202, response.text
    [published] = api.published(expect=1)
    request = published.request
    assert request.to == [
        Mailbox(name="Bob", address="bob@example.org"),
        Mailbox(address="carol@example.org"),
    ]
    assert request.cc == [Mailbox(address="dave@example.org")]
    assert request.bcc == [Mailbox(address="eve@example.org")]
    assert request.reply_to == [Mailbox(address="support@example.com")]
    assert request.subject == "Grüße, 世界"
    assert request.attachments[0].decoded() == b"attached"
    assert request.metadata == {"customer": 42, "vip": True}
    assert request.recipients == [
        "bob@example.org",
        "carol@example.org",
        "dave@example.org",
        "eve@example.org",
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from": "not an address"}, "from"),
        ({"from": None}, "from"),
        ({"to": []}, "to"),
        ({"to": ["bob@"]}, "to.0"),
        ({"to": "bob@example.org"}, "to"),
        ({"cc": ["x"]}, "cc.0"),
        ({"bcc": ["@example.org"]}, "bcc.0"),
        ({"reply_to": "nope"}, "reply_to.0"),
        ({"subject": "x" * 999}, "subject"),
        ({"subject": 7}, "subject"),
        ({"text": None}, "body"),
        ({"headers": {"Bad Name": "v"}}, "headers"),
        ({"headers": {"Bcc": "spy@example.com"}}, "headers"),
        (
            {"attachments": [{"filename": "a", "content": "!!not base64!!"}]},
            "attachments.0.content",
        ),
        ({"attachments": [{"filename": "", "content": ""}]}, "attachments.0.filename"),
        (
            {"attachments": [{"filename": "a", "content": "", "content_type": "nope"}]},
            "attachments.0.content_type",
        ),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"metadata": {"nested": {"a": 1}}}, "metadata.nested"),
        ({"unknown": 1}, "unknown"),
        ({"to": [f"r{i}@example.org" for i in range(101)]}, "to"),
    ],
)
def test_invalid_field_is_named_in_a_400(api: Api, change: dict[str, Any], field: str) -> None:
    body = {**VALID, **change}
    response = api.post(body)

    error = assert_json_error(response, 400, "invalid_request")
    assert any(name == field or name.startswith(field) for name in error["fields"]), error
    assert api.published() == []


def test_every_bad_field_is_reported_at_once(api: Api) -> None:
    response = api.post({"from": "x", "to": ["y"], "text": "t", "subject": "a\nb"})

    error = assert_json_error(response, 400, "invalid_request")
    assert {"from", "to.0", "subject"} <= set(error["fields"])


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "Hi\r\nBcc: victim@example.com"},
        {"from": "ada@example.com\r\nBcc: victim@example.com"},
        {"to": ["bob@example.org\nBcc: victim@example.com"]},
        {"reply_to": "a@example.com\rX: y"},
        {"headers": {"X-Tag": "v\r\nBcc: victim@example.com"}},
        {"attachments": [{"filename": "a.txt\r\nX: y", "content": ""}]},
        {"from": "Evil\r\n <ada@example.com>"},
    ],
)
def test_header_injection_is_rejected(api: Api, change: dict[str, Any]) -> None:
    response = api.post({**VALID, **change})

    error = assert_json_error(response, 400, "invalid_request")
    assert "header injection" in str(error["fields"]) or "not a valid" in str(error["fields"])
    assert api.published() == []


def test_wrong_content_type_is_415(api: Api) -> None:
    response = api.http.post(
        "/v1/messages", content=b"from=a", headers={"Content-Type": "text/plain"}
    )

    error = assert_json_error(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]


def test_invalid_json_and_invalid_utf8_are_400(api: Api) -> None:
    headers = {"Content-Type": "application/json"}
    assert_json_error(
        api.http.post("/v1/messages", content=b"{", headers=headers), 400, "invalid_json"
    )
    assert_json_error(
        api.http.post("/v1/messages", content=b'{"subject": "\xff"}', headers=headers),
        400,
        "invalid_encoding",
    )
    assert_json_error(
        api.http.post("/v1/messages", content=b"[1]", headers=headers), 400, "invalid_request"
    )


def test_body_over_the_limit_is_413_before_publishing(api: Api) -> None:
    huge = base64.b64encode(b"\0" * 8_000_000).decode()  # 10.7 MB once base64-encoded
    response = api.post({**VALID, "attachments": [{"filename": "big.bin", "content": huge}]})

    error = assert_json_error(response, 413, "request_too_large")
    assert "10 MB" in error["message"]
    assert api.published() == []


def test_mail_that_would_not_fit_a_pubsub_message_is_413(api: Api) -> None:
    # Under the request limit, but with the JSON framing over Pub/Sub's 10,000,000 bytes.
    content = base64.b64encode(b"\0" * 7_493_000).decode()
    response = api.post({**VALID, "attachments": [{"filename": "big.bin", "content": content}]})

    error = assert_json_error(response, 413, "mail_too_large")
    assert "attachments" in error["message"]
    assert api.published() == []


def test_large_mail_under_the_limit_is_accepted_intact(api: Api) -> None:
    payload = bytes(range(256)) * 20_000  # 5 MB: over gRPC's default 4 MiB receive cap
    response = api.post(
        {
            **VALID,
            "attachments": [{"filename": "big.bin", "content": base64.b64encode(payload).decode()}],
        }
    )

    assert response.status_code == 202, response.text
    [published] = api.published(expect=1)
    assert published.request.attachments[0].decoded() == payload


def test_same_idempotency_key_answers_the_original_mail(api: Api) -> None:
    key = f"order-{uuid.uuid4()}"
    first = api.post({**VALID, "idempotency_key": key})
    second = api.post({**VALID, "idempotency_key": key})
    via_header = api.post(VALID, headers={"Idempotency-Key": key})

    assert first.status_code == second.status_code == via_header.status_code == 202
    assert first.json() == second.json() == via_header.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(api.published(expect=1)) == 1


def test_conflicting_idempotency_keys_are_400(api: Api) -> None:
    response = api.post({**VALID, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"})

    error = assert_json_error(response, 400, "invalid_request")
    assert "idempotency_key" in error["fields"]


def test_unknown_route_and_method_are_json(api: Api) -> None:
    assert_json_error(api.http.get("/nope"), 404, "not_found")
    assert_json_error(api.http.delete("/v1/messages"), 405, "method_not_allowed")


def test_status_api_returns_the_record_and_404_for_unknown(api: Api) -> None:
    mail_id = api.post(VALID).json()["mail_id"]
    api.published(expect=1)

    found = api.http.get(f"/v1/messages/{mail_id}")
    assert found.status_code == 200
    assert found.json()["status"] == "queued"
    assert_json_error(api.http.get("/v1/messages/does-not-exist"), 404, "not_found")
    listed = api.http.get("/v1/messages", params={"status": "queued", "limit": 1000}).json()
    assert mail_id in [item["mail_id"] for item in listed["items"]]
    assert_json_error(
        api.http.get("/v1/messages", params={"status": "bogus"}), 400, "invalid_query"
    )
    stats = api.http.get("/v1/stats").json()
    assert stats["oldest_undelivered_age_seconds"] >= 0


def test_openapi_document_describes_the_real_request_schema(api: Api) -> None:
    document = api.http.get("/openapi.json").json()

    schema = document["components"]["schemas"]["MailRequest"]
    assert document["openapi"].startswith("3.")
    assert set(schema["required"]) == {"from", "to"}
    assert schema["additionalProperties"] is False
    operation = document["paths"]["/v1/messages"]["post"]
    assert {"202", "400", "413", "415", "503"} <= set(operation["responses"])
    assert api.http.get("/healthz").json() == {"status": "ok"}


def test_publish_failure_is_503_and_frees_the_idempotency_key(
    pubsub_emulator: RunningEmulator, pubsub_project: str, span_exporter: Any, tmp_path: Path
) -> None:
    # A topic that does not exist: the real client gets NotFound from the emulator.
    topology = unique_topology()
    env = pipeline_env(pubsub_emulator, pubsub_project, topology, tmp_path / "r.sqlite3", 25)
    config = PublisherConfig.from_env(env, topology)
    record = open_record(config.record)
    publisher = PubSubMailPublisher(config.pubsub, timeout=10)
    app = create_app(config, publisher=publisher, record=record)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/messages", json={**VALID, "idempotency_key": "k1"})
        error = assert_json_error(response, 503, "publish_failed")
        assert "retry" in error["message"]
        assert key_holder(record, "k1") is None
        assert list_mails(record).items == []
        keyless = http.post("/v1/messages", json=VALID)
        assert_json_error(keyless, 503, "publish_failed")
        assert list_mails(record).items == []  # nothing recorded for a mail that was never queued
    publisher.close()
    record.close()
    delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)
