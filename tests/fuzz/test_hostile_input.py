"""Hostile input against the publisher over real HTTP: never a 500, always a JSON error that says
what to fix (issue 16).

Each class the issue names has an explicit regression test and a hypothesis property that
generates it: JSON nested past the depth limit, integers past Python's int/str digit limit,
non-finite numbers, lone surrogates in every field, ``since`` and page tokens at the calendar's
edge (offsets that overflow when converted to UTC), forged and garbled page tokens, invalid UTF-8
and lone surrogates in query strings and path ids, and mail ids the record backends refuse.

The publisher runs twice: on the SQLite record and on the Firestore emulator, so an id that
Firestore refuses ("..", "__x__", over 1,500 bytes, a lone surrogate) is proven never to reach it
as a document path.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpipe.record import DeliveryRecord
from mailpipe.record.firestore import FirestoreRecord
from tests.fixtures.publishing import publishing
from tests.fuzz.hostile import (
    HOSTILE_CODES,
    INT_DIGIT_LIMIT,
    any_time,
    edge_times,
    forged_page_tokens,
    page_token,
    text_with_lone_surrogate,
    with_hostile_leaf,
)

FUZZ = settings(
    max_examples=60,
    deadline=None,  # the machine is shared: no timing assertions
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAIL = {
    "from": "sender@example.com",
    "to": ["rcpt@example.org"],
    "cc": ["cc@example.org"],
    "bcc": ["bcc@example.org"],
    "reply_to": ["reply@example.org"],
    "subject": "hello",
    "text": "text",
    "html": "<p>html</p>",
    "headers": {"X-Tag": "value"},
    "attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "eA=="}],
    "idempotency_key": "key-1",
    "metadata": {"customer": "c-1"},
}
# Where a hostile value can sit: every field, each list item, each map's keys and values.
MAIL_LEAVES: list[tuple[Any, ...]] = [
    ("from",),
    ("to", 0),
    ("cc", 0),
    ("bcc", 0),
    ("reply_to", 0),
    ("subject",),
    ("text",),
    ("html",),
    ("headers", "X-Tag"),
    ("headers", "<key>"),
    ("attachments", 0, "filename"),
    ("attachments", 0, "content_type"),
    ("attachments", 0, "content"),
    ("idempotency_key",),
    ("metadata", "customer"),
    ("metadata", "<key>"),
    ("unknown_field",),
]
INVALID_MAIL_IDS = [
    "..",
    "%2E%2E",
    "__x__",
    "__id7__",
    "x" * 1501,
    "%C3%A9" * 751,  # 1,502 bytes of UTF-8
    "%ED%A0%80",  # the UTF-8 form of a lone surrogate: invalid UTF-8
    "%FF",
    "01A22AF2-7AD3-7601-BAD6-5551046DFCB4",  # not the form the API hands out
    "does-not-exist",
    "a%00b",
]


@pytest.fixture(scope="module", params=["sqlite", "firestore"])
def backend_url(
    request: pytest.FixtureRequest,
    pubsub_emulator: Any,
    pubsub_project: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The publisher over HTTP with Pub/Sub on the emulator and the record on ``param``."""
    record: DeliveryRecord | None = None
    if request.param == "firestore":
        request.getfixturevalue("firestore_emulator")  # sets FIRESTORE_EMULATOR_HOST
        suffix = uuid.uuid4().hex[:8]
        record = FirestoreRecord(
            project=pubsub_project,
            collection=f"hostile-{suffix}",
            idempotency_collection=f"hostile-keys-{suffix}",
        )
    record_dir = tmp_path_factory.mktemp("hostile")
    with (
        publishing(pubsub_emulator, pubsub_project, record_dir, record) as parts,
        parts.served() as url,
    ):
        yield url


@pytest.fixture(scope="module")
def publisher_url(backend_url: str) -> str:
    """The conftest's ``http`` client goes to the parametrised backend."""
    return backend_url


@pytest.fixture(scope="module")
def api(http: httpx.Client) -> httpx.Client:
    return http


def json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is ``status`` with the error format; returns its ``error`` object."""
    assert response.status_code != 500, response.text
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def get_verbatim(base_url: str, path: str) -> httpx.Response:
    """GET ``path`` exactly as written: httpx (like browsers) would resolve "..", and a hostile
    client does not."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        connection.close()


def post_raw(api: httpx.Client, raw: bytes) -> httpx.Response:
    return api.post("/v1/messages", content=raw, headers={"Content-Type": "application/json"})


def raw_mail(**fields: str) -> bytes:
    """The valid MAIL as JSON text with ``fields`` spliced in as raw JSON text."""
    text = json.dumps({**MAIL, **dict.fromkeys(fields, "@@")})
    for name, raw in fields.items():
        text = text.replace(f'"{name}": "@@"', f'"{name}": {raw}', 1)
    return text.encode()


# --- regression tests, one per named case ----------------------------------------------------


@pytest.mark.parametrize("depth", [33, 5_000, 200_000])
def test_deeply_nested_json_is_a_400(api: httpx.Client, depth: int) -> None:
    error = json_error(post_raw(api, raw_mail(metadata="[" * depth + "]" * depth)), 400)
    assert error["code"] == "json_too_deep"
    assert "32 levels" in error["message"]


def test_an_integer_beyond_pythons_digit_limit_is_a_400(api: httpx.Client) -> None:
    huge = "9" * (INT_DIGIT_LIMIT + 1)
    error = json_error(post_raw(api, raw_mail(metadata='{"n": ' + huge + "}")), 400)
    assert error["code"] == "invalid_json"
    assert "digits" in error["message"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_numbers_that_are_not_finite_are_a_400(api: httpx.Client, number: str) -> None:
    error = json_error(post_raw(api, raw_mail(metadata='{"n": ' + number + "}")), 400)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("leaf", MAIL_LEAVES, ids=lambda path: ".".join(map(str, path)))
def test_a_lone_surrogate_in_any_field_is_a_400_naming_the_field(
    api: httpx.Client, leaf: tuple[Any, ...]
) -> None:
    document = json.loads(json.dumps(MAIL))
    parent = document
    for part in leaf[:-1]:
        parent = parent[part]
    if leaf[-1] == "<key>":
        parent["bad\ud800key"] = "v"
        field = ".".join(map(str, leaf[:-1]))
    else:
        parent[leaf[-1]] = "bad\udfffvalue"
        field = ".".join(map(str, leaf))

    error = json_error(post_raw(api, json.dumps(document, ensure_ascii=True).encode()), 400)

    assert error["code"] == "invalid_encoding"
    assert "lone surrogate" in error["fields"][field]


@pytest.mark.parametrize(
    "since", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:30+23:59"]
)
def test_since_at_the_calendars_edge_with_an_offset_is_a_400(api: httpx.Client, since: str) -> None:
    error = json_error(api.get("/v1/messages", params={"since": since}), 400)
    assert "outside the times" in error["fields"]["since"]


@pytest.mark.parametrize(
    "since",
    ["0001-01-01T00:00:00Z", "0001-01-01", "9999-12-31T23:59:59.999999+00:00", "9999-12-31"],
)
def test_since_at_the_calendars_edge_in_utc_is_answered(api: httpx.Client, since: str) -> None:
    response = api.get("/v1/messages", params={"since": since})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["items"], list)


@pytest.mark.parametrize(
    "payload",
    [
        ["0001-01-01T00:00:00+01:00", "01a22af2-7ad3-7601-bad6-5551046dfcb4"],
        ["9999-12-31T23:59:59-01:00", "01a22af2-7ad3-7601-bad6-5551046dfcb4"],
        ["2026-01-01T00:00:00", "a/b"],
        ["2026-01-01T00:00:00", "a/b/c"],
        ["2026-01-01T00:00:00", ".."],
        ["2026-01-01T00:00:00", "__x__"],
        ["2026-01-01T00:00:00", "x" * 1501],
        ["2026-01-01T00:00:00", "lone \ud800"],
        ["2026-01-01T00:00:00", ""],
        ["2026-01-01T00:00:00", 5],
        {"accepted": "2026-01-01T00:00:00", "id": "x"},
        "[" * 10_000 + "]" * 10_000,
    ],
    ids=lambda payload: str(payload)[:40],
)
def test_a_forged_page_token_is_a_400(api: httpx.Client, payload: Any) -> None:
    token = page_token(payload.encode() if isinstance(payload, str) else payload)
    error = json_error(api.get("/v1/messages", params={"page_token": token}), 400)
    assert error["fields"] == {"page_token": "is not a page token this API returned"}


@pytest.mark.parametrize("mail_id", INVALID_MAIL_IDS, ids=lambda i: i[:20])
def test_an_id_that_is_no_mail_id_is_a_json_404(backend_url: str, mail_id: str) -> None:
    error = json_error(get_verbatim(backend_url, f"/v1/messages/{mail_id}"), 404)
    assert error["code"] == "not_found"
    assert "UUID" in error["fields"]["mail_id"]


@pytest.mark.parametrize("path", ["/v1/messages/a%2Fb", "/v1/messages/a/b/c", "/nope"])
def test_an_unknown_path_is_a_json_404(backend_url: str, path: str) -> None:
    error = json_error(get_verbatim(backend_url, path), 404)
    assert "/openapi.json" in error["message"]


@pytest.mark.parametrize(
    "query",
    [
        "status=%ED%A0%80",
        "since=%ED%A0%80",
        "since=%FF%FE",
        "limit=%ED%A0%80",
        "limit=" + "9" * (INT_DIGIT_LIMIT + 1),
        "page_token=%ED%A0%80",
        "page_token=%FF",
    ],
)
def test_invalid_utf8_and_surrogates_in_the_query_are_a_400(api: httpx.Client, query: str) -> None:
    error = json_error(api.get(f"/v1/messages?{query}"), 400)
    assert error["code"] == "invalid_query"
    assert set(error["fields"]) == {query.split("=", maxsplit=1)[0]}


@pytest.mark.parametrize(
    ("method", "path"), [("DELETE", "/healthz"), ("PUT", "/v1/messages"), ("POST", "/v1/stats")]
)
def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(
    api: httpx.Client, method: str, path: str
) -> None:
    response = api.request(method, path)
    error = json_error(response, 405)
    assert response.headers["Allow"]
    assert all(m.strip() in error["message"] for m in response.headers["Allow"].split(","))


def test_options_is_answered_in_json(api: httpx.Client) -> None:
    response = api.options("/v1/messages")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()["allow"]) >= {"GET", "POST"}


# --- properties: each class generated --------------------------------------------------------


@FUZZ
@given(raw=with_hostile_leaf(MAIL, MAIL_LEAVES))
def test_a_hostile_value_in_any_field_is_a_400(api: httpx.Client, raw: bytes) -> None:
    error = json_error(post_raw(api, raw), 400)
    assert error["code"] in HOSTILE_CODES, error


@FUZZ
@given(since=any_time)
def test_any_since_time_is_answered_or_refused_in_json(api: httpx.Client, since: Any) -> None:
    response = api.get("/v1/messages", params={"since": since.isoformat()})
    if response.status_code == 400:
        assert set(json_error(response, 400)["fields"]) == {"since"}
    else:
        assert response.status_code == 200, response.text


@FUZZ
@given(since=edge_times)
def test_edge_since_times_with_offsets_are_refused(api: httpx.Client, since: str) -> None:
    json_error(api.get("/v1/messages", params={"since": since}), 400)


@FUZZ
@given(token=forged_page_tokens)
def test_forged_page_tokens_are_answered_or_refused_in_json(api: httpx.Client, token: str) -> None:
    response = api.get("/v1/messages", params={"page_token": token})
    if response.status_code == 400:
        assert set(json_error(response, 400)["fields"]) == {"page_token"}
    else:
        assert response.status_code == 200, response.text  # a well-formed cursor, anywhere


@FUZZ
@given(
    mail_id=st.text(min_size=1, max_size=60)
    | text_with_lone_surrogate
    | st.text(min_size=1500, max_size=1600)
    | st.sampled_from([".", "..", "%2e", "%2E%2e", "/0", "a//b", "/"])  # "/": werkzeug redirects
    | st.text(max_size=10).map(lambda inner: f"__{inner}__")  # reserved by Firestore
)
def test_any_path_id_is_a_json_404(backend_url: str, mail_id: str) -> None:
    path = quote(mail_id.encode("utf-8", "surrogatepass"), safe="")
    response = get_verbatim(backend_url, f"/v1/messages/{path}")
    assert json_error(response, 404)["code"] == "not_found"


@FUZZ
@given(
    name=st.sampled_from(["status", "since", "limit", "page_token"]),
    raw=st.binary(min_size=1, max_size=30)
    | text_with_lone_surrogate.map(lambda s: s.encode("utf-8", "surrogatepass")),
)
def test_any_bytes_in_a_query_parameter_are_answered_in_json(
    api: httpx.Client, name: str, raw: bytes
) -> None:
    response = api.get(f"/v1/messages?{name}={quote(raw, safe='')}")
    if response.status_code == 400:
        assert set(json_error(response, 400)["fields"]) == {name}
    else:
        assert response.status_code == 200, response.text
