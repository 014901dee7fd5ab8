"""Google ID tokens without servers: the claims of push tokens Cloud Run IAM verified
(subscriber/auth.py), and the caller's identity the publisher reads from them (publisher/caller.py),
on the token reading both share (mailpipe/id_token.py).

The tokens here are built as Cloud Run forwards them: header and claims base64url-encoded, the
signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``. Signature verification against a JWKS, and
the stand-in for Cloud Run's front, are in tests/integration/test_push_auth.py.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from mailpipe.id_token import TokenError, checked_header, is_signature_removed
from publisher.caller import identify_caller
from subscriber.auth import ExpectedToken, RequestAuthenticator, claims_of_verified_token

AUDIENCE = "mailpipe-push:mailpipe-test:mailpipe-delivery"
PUSHER = "pubsub-invoker@mailpipe-test.iam.gserviceaccount.com"


def stripped(header: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    values: dict[str, Any] = {
        "aud": AUDIENCE,
        "iss": "https://accounts.google.com",
        "iat": now,
        "exp": now + 3600,
        "sub": "1234567890",
        "email": PUSHER,
        "email_verified": True,
        **claims,
    }
    values = {k: v for k, v in values.items() if v is not None}

    def b64(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return (
        f"{b64(header or {'alg': 'RS256', 'kid': 'k1'})}.{b64(values)}.SIGNATURE_REMOVED_BY_GOOGLE"
    )


EXPECTED = ExpectedToken(audience=AUDIENCE, email=PUSHER)


def test_the_claims_of_a_token_cloud_run_verified_are_checked() -> None:
    claims = claims_of_verified_token(stripped(), EXPECTED)
    assert claims["email"] == PUSHER

    for bad in (
        stripped(aud="https://other.run.app"),
        stripped(iss="https://evil.example.com"),
        stripped(email="someone@else.iam.gserviceaccount.com"),
        stripped(email_verified=None),
        stripped(exp=int(time.time()) - 600),
        stripped(exp=None),
        stripped({"alg": "none"}),
    ):
        with pytest.raises(TokenError):
            claims_of_verified_token(bad, EXPECTED)


def test_the_checked_header_is_x_serverless_authorization_when_present() -> None:
    both = {"authorization": "Bearer app", "x-serverless-authorization": "Bearer iam"}
    assert checked_header(both) == ("X-Serverless-Authorization", "Bearer iam")
    assert checked_header({"AUTHORIZATION": "Bearer iam"}) == ("Authorization", "Bearer iam")
    assert checked_header({}) == ("Authorization", None)


def test_cloud_run_mode_reads_only_the_checked_header() -> None:
    authenticator = RequestAuthenticator("cloud-run", EXPECTED)
    assert authenticator.verify({"Authorization": f"Bearer {stripped()}"})["email"] == PUSHER
    operator = stripped(email="op@x.iam.gserviceaccount.com")
    with pytest.raises(TokenError, match="expected service account"):
        authenticator.verify(
            {
                "X-Serverless-Authorization": f"Bearer {operator}",
                "Authorization": f"Bearer {stripped()}",
            }
        )


def test_cloud_run_mode_needs_the_push_account() -> None:
    with pytest.raises(ValueError, match="service account"):
        RequestAuthenticator("cloud-run", ExpectedToken(audience=AUDIENCE))


def test_is_signature_removed_only_for_the_third_segment() -> None:
    assert is_signature_removed(stripped())
    assert not is_signature_removed("a.b.c")
    assert not is_signature_removed(stripped() + ".x")
    assert not is_signature_removed("SIGNATURE_REMOVED_BY_GOOGLE")


def test_identify_caller_names_the_verified_invoker() -> None:
    headers = {"Authorization": f"Bearer {stripped(email='Ada@Example.com')}"}
    assert identify_caller(headers, local_mode=False) == "ada@example.com"
    assert identify_caller({}, local_mode=True) is None
    # No email claim (minted without format=full): the stable subject id instead.
    assert identify_caller(
        {"Authorization": f"Bearer {stripped(email=None)}"}, local_mode=False
    ) == ("sub:1234567890")
    # The audience is Cloud Run's to check (the service URL or a custom audience), not ours.
    other_audience = {"Authorization": f"Bearer {stripped(aud='https://pub.run.app')}"}
    assert identify_caller(other_audience, local_mode=False) == PUSHER


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {stripped(exp=int(time.time()) - 600)}"},
        {"Authorization": f"Bearer {stripped(iss='https://evil.example.com')}"},
        {"Authorization": f"Bearer {stripped(email_verified=False)}"},
        {"Authorization": f"Bearer {stripped(email=None, sub=None)}"},
        # Cloud Run strips only the signature of a Google ID token, which is RS256.
        {"Authorization": f"Bearer {stripped({'alg': 'none'})}"},
        # The checked header wins even when Authorization would pass.
        {"X-Serverless-Authorization": "Bearer garbage", "Authorization": f"Bearer {stripped()}"},
    ],
)
def test_identify_caller_refuses_what_names_no_verified_caller(headers: dict[str, str]) -> None:
    with pytest.raises(TokenError):
        identify_caller(headers, local_mode=False)
