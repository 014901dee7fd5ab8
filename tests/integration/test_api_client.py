"""The publisher's API client (client/api.py) and the CLI commands on it, over real HTTP.

The first test goes through the real pipeline (publisher, Pub/Sub emulator, subscriber, SMTP
server); test_idempotency_reconcile.py runs ``mailpipe status`` against it, and the canary and
local-stack tests send through the client too. After that the other side misbehaves the ways a
real deployment can: nothing listening, a proxy's HTML error page, a 400 in the API's JSON error
format, a 200 that is not JSON, an answer that never comes. That other side is a small WSGI app
on loopback standing in for the publisher or a proxy in front of it; every case must end in a
clear message and an exit code, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from client import (
    ApiAuthError,
    ApiBadAnswer,
    ApiHttpError,
    ApiTimeout,
    ApiUnreachable,
    PublisherApi,
    google_id_token_auth,
)
from ops.cli import main
from tests.fixtures.http import serve_app
from tests.fixtures.imap import free_port
from tests.fixtures.pipeline import Pipeline

Answer = tuple[int, str, bytes]  # status, content type, body
HTML_500: Answer = (
    500,
    "text/html",
    b"<html><body><h1>502 Bad Gateway</h1><p>upstream [connect] error</p></body></html>",
)
JSON_400: Answer = (
    400,
    "application/json",
    json.dumps(
        {
            "error": {
                "code": "invalid_mail",
                "message": "the mail is not valid: fix the fields named [/bold] below",
                "fields": {"to.0": "is not an email address"},
            }
        }
    ).encode(),
)
ACCEPTED: Answer = (
    202,
    "application/json",
    json.dumps({"mail_id": "m-1", "trace_id": "0" * 32}).encode(),
)


class FakePublisher:
    """Answers each "METHOD path" with what the test set (404 JSON otherwise)."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer | Callable[[], Answer]] = {}
        self.release = threading.Event()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        key = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"
        answer = self.answers.get(key)
        if callable(answer):
            answer = answer()
        if answer is None:
            body = {"error": {"code": "not_found", "message": f"no mail at {key}"}}
            answer = (404, "application/json", json.dumps(body).encode())
        status, content_type, body_bytes = answer
        start_response(f"{status} X", [("Content-Type", content_type)])
        return [body_bytes]

    def slow(self) -> Answer:
        self.release.wait(10)  # until the test is done: the client must give up first
        return (200, "application/json", b"{}")


@pytest.fixture
def publisher() -> Iterator[tuple[FakePublisher, str]]:
    app = FakePublisher()
    with serve_app(app) as url:
        yield app, url
        app.release.set()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())  # rich wraps long lines


SEND = ("send", "--to", "bob@example.org", "--text", "hi")


# --- the client ----------------------------------------------------------------------------------


def test_every_call_against_the_real_publisher(pipeline: Pipeline) -> None:
    api = PublisherApi(pipeline.url)
    mail = {"from": "ada@example.com", "to": ["bob@example.org"], "subject": "hi", "text": "hi"}

    accepted = api.send(mail)
    record = api.wait(accepted.mail_id, timeout=60)

    assert accepted.body["mail_id"] == accepted.mail_id
    assert record is not None and record["status"] == "delivered"
    again = api.record(accepted.mail_id)
    assert again is not None and (again["mail_id"], again["status"]) == (
        accepted.mail_id,
        "delivered",
    )
    listed = api.records(status="delivered", limit=100)
    assert accepted.mail_id in [item["mail_id"] for item in listed["items"]]
    assert "stuck" in api.stats()
    assert api.record("0" * 26) is None
    with pytest.raises(ApiHttpError) as info:
        api.send({**mail, "to": ["not an address"]})
    assert info.value.status == 400
    assert info.value.code is not None and "to.0" in info.value.fields


def test_nothing_listening_is_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ApiUnreachable) as info:
        PublisherApi(url).stats()
    assert str(info.value) == f"cannot reach the publisher at {url}: Connection refused"


def test_no_answer_within_the_timeout(publisher: tuple[FakePublisher, str]) -> None:
    app, url = publisher
    app.answers["GET /v1/stats"] = app.slow
    app.answers["POST /v1/messages"] = app.slow
    api = PublisherApi(url, timeout=0.3)
    with pytest.raises(ApiTimeout, match=r"did not answer GET within 0\.3 s$"):
        api.stats()
    with pytest.raises(ApiTimeout, match=r"may have been accepted: .* same idempotency_key"):
        api.send({})


def test_missing_google_credentials_are_an_api_error(
    publisher: tuple[FakePublisher, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # A path that does not exist: google-auth fails before any network (no metadata server).
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    _, url = publisher
    with pytest.raises(ApiAuthError, match=f"cannot get a Google ID token for {url}"):
        PublisherApi(url, auth=google_id_token_auth(url)).stats()


def test_json_error_body_is_read(publisher: tuple[FakePublisher, str]) -> None:
    app, url = publisher
    app.answers["POST /v1/messages"] = JSON_400
    with pytest.raises(ApiHttpError) as info:
        PublisherApi(url).send({"to": ["x"]})
    error = info.value
    assert (error.status, error.code) == (400, "invalid_mail")
    assert error.fields == {"to.0": "is not an email address"}
    assert "HTTP 400 invalid_mail: the mail is not valid" in str(error)


def test_an_html_error_page_is_an_http_error_without_a_code(
    publisher: tuple[FakePublisher, str],
) -> None:
    app, url = publisher
    app.answers["GET /v1/stats"] = HTML_500
    with pytest.raises(ApiHttpError) as info:
        PublisherApi(url).stats()
    assert (info.value.status, info.value.code) == (500, None)
    assert "502 Bad Gateway" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "answer",
    [
        (202, "text/html", b"<html>accepted</html>"),
        (202, "application/json", b"[]"),
        (202, "application/json", b'{"trace_id": "t"}'),
    ],
)
def test_a_202_without_the_documented_json_is_a_bad_answer(
    publisher: tuple[FakePublisher, str], answer: Answer
) -> None:
    app, url = publisher
    app.answers["POST /v1/messages"] = answer
    with pytest.raises(ApiBadAnswer):
        PublisherApi(url).send({})


def test_record_404_is_none_unless_asked_for(publisher: tuple[FakePublisher, str]) -> None:
    _, url = publisher
    api = PublisherApi(url)
    assert api.record("nope") is None
    with pytest.raises(ApiHttpError, match="no mail at GET /v1/messages/nope"):
        api.record("nope", missing_ok=False)


def test_wait_returns_the_last_record_and_keeps_polling_through_5xx(
    publisher: tuple[FakePublisher, str],
) -> None:
    app, url = publisher
    answers = iter(
        [
            HTML_500,
            (200, "application/json", b'{"mail_id": "m-1", "status": "queued"}'),
            (200, "application/json", b'{"mail_id": "m-1", "status": "delivered"}'),
        ]
    )
    app.answers["GET /v1/messages/m-1"] = lambda: next(answers)
    record = PublisherApi(url, sleep=lambda _: None).wait("m-1", timeout=30)
    assert record == {"mail_id": "m-1", "status": "delivered"}


# --- the CLI: a clear message and an exit code ----------------------------------------------------


def test_send_to_a_closed_port_exits_1_without_a_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "ops", *SEND, "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot reach the publisher at {url}: Connection refused" in " ".join(
        result.stderr.split()
    )


@pytest.mark.parametrize(
    ("answers", "extra", "exit_code", "expected"),
    [
        (  # the API's JSON error: the caller's to fix; its text is not markup
            {"POST /v1/messages": JSON_400},
            (),
            2,
            [
                "HTTP 400 invalid_mail: the mail is not valid: fix the fields named [/bold] below",
                "to.0: is not an email address",
            ],
        ),
        (  # a proxy's HTML error page
            {"POST /v1/messages": HTML_500},
            (),
            1,
            ["HTTP 500: <html><body><h1>502 Bad Gateway</h1>"],
        ),
        (  # a 202 that is not JSON
            {"POST /v1/messages": (202, "text/html", b"<p>ok</p>")},
            (),
            1,
            ["not a JSON object: <p>ok</p>"],
        ),
        (  # accepted, but the record cannot be read while waiting
            {
                "POST /v1/messages": ACCEPTED,
                "GET /v1/messages/m-1": (200, "text/html", b"<p>a login page</p>"),
            },
            ("--wait", "5"),
            1,
            ["accepted mail_id=m-1", "not a JSON object: <p>a login page</p>"],
        ),
    ],
)
def test_send_against_a_misbehaving_publisher(
    publisher: tuple[FakePublisher, str],
    capsys: pytest.CaptureFixture[str],
    answers: dict[str, Answer],
    extra: tuple[str, ...],
    exit_code: int,
    expected: list[str],
) -> None:
    app, url = publisher
    app.answers.update(answers)
    code, _, err = run_cli(capsys, *SEND, "--url", url, *extra)
    assert code == exit_code
    for text in expected:
        assert text in err


def test_send_json_prints_the_publishers_answer(
    publisher: tuple[FakePublisher, str], capsys: pytest.CaptureFixture[str]
) -> None:
    app, url = publisher
    app.answers["POST /v1/messages"] = ACCEPTED
    code, out, _ = run_cli(capsys, *SEND, "--url", url, "--json")
    assert code == 0
    assert json.loads(out) == {"mail_id": "m-1", "trace_id": "0" * 32}


@pytest.mark.parametrize(
    ("argv", "answer", "expected"),
    [
        (("status", "m-1"), HTML_500, "HTTP 500: <html>"),
        (("status", "m-1"), (200, "text/html", b"<p>hi</p>"), "not a JSON object: <p>hi</p>"),
        (("status", "m-1"), (200, "application/json", b'{"status": "queued"}'), "shape"),
        (("status",), HTML_500, "HTTP 500: <html>"),
        (("status",), (200, "application/json", b'{"stuck": {"mails": [1]}}'), "shape"),
        (("status", "nope"), None, "HTTP 404 not_found: no mail at GET /v1/messages/nope"),
    ],
)
def test_status_against_a_misbehaving_publisher_exits_1(
    publisher: tuple[FakePublisher, str],
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    answer: Answer | None,
    expected: str,
) -> None:
    app, url = publisher
    if answer is not None:
        path = "/v1/stats" if argv == ("status",) else f"/v1/messages/{argv[1]}"
        app.answers[f"GET {path}"] = answer
    code, _, err = run_cli(capsys, *argv, "--url", url)
    assert code == 1
    assert expected in err


def test_status_with_nothing_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (("status",), ("status", "m-1")):
        code, _, err = run_cli(capsys, *argv, "--url", url)
        assert code == 1
        assert f"cannot reach the publisher at {url}: Connection refused" in err
