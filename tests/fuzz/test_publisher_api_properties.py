"""Property-based fuzzing of ``POST /v1/messages`` over real HTTP (hypothesis).

Whatever the body — random JSON, random strings in every field (CR/LF, NUL, lone surrogates,
non-ASCII), invalid UTF-8, huge recipient lists — the publisher answers with a status its OpenAPI
document lists for the operation, with a JSON error body for every error, and never 500. A mail
that smuggles a line break into any header-bound field is refused (no header injection).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpipe.mail import MAX_RECIPIENTS
from publisher.openapi import openapi_document

FUZZ = settings(
    max_examples=120,
    deadline=None,  # the machine is shared: no timing assertions
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def documented_statuses() -> set[int]:
    responses = openapi_document()["paths"]["/v1/messages"]["post"]["responses"]
    return {int(code) for code in responses}


DOCUMENTED = documented_statuses()


def check(response: httpx.Response) -> None:
    """The contract every answer of POST /v1/messages keeps."""
    assert response.status_code != 500, response.text
    assert response.status_code in DOCUMENTED, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str)
    else:
        assert body["mail_id"] and body["message_id"]


def post_json(http: httpx.Client, payload: Any) -> httpx.Response:
    # ensure_ascii keeps lone surrogates as \\udxxx escapes: valid JSON text, hostile content.
    return http.post(
        "/v1/messages",
        content=json.dumps(payload, ensure_ascii=True).encode(),
        headers={"Content-Type": "application/json"},
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
# Every kind of character, with the dangerous ones made likely.
nasty_text = st.text(
    alphabet=st.characters(codec=None) | st.sampled_from(["\r", "\n", "\x00", "\ud800", "é"]),
    max_size=40,
)
address_like = st.one_of(
    nasty_text,
    st.builds(lambda a, b: f"{a}@{b}", nasty_text, nasty_text),
    st.just("ok@example.org"),
)
MAIL_FIELDS = {
    "from": address_like,
    "to": st.lists(address_like, max_size=4),
    "cc": st.lists(address_like, max_size=3),
    "bcc": st.lists(address_like, max_size=3),
    "reply_to": st.lists(address_like, max_size=2),
    "subject": nasty_text,
    "text": nasty_text,
    "html": nasty_text,
    "headers": st.dictionaries(nasty_text, nasty_text, max_size=3),
    "attachments": st.lists(
        st.fixed_dictionaries(
            {"filename": nasty_text, "content_type": nasty_text, "content": nasty_text}
        ),
        max_size=2,
    ),
    "idempotency_key": nasty_text,
    "metadata": st.dictionaries(nasty_text, json_values, max_size=3),
    "unknown_field": json_values,
}
mail_like = st.fixed_dictionaries(
    {
        "from": st.just("sender@example.com") | MAIL_FIELDS["from"],
        "to": st.just(["rcpt@example.org"]) | MAIL_FIELDS["to"],
    },
    optional={k: v for k, v in MAIL_FIELDS.items() if k not in ("from", "to")},
)


@FUZZ
@given(payload=json_values)
def test_any_json_gets_a_documented_answer(http: httpx.Client, payload: Any) -> None:
    check(post_json(http, payload))


@FUZZ
@given(payload=mail_like)
def test_random_strings_in_every_field_get_a_documented_answer(
    http: httpx.Client, payload: dict[str, Any]
) -> None:
    response = post_json(http, payload)
    check(response)
    header_bound = [
        payload.get("from"),
        payload.get("subject"),
        *payload.get("to", []),
        *payload.get("cc", []),
        *payload.get("bcc", []),
        *payload.get("reply_to", []),
        *payload.get("headers", {}).keys(),
        *payload.get("headers", {}).values(),
        *(a.get("filename") for a in payload.get("attachments", [])),
    ]
    if any(isinstance(v, str) and ("\r" in v or "\n" in v) for v in header_bound):
        assert response.status_code == 400, "a line break in a header field was accepted"


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
def test_invalid_utf8_and_random_bytes_get_a_documented_answer(
    http: httpx.Client, raw: bytes
) -> None:
    response = http.post("/v1/messages", content=raw, headers={"Content-Type": "application/json"})
    check(response)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_encoding"


@settings(FUZZ, max_examples=15)
@given(count=st.integers(min_value=MAX_RECIPIENTS + 1, max_value=20_000))
def test_huge_recipient_lists_are_refused(http: httpx.Client, count: int) -> None:
    payload = {
        "from": "sender@example.com",
        "to": [f"r{i}@example.org" for i in range(count)],
        "subject": "many",
        "text": "x",
    }
    response = post_json(http, payload)
    check(response)
    assert response.status_code == 400
    assert "to" in response.json()["error"]["fields"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("", 415)],
)
def test_wrong_content_types(http: httpx.Client, content_type: str, status: int) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.post("/v1/messages", content=b'{"to": []}', headers=headers)
    check(response)
    assert response.status_code == status


def test_an_oversized_body_gets_413(http: httpx.Client) -> None:
    body = b'{"text": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    response = http.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    check(response)
    assert response.status_code == 413


def test_header_injection_through_the_idempotency_header(http: httpx.Client) -> None:
    payload = {"from": "a@example.com", "to": ["b@example.org"], "text": "t"}
    response = http.post(
        "/v1/messages",
        json=payload,
        headers={"Idempotency-Key": b"has space and \xe9"},  # outside printable ASCII
    )
    check(response)
    assert response.status_code == 400


@pytest.mark.parametrize("token", ["é", "not base64!", "Zm9v", "%00"])
def test_a_page_token_the_api_never_issued_is_a_400(http: httpx.Client, token: str) -> None:
    """Regression: a malformed page_token used to escape as a 500 (found by schemathesis)."""
    response = http.get("/v1/messages", params={"page_token": token})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["fields"] == {
        "page_token": "is not a page token this API returned"
    }
