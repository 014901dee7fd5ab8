"""The push endpoint lets in only Pub/Sub's OIDC token for our subscription.

Production Pub/Sub signs its tokens with Google's keys, which cannot be used here, so the tokens
are signed with an RSA key made for the test and the verifier (``PushAuthenticator``) fetches the
key set from a JWKS served over HTTP on loopback — the same code path as Google's JWKS URL.
Everything behind the check is real: the push app over HTTP, the delivery core, SQLite, aiosmtpd.

Two deployments, two modes (``MAILPIPE_PUSH_AUTH``):

- ``signature``: nothing in front; the endpoint verifies the signature itself. A token whose
  signature Cloud Run removed is refused: nobody verified it.
- ``cloud-run``: Cloud Run IAM in front. Cloud Run cannot run here, so
  ``tests.fixtures.cloud_run`` stands in for its front (a proxy on loopback that verifies the
  token against the test's JWKS, checks the invoker, strips the signature exactly as Cloud Run
  does and forwards). Pushes go through it, as they do on GCP; the endpoint checks the claims of
  the stripped token.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, jsonify, request
from opentelemetry.sdk.trace import TracerProvider

from emulator.process import free_port
from emulator.smtp import LocalSmtpServer
from mailpipe.config import ConfigError
from mailpipe.id_token import TokenError
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import open_record
from publisher.app import create_app
from publisher.caller import identify_caller
from publisher.config import PublisherConfig
from publisher.main import caller_identity
from publisher.pubsub import PubSubMailPublisher
from subscriber.auth import PushAuthenticator, PushAuthMode
from subscriber.config import SubscriberConfig
from subscriber.dead_letters import DeadLetterRecorder
from subscriber.delivery import DeliveryService
from subscriber.main import build_push_handler, build_services
from subscriber.push import PushHandler, create_push_app
from subscriber.smtp import SmtpSender
from tests.fixtures.cloud_run import CloudRunFront, cloud_run_front, strip_signature
from tests.fixtures.http import QuietJsonHandler, serve_app
from tests.fixtures.pipeline import pipeline_env
from tests.fixtures.publishing import key_holder
from tests.fixtures.smtp import make_smtp_config

AUDIENCE = "https://mailpipe-subscriber-abc123-ew.a.run.app/"
SERVICE_ACCOUNT = "pubsub-invoker@mailpipe-test.iam.gserviceaccount.com"
ISSUER = "https://accounts.google.com"
KID = "test-key-1"


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _claims(**changes: Any) -> dict[str, Any]:
    """The claims of a Google-signed ID token for SERVICE_ACCOUNT; a change to None drops one."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": AUDIENCE,
        "iss": ISSUER,
        "iat": now,
        "exp": now + 3600,
        "sub": "112233445566778899",
        "email": SERVICE_ACCOUNT,
        "email_verified": True,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


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
        claims = {**_claims(azp="112233445566778899"), **(overrides or {})}
        for name in drop:
            claims.pop(name, None)
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[Keys, str]]:
    """The keys and the URL of their JWKS (an HTTP server on 127.0.0.1)."""
    keys = Keys()

    class Handler(QuietJsonHandler):
        def do_GET(self) -> None:
            keys.fetches += 1
            self.send_json(keys.jwks)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield keys, f"http://127.0.0.1:{server.server_port}/oauth2/v3/certs"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class PushEndpoint:
    url: str
    smtp: LocalSmtpServer
    record_path: Path

    def post(
        self,
        authorization: str | None,
        path: str = "/",
        *,
        via: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, str]:
        """POST a push of a new mail to the endpoint (or ``via`` another URL, e.g. a front)."""
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
        sent = {"Authorization": authorization} if authorization is not None else {}
        sent.update(headers or {})
        url = (via or self.url) + path
        return httpx.post(url, json=envelope, headers=sent, timeout=30), mail.mail_id

    def recorded(self, mail_id: str) -> bool:
        record = open_record(f"sqlite:///{self.record_path}")
        try:
            return record.get(mail_id) is not None
        finally:
            record.close()


MakeEndpoint = Callable[..., PushEndpoint]


@pytest.fixture
def make_endpoint(
    keys: tuple[Keys, str], smtp_server: LocalSmtpServer, tmp_path: Path
) -> Iterator[MakeEndpoint]:
    """``make_endpoint(mode)``: a push endpoint checking tokens in that mode, served over HTTP."""
    _, jwks_url = keys
    stack = ExitStack()
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

    def make(mode: PushAuthMode = "signature") -> PushEndpoint:
        handler = PushHandler(
            config,
            delivery=delivery,
            dead_letters=DeadLetterRecorder(record=record, tracer=tracer),
            authenticator=PushAuthenticator(
                audience=AUDIENCE,
                service_account_email=SERVICE_ACCOUNT,
                mode=mode,
                jwks_url=jwks_url,
            ),
        )
        url = stack.enter_context(serve_app(create_push_app(handler)))
        return PushEndpoint(url, smtp_server, tmp_path / "record.sqlite3")

    try:
        yield make
    finally:
        stack.close()
        sender.close()
        record.close()


@pytest.fixture
def endpoint(make_endpoint: MakeEndpoint) -> PushEndpoint:
    """The endpoint in ``signature`` mode (no Cloud Run in front)."""
    return make_endpoint("signature")


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
    assert "MAILPIPE_PUSH_SERVICE_ACCOUNT" in result.stdout + result.stderr


def test_outside_local_mode_the_push_config_lists_every_missing_push_setting() -> None:
    env = {"GOOGLE_CLOUD_PROJECT": "mailpipe-test", "MAILPIPE_PUSH_AUTH": "cloudrun"}
    with pytest.raises(ConfigError) as raised:
        SubscriberConfig.from_env(env, push=True)

    assert set(raised.value.problems) == {
        "MAILPIPE_PUSH_AUDIENCE",
        "MAILPIPE_PUSH_SERVICE_ACCOUNT",
        "MAILPIPE_PUSH_AUTH",  # cloud-run or signature, nothing else
    }
    # The pull worker and local mode need none of them.
    assert (
        SubscriberConfig.from_env({"GOOGLE_CLOUD_PROJECT": "mailpipe-test"}).push_audience is None
    )
    assert SubscriberConfig.from_env({"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}, push=True)


def test_the_push_auth_mode_is_declared_never_guessed_from_the_platform() -> None:
    production = {
        "GOOGLE_CLOUD_PROJECT": "mailpipe-test",
        "MAILPIPE_PUSH_AUDIENCE": AUDIENCE,
        "MAILPIPE_PUSH_SERVICE_ACCOUNT": SERVICE_ACCOUNT,
        # What every Cloud Run service has, public invoker or not.
        "K_SERVICE": "mailpipe-subscriber",
        "K_REVISION": "mailpipe-subscriber-00001-abc",
        "K_CONFIGURATION": "mailpipe-subscriber",
    }
    assert SubscriberConfig.from_env(production, push=True).push_auth == "signature"
    declared = {**production, "MAILPIPE_PUSH_AUTH": "cloud-run"}
    assert SubscriberConfig.from_env(declared, push=True).push_auth == "cloud-run"


# ------------------------------------------------------------------------------------------------
# cloud-run mode: Cloud Run IAM in front, the endpoint checks the stripped token's claims
# ------------------------------------------------------------------------------------------------

SERVICE_URL = "https://mailpipe-subscriber-abc123-ew.a.run.app"
# Another account holding run.invoker on the subscriber (an operator, another service...).
OTHER_INVOKER = "operator@mailpipe-test.iam.gserviceaccount.com"


@dataclass
class Front:
    url: str
    proxy: CloudRunFront
    endpoint: PushEndpoint

    def push(
        self, authorization: str | None, path: str = "/", **headers: str
    ) -> tuple[httpx.Response, str]:
        extra = {name.replace("_", "-"): value for name, value in headers.items()}
        return self.endpoint.post(authorization, path, via=self.url, headers=extra)


@contextmanager
def _served_behind_front(app: Any, keys: tuple[Keys, str]) -> Iterator[tuple[str, str]]:
    """``app`` over HTTP behind Cloud Run's front (audience: the service URL): the front's URL
    and the container's own."""
    with (
        serve_app(app) as backend,
        cloud_run_front(
            backend_url=backend,
            jwks_url=keys[1],
            audiences=(SERVICE_URL,),
            invokers=frozenset({SERVICE_ACCOUNT, OTHER_INVOKER}),
        ) as (url, _),
    ):
        yield url, backend


@contextmanager
def _front_of(keys: tuple[Keys, str], endpoint: PushEndpoint) -> Iterator[Front]:
    with cloud_run_front(
        backend_url=endpoint.url,
        jwks_url=keys[1],
        # Cloud Run accepts its URL and its custom audiences (Terraform: custom_audiences).
        audiences=(SERVICE_URL, AUDIENCE),
        invokers=frozenset({SERVICE_ACCOUNT, OTHER_INVOKER}),
    ) as (url, proxy):
        yield Front(url, proxy, endpoint)


@pytest.fixture
def front(keys: tuple[Keys, str], make_endpoint: MakeEndpoint) -> Iterator[Front]:
    """The endpoint in cloud-run mode behind the stand-in for Cloud Run's front."""
    with _front_of(keys, make_endpoint("cloud-run")) as front:
        yield front


def test_behind_cloud_run_a_push_is_delivered(
    keys: tuple[Keys, str], front: Front, caplog: pytest.LogCaptureFixture
) -> None:
    token = keys[0].sign()
    response, mail_id = front.push(f"Bearer {token}")

    assert response.status_code == 204, response.text
    assert front.proxy.forwarded == 1  # it went through the front, signature stripped
    [received] = front.endpoint.smtp.wait_for(1)
    assert received.message["Message-ID"] == f"<{mail_id}@mailpipe.test>"
    assert token.split(".")[1] not in caplog.text  # claims are not logged either


def test_behind_cloud_run_the_signature_mode_refuses_every_push(
    keys: tuple[Keys, str], make_endpoint: MakeEndpoint
) -> None:
    """Issue 15 #2, as deployed before: the app verified a signature Cloud Run had removed."""
    with _front_of(keys, make_endpoint("signature")) as front:
        response, mail_id = front.push(f"Bearer {keys[0].sign()}")

    assert front.proxy.forwarded == 1
    assert response.status_code == 401
    assert "MAILPIPE_PUSH_AUTH=cloud-run" in response.json()["error"]["message"]
    assert front.endpoint.smtp.messages == [] and not front.endpoint.recorded(mail_id)


@pytest.mark.parametrize(
    ("case", "overrides"),
    [
        # Valid for Cloud Run (its URL is an audience) but not the push subscription's audience.
        ("audience of the service URL", {"aud": SERVICE_URL}),
        # Another account with run.invoker: Cloud Run lets it in, the endpoint does not.
        ("another invoker", {"email": OTHER_INVOKER}),
    ],
)
def test_behind_cloud_run_a_token_cloud_run_accepts_but_not_for_our_push_is_refused(
    keys: tuple[Keys, str], front: Front, case: str, overrides: dict[str, Any]
) -> None:
    response, mail_id = front.push(f"Bearer {keys[0].sign(overrides)}")

    assert front.proxy.forwarded == 1, case  # Cloud Run let it through...
    assert response.status_code == 401, response.text  # ...the endpoint's claim check did not
    assert response.json()["error"]["code"] == "unauthenticated"
    assert front.endpoint.smtp.messages == [] and not front.endpoint.recorded(mail_id)


def test_with_x_serverless_authorization_the_endpoint_reads_the_header_cloud_run_checked(
    keys: tuple[Keys, str], front: Front
) -> None:
    """With both headers Cloud Run checks (and strips) only X-Serverless-Authorization and passes
    Authorization on untouched: the endpoint must read the one Cloud Run checked."""
    # The push account in X-Serverless-Authorization; Authorization is the app's own business.
    response, _ = front.push(
        "Bearer app-specific-credential", X_Serverless_Authorization=(f"Bearer {keys[0].sign()}")
    )
    assert response.status_code == 204, response.text

    # Another invoker in the checked header, and in Authorization a forged stripped token with
    # the push account's claims: Cloud Run forwards the forgery as it is. Reading Authorization
    # first would let it in.
    forged = strip_signature(keys[0].sign(key=keys[0].other))
    response, mail_id = front.push(
        f"Bearer {forged}",
        X_Serverless_Authorization=f"Bearer {keys[0].sign({'email': OTHER_INVOKER})}",
    )
    assert front.proxy.forwarded == 2
    assert response.status_code == 401, response.text
    assert not front.endpoint.recorded(mail_id)
    assert len(front.endpoint.smtp.messages) == 1  # only the first push was delivered


def test_the_stand_in_front_refuses_what_cloud_run_refuses(
    keys: tuple[Keys, str], front: Front
) -> None:
    """The stand-in is no pass-through: a token Cloud Run would refuse never reaches the app."""
    for authorization in (
        None,
        f"Bearer {keys[0].sign(key=keys[0].other)}",  # not signed by Google's key
        f"Bearer {strip_signature(keys[0].sign())}",  # a stripped token is no credential
        f"Bearer {keys[0].sign({'aud': 'https://someone-else.run.app/'})}",
        f"Bearer {keys[0].sign({'email': 'stranger@evil.iam.gserviceaccount.com'})}",
    ):
        response, _ = front.push(authorization)
        assert response.status_code in (401, 403)
    assert front.proxy.forwarded == 0


def _unsigned(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """A token as Cloud Run forwards it, forged: any header and claims, signature 'removed'."""

    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    header = header or {"alg": "RS256", "kid": KID, "typ": "JWT"}
    return f"{b64(header)}.{b64(claims)}.SIGNATURE_REMOVED_BY_GOOGLE"


# Stripped tokens with forged claims, sent straight to a cloud-run-mode endpoint (as if the front
# had let them through). On GCP they cannot get there: Cloud Run verified the signature. The claim
# check is what remains, and it must refuse each of these.
BAD_STRIPPED = {
    "wrong audience": lambda k: _unsigned(_claims(aud="https://someone-else.run.app/")),
    "wrong issuer": lambda k: _unsigned(_claims(iss="https://evil.example.com")),
    "wrong service account": lambda k: _unsigned(_claims(email=OTHER_INVOKER)),
    "email not verified": lambda k: _unsigned(_claims(email_verified=False)),
    "email_verified as a string": lambda k: _unsigned(_claims(email_verified="true")),
    "no email": lambda k: _unsigned(_claims(email=None)),
    "expired": lambda k: _unsigned(
        _claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    ),
    "no expiry": lambda k: _unsigned(_claims(exp=None)),
    "no issue time": lambda k: _unsigned(_claims(iat=None)),
    "not yet valid": lambda k: _unsigned(_claims(nbf=int(time.time()) + 3600)),
    "alg none header": lambda k: _unsigned(_claims(), {"alg": "none"}),
    "HS256 header": lambda k: _unsigned(_claims(), {"alg": "HS256", "kid": KID}),
    "claims not JSON": lambda k: "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.SIGNATURE_REMOVED_BY_GOOGLE",
    "claims a JSON list": lambda k: (
        "eyJhbGciOiJSUzI1NiJ9."
        + base64.urlsafe_b64encode(b"[1, 2]").rstrip(b"=").decode()
        + ".SIGNATURE_REMOVED_BY_GOOGLE"
    ),
    "marker as a fourth segment": lambda k: k.sign() + ".SIGNATURE_REMOVED_BY_GOOGLE",
    # Not stripped: then the signature is verified in full, and these fail it.
    "signed with another key": lambda k: k.sign(key=k.other),
    "alg confusion HS256": _forged_hs256,
    "empty signature": lambda k: ".".join(k.sign().split(".")[:2]) + ".",
}


@pytest.mark.parametrize("case", sorted(BAD_STRIPPED))
def test_in_cloud_run_mode_forged_claims_get_401_and_nothing_is_sent(
    keys: tuple[Keys, str],
    make_endpoint: MakeEndpoint,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = make_endpoint("cloud-run")
    token = BAD_STRIPPED[case](keys[0])
    response, mail_id = endpoint.post(f"Bearer {token}")

    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthenticated"
    assert token not in response.text and token not in caplog.text
    assert endpoint.smtp.messages == [] and not endpoint.recorded(mail_id)


def test_in_cloud_run_mode_a_token_still_signed_is_verified_in_full(
    keys: tuple[Keys, str], make_endpoint: MakeEndpoint
) -> None:
    """Should Cloud Run ever forward a token with its signature, it is verified, not rejected."""
    endpoint = make_endpoint("cloud-run")
    response, _ = endpoint.post(f"Bearer {keys[0].sign()}")
    assert response.status_code == 204, response.text


def test_a_stripped_token_sent_straight_to_a_signature_mode_endpoint_is_refused(
    keys: tuple[Keys, str], endpoint: PushEndpoint
) -> None:
    """Without Cloud Run IAM in front nobody verified it: claims alone prove nothing."""
    for token in (strip_signature(keys[0].sign()), _unsigned(_claims())):
        response, mail_id = endpoint.post(f"Bearer {token}")
        assert response.status_code == 401, response.text
        assert "SIGNATURE_REMOVED_BY_GOOGLE" in response.json()["error"]["message"]
        assert not endpoint.recorded(mail_id)
    for header in ("X-Serverless-Authorization", "Authorization"):
        response, _ = endpoint.post(None, headers={header: f"Bearer {_unsigned(_claims())}"})
        assert response.status_code == 401
    assert endpoint.smtp.messages == []


# ------------------------------------------------------------------------------------------------
# The caller's identity (the publisher, behind Cloud Run IAM: idempotency keys per caller)
# ------------------------------------------------------------------------------------------------


def test_the_caller_identity_is_the_invoker_cloud_run_verified(keys: tuple[Keys, str]) -> None:
    app = Flask("caller-identity")

    @app.post("/")
    def who() -> Response:
        return jsonify(caller=identify_caller(request.headers, local_mode=False))

    @app.errorhandler(TokenError)
    def refused(exc: TokenError) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 401

    with _served_behind_front(app, keys) as (url, _):
        operator = keys[0].sign({"aud": SERVICE_URL, "email": OTHER_INVOKER})
        answer = httpx.post(url, headers={"Authorization": f"Bearer {operator}"})
        assert answer.json() == {"caller": OTHER_INVOKER}

        # X-Serverless-Authorization is the caller Cloud Run checked; Authorization is not.
        pusher = keys[0].sign({"aud": SERVICE_URL})
        forged = _unsigned(_claims(aud=SERVICE_URL, email="ceo@example.com"))
        answer = httpx.post(
            url,
            headers={
                "X-Serverless-Authorization": f"Bearer {pusher}",
                "Authorization": f"Bearer {forged}",
            },
        )
        assert answer.json() == {"caller": SERVICE_ACCOUNT}

        # Straight to the backend (no front): a signed token is verified against the keys...
        signed = keys[0].sign({"aud": SERVICE_URL})
        assert (
            identify_caller(
                {"Authorization": f"Bearer {signed}"}, local_mode=False, jwks_url=keys[1]
            )
            == SERVICE_ACCOUNT
        )
        with pytest.raises(TokenError):
            identify_caller(
                {"Authorization": f"Bearer {keys[0].sign(key=keys[0].other)}"},
                local_mode=False,
                jwks_url=keys[1],
            )
    # ...and in local mode there is no caller to name.
    assert identify_caller({}, local_mode=True) is None


def test_behind_cloud_run_the_publisher_scopes_idempotency_keys_to_the_verified_invoker(
    keys: tuple[Keys, str],
    pubsub_emulator: Any,
    pubsub_project: str,
    mail_topology: Any,
    tmp_path: Path,
) -> None:
    # The real publisher app as `python -m publisher` wires it (caller_identity, not local mode),
    # the real Pub/Sub client against the emulator, behind the stand-in for Cloud Run's IAM front.
    env = pipeline_env(pubsub_emulator, pubsub_project, mail_topology, tmp_path / "r.sqlite3", 25)
    config = PublisherConfig.from_env(env, mail_topology)
    record = open_record(config.record)
    publisher = PubSubMailPublisher(config.pubsub, timeout=30)
    app = create_app(
        config,
        publisher=publisher,
        record=record,
        identify_caller=caller_identity(local_mode=False, jwks_url=keys[1]),
    )
    mail = {
        "from": "ada@example.com",
        "to": ["bob@example.org"],
        "subject": "hi",
        "text": "hello",
        "idempotency_key": "invoice-42",
    }
    try:
        with _served_behind_front(app, keys) as (url, backend):

            def post(invoker: str) -> httpx.Response:
                token = keys[0].sign({"aud": SERVICE_URL, "email": invoker})
                return httpx.post(
                    f"{url}/v1/messages",
                    json=mail,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                )

            first, other, again = post(SERVICE_ACCOUNT), post(OTHER_INVOKER), post(SERVICE_ACCOUNT)
            assert [r.status_code for r in (first, other, again)] == [202, 202, 202]
            # Another caller reusing the key gets a mail of its own, not the first caller's ids.
            assert other.json()["mail_id"] != first.json()["mail_id"]
            assert again.json() == first.json()
            assert again.headers["Idempotent-Replayed"] == "true"

            # Straight to the container (no front) with a forged stripped token: the claims are
            # checked, an expired one is refused with a JSON 401 and nothing is accepted.
            forged = _unsigned(_claims(aud=SERVICE_URL, email=OTHER_INVOKER, exp=1))
            refused = httpx.post(
                f"{backend}/v1/messages",
                json={**mail, "idempotency_key": "invoice-43"},
                headers={"Authorization": f"Bearer {forged}"},
                timeout=30,
            )
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthenticated"
            assert key_holder(record, "invoice-43", scope=OTHER_INVOKER) is None
            # A batch with that token is refused whole (one 401), not mail by mail in a 207.
            batch = httpx.post(
                f"{backend}/v1/messages:batch",
                json={"messages": [{**mail, "idempotency_key": "invoice-44"}, mail]},
                headers={"Authorization": f"Bearer {forged}"},
                timeout=30,
            )
            assert batch.status_code == 401, batch.text
            assert batch.json()["error"]["code"] == "unauthenticated"
            assert key_holder(record, "invoice-44", scope=OTHER_INVOKER) is None
    finally:
        publisher.close()
        record.close()
