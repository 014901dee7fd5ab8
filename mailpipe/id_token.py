"""Google ID tokens as a service on Cloud Run receives them: what the subscriber (push tokens,
subscriber/auth.py) and the publisher (its caller, publisher/caller.py) both read of a token.

Errors::

    TokenError                 the request's credentials are missing or unacceptable (HTTP 401);
    │                          the message names the failed check, never the token
    └── TokenKeysUnavailable   Google's signing keys could not be fetched (the JWKS request failed)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import jwt

if TYPE_CHECKING:
    from jwt.types import Options

GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
AUTHORIZATION = "Authorization"
SERVERLESS_AUTHORIZATION = "X-Serverless-Authorization"
DEFAULT_LEEWAY_SECONDS = 30.0


class TokenError(Exception):
    """The request's ID token is missing or unacceptable. The message is safe to return."""


class TokenKeysUnavailable(TokenError):
    """Google's token signing keys could not be fetched."""


def checked_header(headers: Mapping[str, str]) -> tuple[str, str | None]:
    """The header Cloud Run IAM checks, and its value: ``X-Serverless-Authorization`` if present,
    else ``Authorization`` (names match ignoring case). With both, Cloud Run checks only the first
    (cloud.google.com/run/docs/authenticating/service-to-service)."""
    for name in (SERVERLESS_AUTHORIZATION, AUTHORIZATION):
        # A plain dict: HTTP header names are case-insensitive.
        same = (v for k, v in headers.items() if k.lower() == name.lower())
        value = headers.get(name, next(same, None))
        if value is not None:
            return name, value
    return AUTHORIZATION, None


def request_token(headers: Mapping[str, str]) -> str:
    """The bearer token of the header :func:`checked_header` names, or :class:`TokenError`."""
    header, value = checked_header(headers)
    scheme, _, token = (value or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError(f"missing '{header}: Bearer <ID token>' header")
    return token.strip()


def is_signature_removed(token: str) -> bool:
    """True for a token whose signature Cloud Run replaced after verifying it
    (cloud.google.com/run/docs/troubleshooting#signature-removed)."""
    return token.count(".") == 2 and token.rsplit(".", 1)[1] == SIGNATURE_REMOVED


def signing_keys(jwks_url: str = GOOGLE_JWKS_URL) -> jwt.PyJWKClient:
    """The keys that sign the tokens, from the JWKS at ``jwks_url`` (tests serve one on loopback).
    Cached: Google rotates them about daily, and a token with an unknown ``kid`` refetches them."""
    return jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=10)


def decode_claims(
    token: str,
    keys: jwt.PyJWKClient | None,
    *,
    audience: str | None,
    issuers: tuple[str, ...] = GOOGLE_ISSUERS,
    leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
) -> dict[str, Any]:
    """The claims of a Google ID token (RS256), checked by PyJWT: expiry, issue and not-before
    times, issuer, ``audience`` (``None``: Cloud Run checked it), and the signature against
    ``keys``; ``keys=None`` only for a token whose signature Cloud Run IAM verified and removed."""
    checks = dict.fromkeys(["verify_exp", "verify_iat", "verify_nbf", "verify_iss"], True)
    options = {**checks, "verify_signature": keys is not None, "verify_aud": audience is not None}
    try:
        key = keys.get_signing_key_from_jwt(token).key if keys else ""  # "": PyJWT's "no key"
        token_parts = jwt.decode_complete(
            token,
            key,
            algorithms=["RS256"],
            audience=audience,
            issuer=list(issuers),
            leeway=leeway_seconds,
            # What a Google ID token always carries; a token without one of them is refused.
            options=cast("Options", {**options, "require": ["exp", "iat", "iss", "aud"]}),
        )
    except jwt.PyJWKClientConnectionError as exc:
        raise TokenKeysUnavailable("could not fetch the token signing keys") from exc
    except jwt.PyJWTError as exc:
        # PyJWT's messages name the failed check, never the token itself.
        raise TokenError(f"invalid token: {exc}") from exc
    alg = token_parts["header"].get("alg")
    if alg != "RS256":  # only a removed signature gets here unchecked: Google's was RS256
        raise TokenError(f"invalid token: a Google ID token is RS256, not {alg!r}")
    return cast("dict[str, Any]", token_parts["payload"])
