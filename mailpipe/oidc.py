"""Google-signed ID tokens: verified here, or checked after Cloud Run has verified them.

Two ways a service learns who called it:

``signature``
    The token arrives as Google signed it. Verify the RS256 signature against Google's JWKS, then
    the claims. For any host without Cloud Run IAM in front (functions-framework elsewhere, a
    container with public access, a VM).
``cloud-run``
    Cloud Run IAM sits in front (invoker check on, ``run.invoker`` granted to named callers only).
    Cloud Run verifies the token's signature and the caller's invoker role, then forwards the
    request with the signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``
    (cloud.google.com/run/docs/troubleshooting#signature-removed), so an app that verifies the
    signature refuses every request. The app still checks the claims: issuer, audience, email,
    ``email_verified``, expiry. The header Cloud Run checked (and stripped) is
    ``X-Serverless-Authorization`` when the request has it, otherwise ``Authorization``; with both,
    Cloud Run checks only ``X-Serverless-Authorization`` and forwards ``Authorization`` untouched
    (cloud.google.com/run/docs/authenticating/service-to-service), so that is the header to read. A
    stripped token proves nothing by itself (anyone can write the marker): this mode is safe only
    when every request passes Cloud Run IAM, which is why it is a deployment declaration and never
    guessed from ``K_SERVICE``. A token that still carries a signature is verified in full.

:func:`identify_caller` gives a service its caller's identity from the Cloud Run-verified token
(the publisher scopes idempotency keys by it).

Errors::

    TokenError                 the request's credentials are missing or unacceptable (HTTP 401);
    │                          the message names the failed check, never the token
    └── TokenKeysUnavailable   Google's signing keys could not be fetched (the JWKS request failed)
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import jwt

if TYPE_CHECKING:
    from jwt.types import Options

GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
AUTHORIZATION = "Authorization"
SERVERLESS_AUTHORIZATION = "X-Serverless-Authorization"
DEFAULT_LEEWAY_SECONDS = 30.0

PushAuthMode = Literal["cloud-run", "signature"]
PUSH_AUTH_MODES: tuple[str, ...] = get_args(PushAuthMode)

# What a Google ID token always carries; a token without one of them is refused.
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud"]


class TokenError(Exception):
    """The request's ID token is missing or unacceptable. The message is safe to return."""


class TokenKeysUnavailable(TokenError):
    """Google's token signing keys could not be fetched."""


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


def checked_header(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The header Cloud Run IAM checks, and its value: ``X-Serverless-Authorization`` if present,
    else ``Authorization``. Names are matched case-insensitively (HTTP headers are)."""
    serverless = _header(headers, SERVERLESS_AUTHORIZATION)
    if serverless is not None:
        return SERVERLESS_AUTHORIZATION, serverless
    return AUTHORIZATION, _header(headers, AUTHORIZATION)


def bearer_token(value: str | None, header: str = AUTHORIZATION) -> str:
    """The token of a ``Bearer <token>`` header value, or :class:`TokenError`."""
    scheme, _, token = (value or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise TokenError(f"missing '{header}: Bearer <ID token>' header")
    return token


def is_signature_removed(token: str) -> bool:
    """True for a token whose signature Cloud Run replaced after verifying it."""
    return token.count(".") == 2 and token.rsplit(".", 1)[1] == SIGNATURE_REMOVED


def claims_of_verified_token(token: str, expected: ExpectedToken) -> dict[str, Any]:
    """The claims of a token Cloud Run IAM has verified (signature stripped), checked.

    Checks the header (a Google ID token is RS256), issuer, audience, expiry and issue time, and
    the caller's email. Does **not** check a signature: call it only for requests that passed
    Cloud Run IAM (``MAILPIPE_PUSH_AUTH=cloud-run``).
    """
    if not is_signature_removed(token):
        raise TokenError("the token's signature was not removed by Cloud Run")
    header = _json_segment(token, 0, "header")
    if header.get("alg") != "RS256":
        raise TokenError(f"invalid token: a Google ID token is RS256, not {header.get('alg')!r}")
    claims = _decode(
        token,
        expected.audience,
        expected.issuers,
        expected.leeway_seconds,
        options={
            "verify_signature": False,
            "verify_exp": True,
            "verify_iat": True,
            "verify_nbf": True,
            "verify_aud": True,
            "verify_iss": True,
        },
    )
    _check_email(claims, expected.email)
    return claims


class SignatureVerifier:
    """Full verification of Google-signed ID tokens: RS256 signature against Google's JWKS, then
    the claims of :class:`ExpectedToken`.

    ``jwks_url`` is Google's by default; tests point it at a JWKS served on loopback. Keys are
    cached (Google rotates them about daily); a token with an unknown ``kid`` refetches them.
    """

    def __init__(self, expected: ExpectedToken, *, jwks_url: str = GOOGLE_JWKS_URL) -> None:
        self.expected = expected
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=10)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`TokenError`."""
        if is_signature_removed(token):
            raise TokenError(
                "the token's signature was removed by Cloud Run (SIGNATURE_REMOVED_BY_GOOGLE): "
                "this service runs behind Cloud Run IAM, which verified it; declare that with "
                "MAILPIPE_PUSH_AUTH=cloud-run"
            )
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenKeysUnavailable("could not fetch the token signing keys") from exc
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from exc
        claims = _decode(
            token,
            self.expected.audience,
            self.expected.issuers,
            self.expected.leeway_seconds,
            key=key.key,
            algorithms=["RS256"],
        )
        _check_email(claims, self.expected.email)
        return claims


class RequestAuthenticator:
    """Checks the ID token of a request in one of the two modes (see the module docstring).

    ``verify(headers)`` reads the header Cloud Run checks (:func:`checked_header`) and returns the
    token's claims or raises :class:`TokenError`.
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
        header, value = checked_header(headers)
        token = bearer_token(value, header)
        if self.mode == "cloud-run" and is_signature_removed(token):
            return claims_of_verified_token(token, self.expected)
        # signature mode, or a token Cloud Run forwarded with its signature: verify it in full.
        return self._signature.verify(token)


def identify_caller(
    headers: Mapping[str, str],
    *,
    local_mode: bool,
    jwks_url: str = GOOGLE_JWKS_URL,
    leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
) -> str | None:
    """Who called this Cloud Run service: the email of the ID token Cloud Run IAM verified.

    For a service behind Cloud Run IAM (invoker check on). The token is read from
    ``X-Serverless-Authorization`` if present, else ``Authorization`` (the header Cloud Run
    checked). Cloud Run has checked its signature, audience and the caller's invoker role and
    stripped the signature; here its issuer and expiry are checked. A token that still carries a
    signature is verified against Google's keys (``jwks_url``) first. Returns the ``email`` (lower
    case) when ``email_verified`` is true; a token without an email (minted without
    ``format=full`` / ``--include-email``) gives ``"sub:<subject id>"``, stable for that caller.
    Returns ``None`` in local mode (no Cloud Run in front, no token). Raises :class:`TokenError`
    (answer 401) when the token is missing or not acceptable.
    """
    if local_mode:
        return None
    header, value = checked_header(headers)
    token = bearer_token(value, header)
    # The audience is the service's URL or custom audience: Cloud Run checked it.
    checks = {"verify_exp": True, "verify_iat": True, "verify_nbf": True, "verify_iss": True}
    if is_signature_removed(token):
        options = {**checks, "verify_signature": False, "verify_aud": False}
        claims = _decode(token, None, GOOGLE_ISSUERS, leeway_seconds, options=options)
    else:
        try:
            key = _google_keys(jwks_url).get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenKeysUnavailable("could not fetch the token signing keys") from exc
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from exc
        options = {**checks, "verify_aud": False}
        claims = _decode(
            token,
            None,
            GOOGLE_ISSUERS,
            leeway_seconds,
            key=key.key,
            algorithms=["RS256"],
            options=options,
        )
    email = claims.get("email")
    if isinstance(email, str) and email:
        if claims.get("email_verified") is not True:
            raise TokenError("the caller's email in the ID token is not verified")
        return email.lower()
    subject = claims.get("sub")
    if isinstance(subject, str) and subject:
        return f"sub:{subject}"
    raise TokenError("the ID token names no caller (no email and no sub claim)")


# --- helpers -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _google_keys(jwks_url: str) -> jwt.PyJWKClient:
    """One key client per JWKS URL for the process (its cache is what saves the fetches)."""
    return jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=10)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():  # a plain dict: HTTP header names are case-insensitive
        if key.lower() == lowered:
            return candidate
    return None


def _json_segment(token: str, index: int, what: str) -> dict[str, Any]:
    try:
        segment = token.split(".")[index]
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, binascii.Error) as exc:
        raise TokenError(f"invalid token: its {what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise TokenError(f"invalid token: its {what} is not a JSON object")
    return value


def _decode(
    token: str,
    audience: str | None,
    issuers: tuple[str, ...],
    leeway_seconds: float,
    *,
    key: Any = None,
    algorithms: list[str] | None = None,
    options: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """PyJWT's claim checks (and signature, when ``key`` is given), errors as TokenError."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=audience,
            issuer=list(issuers),
            leeway=leeway_seconds,
            options=cast("Options", {**(options or {}), "require": _REQUIRED_CLAIMS}),
        )
    except jwt.PyJWTError as exc:
        # PyJWT's messages name the failed check, never the token itself.
        raise TokenError(f"invalid token: {exc}") from exc
    return claims


def _check_email(claims: Mapping[str, Any], email: str | None) -> None:
    if email is None:
        return
    if claims.get("email") != email or claims.get("email_verified") is not True:
        raise TokenError("the token was not issued for the expected service account")
