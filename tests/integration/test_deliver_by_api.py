"""``deliver_by`` at the publisher's API (docs/deliver-by.md), over real HTTP to the Pub/Sub
emulator: what is accepted, how it travels, and every hostile value refused with a 400 that says
what to send instead."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from mailpipe.mail import QueuedMail
from tests.integration.test_publisher_api import VALID, Api, api, assert_json_error

__all__ = ["api"]  # the module's fixture, shared


def test_a_deliver_by_with_an_offset_is_kept_in_utc_in_the_record_and_on_pubsub(
    api: Api,
) -> None:
    when = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=5)
    local = when.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()  # "...+02:00"
    response = api.post({**VALID, "deliver_by": local})
    assert response.status_code == 202, response.text
    mail_id = response.json()["mail_id"]
    [published] = api.published(expect=1)
    assert published.deliver_by == when
    record = api.http.get(f"/v1/messages/{mail_id}").json()
    assert record["deliver_by"] == when.isoformat()
    assert record["next_attempt_at"] is None


def test_deliver_by_rides_in_an_attribute_so_the_previous_subscriber_still_decodes(
    api: Api,
) -> None:
    """Data stays schema 2 exactly (the previous subscriber refuses unknown fields)."""
    response = api.post(VALID)
    assert response.status_code == 202, response.text
    [published] = api.published(expect=1)
    data, attributes = published.to_pubsub()
    assert "deliver_by" not in json.dumps(json.loads(data))
    assert attributes["schema_version"] == "2"
    assert QueuedMail.from_pubsub(data, {"schema_version": "2"}).deliver_by is None
    assert QueuedMail.from_pubsub(data, attributes).deliver_by == published.deliver_by


def test_default_deliver_by_is_72_hours_after_acceptance(api: Api) -> None:
    response = api.post(VALID)
    assert response.status_code == 202, response.text
    [published] = api.published(expect=1)
    assert published.deliver_by is not None
    assert published.deliver_by - published.accepted_at == dt.timedelta(hours=72)


def test_unix_seconds_are_accepted_as_sendgrid_takes_them(api: Api) -> None:
    when = int(dt.datetime.now(dt.UTC).timestamp()) + 3600
    response = api.post({**VALID, "deliver_by": when})
    assert response.status_code == 202, response.text
    [published] = api.published(expect=1)
    assert published.deliver_by == dt.datetime.fromtimestamp(when, dt.UTC)


HOSTILE: list[tuple[str, Any, str]] = [
    ("garbage", "tomorrow", "RFC 3339"),
    ("empty", "", "RFC 3339"),
    ("no offset", "2030-01-01T09:00:00", "with an offset"),
    ("date only", "2030-01-01", "with an offset"),
    ("impossible date", "2030-02-30T00:00:00Z", "RFC 3339"),
    ("line break", "2030-01-01T00:00:00Z\r\nX-Evil: 1", "RFC 3339"),
    ("huge", "9" * 5000, "RFC 3339"),
    ("calendar's edge", "9999-12-31T23:59:59-01:00", "RFC 3339"),
    ("boolean", True, "RFC 3339"),
    ("float", 1.5e300, "RFC 3339"),
    ("object", {"at": "2030-01-01T00:00:00Z"}, "RFC 3339"),
    ("past", "2001-01-01T00:00:00Z", "in the past"),
    ("past unix seconds", 1, "in the past"),
    ("far future", "2999-01-01T00:00:00+00:00", "the maximum is"),
    ("far future unix seconds", 32503680000, "the maximum is"),
]


@pytest.mark.parametrize(("case", "value", "says"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_deliver_by_is_a_400_that_says_what_to_send(
    api: Api, case: str, value: Any, says: str
) -> None:
    error = assert_json_error(api.post({**VALID, "deliver_by": value}), 400, "invalid_request")
    assert says in error["fields"]["deliver_by"], (case, error)
    assert api.published() == []  # nothing queued


def test_the_maximum_is_the_dead_letter_retention(api: Api) -> None:
    error = assert_json_error(
        api.post({**VALID, "deliver_by": "2999-01-01T00:00:00Z"}), 400, "invalid_request"
    )
    assert "168 h" in error["fields"]["deliver_by"]  # 604800s in topology.json
    latest = dt.datetime.now(dt.UTC) + dt.timedelta(days=7) - dt.timedelta(minutes=1)
    assert api.post({**VALID, "deliver_by": latest.isoformat()}).status_code == 202
    api.published(expect=1)
