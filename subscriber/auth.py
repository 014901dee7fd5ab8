"""Checking the OIDC token Pub/Sub push attaches to each request.

The push subscription carries ``oidc_token {service_account_email, audience}``, so every push has
``Authorization: Bearer <Google-signed ID token>`` for that account and audience. Where the check
happens is a deployment declaration, ``MAILPIPE_PUSH_AUTH`` (what both services read of a token
is :mod:`mailpipe.id_token`):

``cloud-run``
    The subscriber runs on Cloud Run with IAM in front (invoker check on, ``run.invoker`` for the
    push account only). Cloud Run verifies the signature and the invoker, then forwards the token
    with its signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``
    (cloud.google.com/run/docs/troubleshooting#signature-removed), so an app that verifies the
    signature refuses every request. The subscriber checks the claims: issuer, audience, the push
    account's email, ``email_verified``, expiry. The header Cloud Run checked (and stripped) is
    ``X-Serverless-Authorization`` when the request has it, otherwise ``Authorization``
    (:func:`mailpipe.id_token.checked_header`), so that is the header read. A stripped token
    proves nothing by itself (anyone can write the marker): this mode is safe only when every
    request passes Cloud Run IAM, which is why it is a deployment declaration and never guessed
    from ``K_SERVICE``. A token that still carries a signature is verified in full.
``signature`` (default)
    Anywhere else (functions-framework elsewhere, a container with public access, a VM): the
    subscriber verifies the RS256 signature against Google's keys, then the claims. A stripped
    token is refused here: without Cloud Run IAM in front, nobody verified it.

The emulator never sends a token, so the check is off only in local mode (``PUBSUB_EMULATOR_HOST``)
without ``MAILPIPE_PUSH_AUDIENCE``.

Errors::

    PushAuthError          the request is not from our push subscription (HTTP 401)

(:class:`PushAuthenticator` translates :class:`mailpipe.id_token.TokenError`, which the lower
pieces raise, into it.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from jwt import PyJWKClient

from mailpipe.id_token import (
    AUTHORIZATION,
    DEFAULT_LEEWAY_SECONDS,
    GOOGLE_ISSUERS,
    GOOGLE_JWKS_URL,
    SERVERLESS_AUTHORIZATION,
    TokenError,
    decode_claims,
    is_signature_removed,
    request_token,
    signing_keys,
)

__all__ = ["GOOGLE_ISSUERS", "GOOGLE_JWKS_URL", "PushAuthError", "PushAuthenticator"]

PushAuthMode = Literal["cloud-run", "signature"]
PUSH_AUTH_MODES: tuple[str, ...] = get_args(PushAuthMode)


class PushAuthError(Exception):
    """The push request's credentials are missing or invalid. The message is safe to return."""


@dataclass(frozen=True)
class ExpectedToken:
    """What a token must say to be accepted.

    ``email`` is the caller's service account (for Pub/Sub push: the subscription's
    ``oidc_token.service_account_email``); ``None`` accepts any caller (never in production: the
    subscriber's config requires it outside local mode).
    """

    audience: str
    email: str | None = None
    issuers: tuple[str, ...] = GOOGLE_ISSUERS
    leeway_seconds: float = DEFAULT_LEEWAY_SECONDS


def claims_of_verified_token(token: str, expected: ExpectedToken) -> dict[str, Any]:
    """The claims of a token Cloud Run IAM has verified (signature stripped), checked.

    Checks the header (a Google ID token is RS256), issuer, audience, expiry and issue time, and
    the caller's email. Does **not** check a signature: call it only for requests that passed
    Cloud Run IAM (``MAILPIPE_PUSH_AUTH=cloud-run``).
    """
    if not is_signature_removed(token):
        raise TokenError("the token's signature was not removed by Cloud Run")
    return _checked(token, None, expected)


class SignatureVerifier:
    """Full verification of Google-signed ID tokens: RS256 signature against Google's JWKS, then
    the claims of :class:`ExpectedToken`.

    ``jwks_url`` is Google's by default; tests point it at a JWKS served on loopback. Keys are
    cached (Google rotates them about daily); a token with an unknown ``kid`` refetches them.
    """

    def __init__(self, expected: ExpectedToken, *, jwks_url: str = GOOGLE_JWKS_URL) -> None:
        self.expected = expected
        self._keys = signing_keys(jwks_url)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`TokenError`."""
        if is_signature_removed(token):
            raise TokenError(
                "the token's signature was removed by Cloud Run (SIGNATURE_REMOVED_BY_GOOGLE): "
                "this service runs behind Cloud Run IAM, which verified it; declare that with "
                "MAILPIPE_PUSH_AUTH=cloud-run"
            )
        return _checked(token, self._keys, self.expected)


class RequestAuthenticator:
    """Checks the ID token of a request in one of the two modes (see the module docstring).

    ``verify(headers)`` reads the header Cloud Run checks
    (:func:`mailpipe.id_token.checked_header`) and returns the token's claims or raises
    :class:`TokenError`.
    """

    def __init__(
        self,
        mode: PushAuthMode,
        expected: ExpectedToken,
        *,
        jwks_url: str = GOOGLE_JWKS_URL,
    ) -> None:
        if mode not in PUSH_AUTH_MODES:
            raise ValueError(f"mode must be one of {', '.join(PUSH_AUTH_MODES)}, got {mode!r}")
        if mode == "cloud-run" and expected.email is None:
            # Behind Cloud Run IAM every invoker of the service gets in; the email names ours.
            raise ValueError("cloud-run mode needs the caller's service account email")
        self.mode: PushAuthMode = mode
        self.expected = expected
        self._signature = SignatureVerifier(expected, jwks_url=jwks_url)

    def verify(self, headers: Mapping[str, str]) -> dict[str, Any]:
        token = request_token(headers)
        if self.mode == "cloud-run" and is_signature_removed(token):
            return claims_of_verified_token(token, self.expected)
        # signature mode, or a token Cloud Run forwarded with its signature: verify it in full.
        return self._signature.verify(token)


class PushAuthenticator:
    """Checks the push request's ID token in ``mode`` (see the module docstring).

    ``jwks_url`` is Google's by default; tests point it at a local JWKS on loopback.
    """

    def __init__(
        self,
        *,
        audience: str,
        service_account_email: str | None = None,
        mode: PushAuthMode = "signature",
        jwks_url: str = GOOGLE_JWKS_URL,
        issuers: tuple[str, ...] = GOOGLE_ISSUERS,
        leeway_seconds: float = 30.0,
    ) -> None:
        self.mode = mode
        self._check = RequestAuthenticator(
            mode,
            ExpectedToken(
                audience=audience,
                email=service_account_email,
                issuers=issuers,
                leeway_seconds=leeway_seconds,
            ),
            jwks_url=jwks_url,
        )

    def verify(
        self, authorization: str | None, *, serverless_authorization: str | None = None
    ) -> dict[str, Any]:
        """Return the token's claims, or raise :class:`PushAuthError`.

        ``authorization`` and ``serverless_authorization`` are the request's ``Authorization``
        and ``X-Serverless-Authorization`` headers; the second, when present, is the one Cloud Run
        checked and the one read.
        """
        headers: Mapping[str, str] = {
            name: value
            for name, value in (
                (AUTHORIZATION, authorization),
                (SERVERLESS_AUTHORIZATION, serverless_authorization),
            )
            if value is not None
        }
        try:
            return self._check.verify(headers)
        except TokenError as exc:
            raise PushAuthError(str(exc)) from exc


# --- helpers -------------------------------------------------------------------------------------


def _checked(token: str, keys: PyJWKClient | None, expected: ExpectedToken) -> dict[str, Any]:
    claims = decode_claims(
        token,
        keys,
        audience=expected.audience,
        issuers=expected.issuers,
        leeway_seconds=expected.leeway_seconds,
    )
    _check_email(claims, expected.email)
    return claims


def _check_email(claims: Mapping[str, Any], email: str | None) -> None:
    if email is None:
        return
    if claims.get("email") != email or claims.get("email_verified") is not True:
        raise TokenError("the token was not issued for the expected service account")
