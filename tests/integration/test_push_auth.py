"""The push endpoint lets in only Pub/Sub's OIDC token for our subscription.

Production Pub/Sub signs its tokens with Google's keys, which cannot be used here, so the tokens
are signed with an RSA key made for the test and the verifier (``PushAuthenticator``) fetches the
key set from a JWKS served over HTTP on loopback — the same code path as Google's JWKS URL.
Everything behind the check is real: the push app over HTTP, the delivery core, SQLite, aiosmtpd.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from opentelemetry.sdk.trace import TracerProvider

from emulator.process import free_port
from emulator.smtp import LocalSmtpServer
from mailpipe.config import SubscriberConfig
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import open_record
from subscriber.auth import PushAuthenticator
from subscriber.delivery import DeliveryService
from subscriber.dlq import DeadLetterRecorder
from subscriber.main import build_push_handler, build_services
from subscriber.push import PushHandler, create_push_app
from subscriber.smtp import SmtpSender
from tests.fixtures.http import serve_app
from tests.fixtures.smtp import make_smtp_config

AUDIENCE = "https://mailpipe-subscriber-abc123-ew.a.run.app/"
SERVICE_ACCOUNT = "pubsub-invoker@mailpipe-test.iam.gserviceaccount.com"
ISSUER = "https://accounts.google.com"
KID = "test-key-1"


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Keys:
    """The test's signing key (and an unrelated one), published as a JWKS on loopback."""

    def __init__(self) -> None:
        self.key = _private_key()
        self.other = _private_key()
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}
        self.fetches = 0

    def sign(
        self,
        overrides: dict[str, Any] | None = None,
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str = KID,
        drop: tuple[str, ...] = (),
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": AUDIENCE,
            "iss": ISSUER,
            "iat": now,
            "exp": now + 3600,
            "sub": "112233445566778899",
            "azp": "112233445566778899",
            "email": SERVICE_ACCOUNT,
            "email_verified": True,
            **(overrides or {}),
        }
        for name in drop:
            claims.pop(name, None)
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[Keys, str]]:
    """The keys and the URL of their JWKS (an HTTP server on 127.0.0.1)."""
    keys = Keys()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            keys.fetches += 1
            body = json.dumps(keys.jwks).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield keys, f"http://127.0.0.1:{server.server_port}/oauth2/v3/certs"
    finally:
        server.shutdown()
        server.server_close()


class PushEndpoint:
    def __init__(self, url: str, smtp: LocalSmtpServer, record_path: Path) -> None:
        self.url = url
        self.smtp = smtp
        self.record_path = record_path

    def post(self, authorization: str | None, path: str = "/") -> tuple[httpx.Response, str]:
        mail = QueuedMail.accept(
            MailRequest.model_validate(
                {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
            )
        )
        data, attributes = mail.to_pubsub()
        envelope = {
            "message": {
                "data": base64.b64encode(data).decode(),
                "attributes": attributes,
                "messageId": "1",
            },
            "subscription": "projects/mailpipe-test/subscriptions/mailpipe-delivery",
        }
        headers = {"Authorization": authorization} if authorization is not None else {}
        return httpx.post(self.url + path, json=envelope, headers=headers, timeout=30), mail.mail_id


@pytest.fixture
def endpoint(
    keys: tuple[Keys, str], smtp_server: LocalSmtpServer, tmp_path: Path
) -> Iterator[PushEndpoint]:
    _, jwks_url = keys
    env = {
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",  # never contacted: the push path needs no client
        "MAILPIPE_RECORD": f"sqlite:///{tmp_path / 'record.sqlite3'}",
        "MAILPIPE_SMTP_TLS": "none",
        "MAILPIPE_SMTP_PORT": str(smtp_server.port),
    }
    config = SubscriberConfig.from_env(env)
    record = open_record(config.record)
    tracer = TracerProvider().get_tracer("test")
    sender = SmtpSender(make_smtp_config(smtp_server), tracer=tracer)
    delivery = DeliveryService(
        sender=sender, record=record, tracer=tracer, message_id_domain="mailpipe.test"
    )
    handler = PushHandler(
        config,
        delivery=delivery,
        dead_letters=DeadLetterRecorder(record=record, tracer=tracer),
        authenticator=PushAuthenticator(
            audience=AUDIENCE, service_account_email=SERVICE_ACCOUNT, jwks_url=jwks_url
        ),
    )
    try:
        with serve_app(create_push_app(handler)) as url:
            yield PushEndpoint(url, smtp_server, tmp_path / "record.sqlite3")
    finally:
        sender.close()
        record.close()


def test_a_valid_token_is_let_in_and_the_mail_delivered(
    keys: tuple[Keys, str], endpoint: PushEndpoint
) -> None:
    response, mail_id = endpoint.post(f"Bearer {keys[0].sign()}")

    assert response.status_code == 204, response.text
    [received] = endpoint.smtp.wait_for(1)
    assert received.message["Message-ID"] == f"<{mail_id}@mailpipe.test>"


def _forged_hs256(keys: Keys) -> str:
    """The algorithm-confusion attack: HS256 keyed with the public key's PEM."""
    pem = keys.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": KID, "typ": "JWT"}
    claims = {
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": int(time.time()),
        "exp": int(time.time()) + 600,
        "email": SERVICE_ACCOUNT,
        "email_verified": True,
    }
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


BAD_TOKENS = {
    "wrong audience": lambda k: f"Bearer {k.sign({'aud': 'https://someone-else.run.app/'})}",
    "wrong issuer": lambda k: f"Bearer {k.sign({'iss': 'https://evil.example.com'})}",
    "wrong service account": lambda k: (
        f"Bearer {k.sign({'email': 'attacker@evil.iam.gserviceaccount.com'})}"
    ),
    "email not verified": lambda k: f"Bearer {k.sign({'email_verified': False})}",
    "no email": lambda k: f"Bearer {k.sign(drop=('email',))}",
    "expired": lambda k: (
        f"Bearer {k.sign({'iat': int(time.time()) - 7200, 'exp': int(time.time()) - 3600})}"
    ),
    "no expiry": lambda k: f"Bearer {k.sign(drop=('exp',))}",
    "bad signature": lambda k: f"Bearer {k.sign(key=k.other)}",
    "tampered claims": lambda k: "Bearer " + _tamper(k.sign()),
    "unknown kid": lambda k: f"Bearer {k.sign(kid='not-a-key-we-publish')}",
    "alg none": lambda k: (
        "Bearer "
        + jwt.encode(
            {"aud": AUDIENCE, "iss": ISSUER, "email": SERVICE_ACCOUNT}, key=None, algorithm="none"
        )
    ),
    "alg confusion HS256": lambda k: f"Bearer {_forged_hs256(k)}",
    "missing header": lambda k: None,
    "not bearer": lambda k: f"Basic {base64.b64encode(b'user:pass').decode()}",
    "bearer without a token": lambda k: "Bearer",
    "garbage": lambda k: "Bearer not.a.jwt",
}


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["email"] = "attacker@evil.iam.gserviceaccount.com"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
@pytest.mark.parametrize("path", ["/", "/dead-letter"])
def test_a_bad_token_gets_401_and_nothing_is_sent(
    keys: tuple[Keys, str],
    endpoint: PushEndpoint,
    case: str,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    authorization = BAD_TOKENS[case](keys[0])
    response, mail_id = endpoint.post(authorization, path)

    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "unauthenticated"
    token = (authorization or "").partition(" ")[2].strip()
    if token:
        assert token not in response.text  # the token is never echoed back, nor logged
        assert token not in caplog.text
    assert endpoint.smtp.messages == []
    record = open_record(f"sqlite:///{endpoint.record_path}")
    try:
        assert record.get(mail_id) is None  # not even claimed
    finally:
        record.close()


def test_outside_local_mode_the_push_app_refuses_to_start_without_an_audience(
    tmp_path: Path,
) -> None:
    env = {
        "GOOGLE_CLOUD_PROJECT": "mailpipe-test",
        "MAILPIPE_RECORD": f"sqlite:///{tmp_path / 'record.sqlite3'}",
        "MAILPIPE_SMTP_TLS": "none",
    }
    config = SubscriberConfig.from_env(env)  # no PUBSUB_EMULATOR_HOST: production mode
    services = build_services(config)
    try:
        with pytest.raises(ValueError, match="MAILPIPE_PUSH_AUDIENCE"):
            build_push_handler(config, services)
    finally:
        services.close()


def test_the_push_service_process_exits_without_an_audience(tmp_path: Path) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MAILPIPE_") and key != "PUBSUB_EMULATOR_HOST"
    }
    env.update(
        GOOGLE_CLOUD_PROJECT="mailpipe-test",
        MAILPIPE_RECORD=f"sqlite:///{tmp_path / 'record.sqlite3'}",
        MAILPIPE_SMTP_TLS="none",
        PORT=str(free_port()),
    )
    result = subprocess.run(
        [sys.executable, "-m", "subscriber", "push"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode != 0
    assert "MAILPIPE_PUSH_AUDIENCE" in result.stdout + result.stderr
