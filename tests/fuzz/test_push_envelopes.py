"""Malformed push envelopes and CloudEvents sent to the real push endpoint over HTTP.

Hostile input (issue 16) too: JSON nested past the depth limit, integers past Python's digit
limit, lone surrogates in any field get 400; a wrong path, method or size gets a JSON 404, 405,
413, and an unexpected failure a JSON 500 — never an HTML page.

Anything that is not a Pub/Sub push message gets 400 with a JSON error (never 500, never an
ack), and nothing reaches the SMTP server. A well-formed message whose data is not a mailpipe
mail is not acked either (503: it ends on the dead-letter topic, where it is visible). Unknown
attributes and fields are ignored.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from emulator.smtp import LocalSmtpServer
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import open_record
from subscriber.config import SubscriberConfig
from subscriber.dead_letters import DeadLetterRecorder
from subscriber.push import PUBSUB_EVENT_TYPE, PushHandler, create_push_app
from tests.fixtures.http import serve_app
from tests.fixtures.pipeline import local_push_endpoint
from tests.fuzz.hostile import with_hostile_leaf

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def relay() -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer() as server:
        yield server


@pytest.fixture(scope="module")
def push_url(relay: LocalSmtpServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The push endpoint in local mode (no token), with the real delivery core behind it."""
    record_path = tmp_path_factory.mktemp("push-fuzz") / "record.sqlite3"
    with local_push_endpoint(relay, record_path) as (url, _):
        yield url


@pytest.fixture(scope="module")
def http(push_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=push_url, timeout=30) as client:
        yield client


def check_refused(response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    assert response.status_code in (400, 503), (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"]


def valid_envelope(**message: Any) -> dict[str, Any]:
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
        )
    )
    data, attributes = mail.to_pubsub()
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes,
            "messageId": "42",
            **message,
        },
        "subscription": "projects/p/subscriptions/s",
    }


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "data": json_values | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()),
        "attributes": json_values | st.dictionaries(st.text(max_size=8), st.text(max_size=8)),
        "messageId": json_values,
        "message_id": json_values,
        "publishTime": json_values,
    },
)
envelopes = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"message": messages | json_values},
        optional={"subscription": json_values, "deliveryAttempt": json_values},
    ),
)


@FUZZ
@given(body=envelopes)
def test_random_envelopes_are_refused_cleanly(
    http: httpx.Client, relay: LocalSmtpServer, body: Any
) -> None:
    sent_before = len(relay.messages)
    response = http.post("/", json=body)
    # Random data can never decode to a mailpipe mail, so nothing may be acked or sent.
    check_refused(response)
    assert len(relay.messages) == sent_before


@FUZZ
@given(
    raw=st.binary(max_size=200),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/cloudevents+json",
            "text/plain",
            "application/octet-stream",
        ]
    ),
)
def test_random_bytes_are_refused_cleanly(
    http: httpx.Client, raw: bytes, content_type: str
) -> None:
    response = http.post("/", content=raw, headers={"Content-Type": content_type})
    check_refused(response)


@FUZZ
@given(
    headers=st.fixed_dictionaries(
        {"ce-specversion": st.sampled_from(["1.0", "0.3", "", "9"])},
        optional={
            "ce-type": st.sampled_from([PUBSUB_EVENT_TYPE, "other.type", ""]),
            "ce-id": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126)),
            "ce-source": st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126)),
        },
    ),
    body=json_values,
)
def test_malformed_binary_cloudevents_are_refused_cleanly(
    http: httpx.Client, headers: dict[str, str], body: Any
) -> None:
    response = http.post(
        "/",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    check_refused(response)


@pytest.mark.parametrize(
    "event",
    [
        {"specversion": "1.0"},
        {"specversion": "1.0", "type": PUBSUB_EVENT_TYPE, "source": "s", "id": "1"},
        {"specversion": "1.0", "type": "not.pubsub", "source": "s", "id": "1", "data": {}},
        {"specversion": "1.0", "type": PUBSUB_EVENT_TYPE, "source": "s", "id": "1", "data": "x"},
        {"specversion": "1.0", "type": PUBSUB_EVENT_TYPE, "source": "s", "id": "1", "data": []},
        [],
        "text",
    ],
)
def test_malformed_structured_cloudevents_get_400(http: httpx.Client, event: Any) -> None:
    response = http.post(
        "/",
        content=json.dumps(event).encode(),
        headers={"Content-Type": "application/cloudevents+json"},
    )
    check_refused(response)
    assert response.status_code == 400


@pytest.mark.parametrize("path", ["/", "/dead-letter"])
def test_unknown_attributes_and_fields_are_ignored(
    http: httpx.Client, relay: LocalSmtpServer, path: str
) -> None:
    envelope = valid_envelope()
    envelope["message"]["attributes"]["x-unknown"] = "whatever\r\nInjected: yes"
    envelope["message"]["orderingKey"] = "k"
    envelope["unexpected"] = {"nested": [1, 2]}
    sent_before = len(relay.messages)

    response = http.post(path, json=envelope)

    assert response.status_code == 204, response.text
    if path == "/":
        [*_, received] = relay.wait_for(sent_before + 1)
        assert received.message["Injected"] is None  # attributes never become mail headers


def test_a_valid_message_that_is_not_a_mail_is_not_acked(http: httpx.Client) -> None:
    envelope = valid_envelope(data=base64.b64encode(b"not a mail").decode())
    response = http.post("/", json=envelope)
    check_refused(response)
    assert response.status_code == 503  # nacked: it ends on the dead-letter topic, visible


# --- hostile input (issue 16): every class refused with a JSON 400, every status JSON ---------

ENVELOPE_LEAVES: list[tuple[Any, ...]] = [
    ("message", "data"),
    ("message", "messageId"),
    ("message", "attributes", "mail_id"),
    ("message", "attributes", "<key>"),
    ("message", "publishTime"),
    ("subscription",),
    ("deliveryAttempt",),
]


def test_deeply_nested_json_is_a_400(http: httpx.Client) -> None:
    response = http.post(
        "/", content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"}
    )
    check_refused(response)
    assert response.status_code == 400
    assert "levels" in response.json()["error"]["message"]


def test_an_integer_beyond_pythons_digit_limit_is_a_400(http: httpx.Client) -> None:
    text = json.dumps(valid_envelope()).replace('"messageId": "42"', '"messageId": 4' + "2" * 5000)
    response = http.post("/", content=text.encode(), headers={"Content-Type": "application/json"})
    check_refused(response)
    assert response.status_code == 400


@pytest.mark.parametrize("leaf", ENVELOPE_LEAVES[:4], ids=".".join)
def test_a_lone_surrogate_anywhere_in_the_envelope_is_a_400(
    http: httpx.Client, relay: LocalSmtpServer, leaf: tuple[Any, ...]
) -> None:
    envelope = valid_envelope()
    parent = envelope
    for part in leaf[:-1]:
        parent = parent[part]
    if leaf[-1] == "<key>":
        parent["x\ud800"] = "v"
    else:
        parent[leaf[-1]] = "\udc00"
    sent_before = len(relay.messages)

    response = http.post(
        "/",
        content=json.dumps(envelope, ensure_ascii=True).encode(),
        headers={"Content-Type": "application/json"},
    )

    check_refused(response)
    assert response.status_code == 400
    assert "lone surrogate" in response.json()["error"]["message"]
    assert len(relay.messages) == sent_before


@pytest.mark.parametrize("structured", [True, False])
def test_a_cloudevent_whose_data_is_hostile_is_a_400(http: httpx.Client, structured: bool) -> None:
    data = '{"message": {"messageId": "1", "data": "", "attributes": {"a": "\\ud800"}}}'
    if structured:
        attributes = {"specversion": "1.0", "type": PUBSUB_EVENT_TYPE, "source": "s", "id": "1"}
        event = json.dumps(attributes)[:-1] + f', "data": {data}}}'
        headers = {"Content-Type": "application/cloudevents+json"}
        body = event.encode()
    else:
        headers = {
            "Content-Type": "application/json",
            "ce-specversion": "1.0",
            "ce-type": PUBSUB_EVENT_TYPE,
            "ce-source": "s",
            "ce-id": "1",
        }
        body = ("[" * 5000 + "]" * 5000).encode()
    response = http.post("/", content=body, headers=headers)
    check_refused(response)
    assert response.status_code == 400


@FUZZ
@given(raw=with_hostile_leaf(valid_envelope(), ENVELOPE_LEAVES))
def test_a_hostile_value_anywhere_in_the_envelope_is_a_400(
    http: httpx.Client, relay: LocalSmtpServer, raw: bytes
) -> None:
    sent_before = len(relay.messages)
    response = http.post("/", content=raw, headers={"Content-Type": "application/json"})
    check_refused(response)
    assert response.status_code == 400
    assert len(relay.messages) == sent_before


def json_status(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] and error["message"]
    return error


def test_an_unknown_path_is_a_json_404_naming_the_push_paths(http: httpx.Client) -> None:
    error = json_status(http.post("/nope", json={}), 404)
    assert "'/dead-letter'" in error["message"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("PUT", "/dead-letter")])
def test_a_wrong_method_is_a_json_405(http: httpx.Client, method: str, path: str) -> None:
    response = http.request(method, path)
    json_status(response, 405)
    assert "POST" in response.headers["Allow"]


def test_an_oversized_push_is_a_json_413(http: httpx.Client) -> None:
    body = b'{"message": {"data": "' + b"A" * (17 * 1024 * 1024) + b'"}}'
    response = http.post("/", content=body, headers={"Content-Type": "application/json"})
    assert "16,777,216 bytes" in json_status(response, 413)["message"]


class FailingDelivery:
    """Stands in for a delivery core that fails unexpectedly (a poison mail, a bug): the error
    surface is what is tested here, not the failure, so it is injected."""

    def deliver(self, *_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom")


def test_an_unexpected_failure_is_a_json_500(tmp_path: Path) -> None:
    config = SubscriberConfig.from_env(
        {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "MAILPIPE_RECORD": f"sqlite:///{tmp_path}/r.db"}
    )
    record = open_record(config.record)
    handler = PushHandler(
        config,
        delivery=FailingDelivery(),  # type: ignore[arg-type]
        dead_letters=DeadLetterRecorder(record=record, tracer=TracerProvider().get_tracer("t")),
        authenticator=None,
    )
    try:
        with serve_app(create_push_app(handler)) as url:
            response = httpx.post(f"{url}/", json=valid_envelope(), timeout=30)
    finally:
        record.close()
    error = json_status(response, 500)  # a nack: Pub/Sub retries, then dead-letters
    assert error["code"] == "internal"
    assert "boom" not in response.text  # internals stay in the log
