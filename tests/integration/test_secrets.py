"""Secrets never leave the process: not in logs, spans, the record, or any HTTP answer.

A real run of the local stack (publisher and pull worker as processes, traces to a file) delivers
through an aiosmtpd relay that requires AUTH — once with the right password (235, delivered) and
once with a wrong one (535, deferred and retried) — and then every byte the run wrote is scanned
for the password in every form it takes on the wire (plain, base64, the AUTH PLAIN and AUTH LOGIN
encodings).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.request
from pathlib import Path

import pytest

from emulator.pipeline import run_local_pipeline
from emulator.smtp import LocalSmtpServer
from mailpipe.config import ConfigError
from mailpipe.topology import Topology
from subscriber.config import SubscriberConfig

USERNAME = "mailpipe-relay-user"


def secret_forms(password: str) -> set[str]:
    """How the password could appear: itself and what SMTP AUTH sends for it."""

    def b64(raw: str) -> str:
        return base64.b64encode(raw.encode()).decode()

    return {password, b64(password), b64(f"\0{USERNAME}\0{password}")}


def scan(paths: list[Path], forms: set[str]) -> list[str]:
    """``path: form`` for every file that contains one of ``forms``."""
    leaks = []
    for path in paths:
        data = path.read_bytes()
        for form in forms:
            if form.encode() in data:
                leaks.append(f"{path.name}: {form[:4]}…")
    return leaks


@pytest.fixture
def topology(stack_topology: Topology) -> Topology:
    return stack_topology


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # loopback
@pytest.mark.parametrize("password_is_right", [True, False], ids=["auth-ok", "auth-535"])
def test_the_smtp_password_appears_nowhere(
    tmp_path: Path, topology: Topology, pubsub_project: str, password_is_right: bool
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    relay_password = password if password_is_right else f"other-{secrets.token_hex(8)}"
    state = tmp_path / "state"
    answers: list[bytes] = []
    with (
        LocalSmtpServer(auth={USERNAME: relay_password}) as smtp,
        run_local_pipeline(
            state_dir=state,
            project=pubsub_project,
            topology=topology,
            smtp_server=smtp,
            extra_env={
                "MAILPIPE_SMTP_USERNAME": USERNAME,
                "MAILPIPE_SMTP_PASSWORD": password,
                "MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH": "1",  # loopback only
                "MAILPIPE_SMTP_TIMEOUT": "2",
            },
        ) as pipeline,
    ):
        accepted = pipeline.post_mail(
            {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
        )
        if password_is_right:
            record = pipeline.wait_for_status(accepted["mail_id"], {"delivered"}, timeout=30)
            [received] = smtp.wait_for(1)
            assert received.login == USERNAME
        else:
            deadline = time.monotonic() + 30
            while True:
                record = pipeline.get_record(accepted["mail_id"]) or {"attempts": []}
                if len(record["attempts"]) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert record["attempts"], record
            assert all(a["reply_code"] == 535 for a in record["attempts"])
            assert record["status"] in ("deferred", "sending", "dead_lettered")
            assert smtp.messages == []
        for url in (
            f"{pipeline.publisher_url}/v1/messages/{accepted['mail_id']}",
            f"{pipeline.publisher_url}/v1/messages",
        ):
            with urllib.request.urlopen(url, timeout=10) as response:
                answers.append(response.read())
        answers.append(json.dumps(accepted).encode())
    # The services have stopped (their last spans and log lines are flushed): scan it all.
    (tmp_path / "http-answers.txt").write_bytes(b"\n".join(answers))
    written = [p for p in state.rglob("*") if p.is_file()] + [tmp_path / "http-answers.txt"]
    names = {p.name for p in written}
    assert {"publisher.log", "subscriber.log", "traces.jsonl", "record.sqlite3"} <= names
    spans = (state / "traces.jsonl").read_text()
    assert '"smtp auth"' in spans  # the AUTH step ran and was traced: the scan is meaningful

    assert scan(written, secret_forms(password)) == []


def test_auth_in_clear_needs_an_explicit_opt_in_and_errors_never_show_the_password() -> None:
    password = f"pw-{secrets.token_hex(12)}"
    env = {
        "MAILPIPE_SMTP_TLS": "none",
        "MAILPIPE_SMTP_USERNAME": USERNAME,
        "MAILPIPE_SMTP_PASSWORD": password,
        "MAILPIPE_SMTP_PORT": "not-a-port",  # a second problem: the error lists both
    }
    with pytest.raises(ConfigError) as raised:
        SubscriberConfig.from_env(env)

    assert set(raised.value.problems) == {"MAILPIPE_SMTP_TLS", "MAILPIPE_SMTP_PORT"}
    assert password not in str(raised.value)
    config = SubscriberConfig.from_env(
        {**env, "MAILPIPE_SMTP_PORT": "2525", "MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH": "1"}
    )
    assert config.smtp.tls == "none" and password not in repr(config)
