"""What counts as the same request, how the Idempotency-Key header is read, and the limits the
configuration puts on a reservation: no server needed."""

from __future__ import annotations

from typing import Any

import flask
import pytest

from mailpipe.config import ConfigError
from mailpipe.mail import MailRequest
from publisher.config import PublisherConfig
from publisher.idempotency import (
    InvalidIdempotencyHeader,
    caller_scope,
    header_key,
    request_fingerprint,
)

MAIL: dict[str, Any] = {
    "from": "Ada <ada@example.com>",
    "to": ["bob@example.org", "carol@example.org"],
    "subject": "Invoice 42",
    "text": "Hi",
    "metadata": {"order": 42, "vip": True},
}


def fingerprint(**changes: Any) -> str:
    return request_fingerprint(MailRequest.model_validate({**MAIL, **changes}))


def test_the_fingerprint_is_the_validated_request_without_its_key() -> None:
    reference = fingerprint()

    assert fingerprint(idempotency_key="order-42") == reference
    assert fingerprint(metadata={"vip": True, "order": 42}) == reference
    assert fingerprint(cc=[], headers={}, attachments=[]) == reference  # defaults spelled out
    assert fingerprint(reply_to="ada@example.com") == fingerprint(reply_to=["ada@example.com"])
    assert (
        request_fingerprint(MailRequest.model_validate(dict(reversed(list(MAIL.items())))))
        == reference
    )


@pytest.mark.parametrize(
    "change",
    [
        {"subject": "Invoice 43"},
        {"text": "Hi!"},
        {"html": "<p>Hi</p>"},
        {"to": ["carol@example.org", "bob@example.org"]},  # the To header's order differs
        {"bcc": ["eve@example.org"]},
        {"headers": {"X-Campaign": "spring"}},
        {"metadata": {"order": 43, "vip": True}},
        {"attachments": [{"filename": "a.txt", "content": "aGk="}]},
    ],
)
def test_any_other_difference_is_another_request(change: dict[str, Any]) -> None:
    assert fingerprint(**change) != fingerprint()


def _request(*headers: tuple[str, str]) -> flask.Request:
    app = flask.Flask("test")
    with app.test_request_context("/", method="POST", headers=list(headers)):
        return flask.request._get_current_object()  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("order-42", "order-42"),
        ("  order-42 ", "order-42"),
        ('"order-42"', "order-42"),  # the draft's sf-string form
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ('"a,b"', "a,b"),
        ('"', '"'),  # not a quoted string: a bare key (MailRequest checks its syntax)
    ],
)
def test_header_key_reads_bare_and_quoted_keys(value: str, key: str) -> None:
    assert header_key(_request(("Idempotency-Key", value))) == key


@pytest.mark.parametrize("value", ['"a\\x"', '"a"b"', "a,b", '"a", "b"'])
def test_header_key_refuses_malformed_or_joined_headers(value: str) -> None:
    with pytest.raises(InvalidIdempotencyHeader):
        header_key(_request(("Idempotency-Key", value)))


def test_no_header_and_the_callers_scope() -> None:
    request = _request()
    assert header_key(request) is None
    assert caller_scope(None, request) is None
    assert caller_scope(lambda _: "", request) is None  # no name: the shared scope
    assert caller_scope(lambda _: "sa@p.iam.gserviceaccount.com", request) == (
        "sa@p.iam.gserviceaccount.com"
    )


def test_the_reservation_must_outlast_the_publish_timeout() -> None:
    defaults = PublisherConfig.from_env({})
    assert (defaults.idempotency_reservation_seconds, defaults.reconcile_grace_seconds) == (
        300.0,
        900.0,
    )
    assert defaults.idempotency_reservation_seconds > defaults.publish_timeout

    with pytest.raises(ConfigError) as caught:
        PublisherConfig.from_env(
            {
                "MAILPIPE_PUBLISH_TIMEOUT": "60",
                "MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS": "60",
                "MAILPIPE_RECONCILE_GRACE_SECONDS": "-1",
            }
        )
    assert set(caught.value.problems) == {
        "MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS",
        "MAILPIPE_RECONCILE_GRACE_SECONDS",
    }
    assert (
        "MAILPIPE_PUBLISH_TIMEOUT"
        in caught.value.problems["MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS"]
    )
