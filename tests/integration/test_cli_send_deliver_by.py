"""``mailpipe send --deliver-by`` against the real publisher over HTTP (Pub/Sub emulator behind it):
both forms the API takes arrive as the give-up time, and a bad value gets the API's own 400 —
its message on stderr, exit 2, and with ``--json`` the API's JSON error exactly as the API
answers the same value (the CLI checks nothing itself). docs/deliver-by.md."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest

from ops.cli import EXIT_OK, EXIT_USAGE, main
from tests.integration.test_publisher_api import VALID, Api, api

__all__ = ["api"]  # the module's fixture, shared

SEND = ("send", "--from", VALID["from"], "--to", VALID["to"][0], "--text", VALID["text"])


def without_times(error: dict[str, Any]) -> str:
    """The error with the times it names ("now is ...", "the maximum is ...") blanked."""
    return re.sub(r"\d{4}-\d\d-\d\dT[0-9:.]+\+00:00", "<time>", json.dumps(error))


def send(api: Api, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = main([*SEND, "--url", str(api.http.base_url), *extra])
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich wraps long lines


def test_an_rfc_3339_time_is_the_mails_give_up_time(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    when = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=5)
    local = when.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()  # "...+02:00"

    code, out, err = send(api, capsys, "--deliver-by", local, "--json")

    assert code == EXIT_OK, err
    mail_id = json.loads(out)["mail_id"]
    [published] = api.published(expect=1)
    assert published.deliver_by == when
    assert api.http.get(f"/v1/messages/{mail_id}").json()["deliver_by"] == when.isoformat()


def test_unix_seconds_are_sent_as_the_number_the_api_takes(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    when = int(dt.datetime.now(dt.UTC).timestamp()) + 3600

    code, _, err = send(api, capsys, "--deliver-by", str(when), "--sandbox")

    assert code == EXIT_OK, err
    [published] = api.published(expect=1)
    assert published.deliver_by == dt.datetime.fromtimestamp(when, dt.UTC)
    assert published.request.sandbox is True


@pytest.mark.parametrize(
    "value",
    [
        "tomorrow",
        "",
        "2030-01-01T09:00:00",  # no offset
        "2030-02-30T00:00:00Z",
        "9" * 5000,
        "-5",
        "1.5",
        "2001-01-01T00:00:00Z",  # past
        "1",  # past, as Unix seconds
        "2999-01-01T00:00:00+00:00",  # beyond the maximum
    ],
)
def test_a_bad_deliver_by_shows_the_apis_own_error(
    api: Api, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, out, err = send(api, capsys, "--deliver-by", value, "--json")
    direct = api.post({**VALID, "deliver_by": int(value) if value == "1" else value})

    assert code == EXIT_USAGE
    assert direct.status_code == 400
    printed: dict[str, Any] = json.loads(out)
    assert printed.keys() == {"error"}
    error, expected = printed["error"], direct.json()["error"]
    assert error["fields"].keys() == {"deliver_by"}
    assert without_times(error) == without_times(expected)
    assert "HTTP 400 invalid_request: deliver_by " in err
    assert f"deliver_by: {error['fields']['deliver_by']}"[:60] in err
    assert api.published() == []  # nothing queued
