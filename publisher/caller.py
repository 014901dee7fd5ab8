"""Who called the publisher: the invoker Cloud Run IAM verified, from its Google ID token.

The publisher sits behind Cloud Run IAM (invoker check on, ``run.invoker`` granted to named callers
only), which verifies the caller's token and forwards it with its signature replaced by
``SIGNATURE_REMOVED_BY_GOOGLE``. :func:`identify_caller` reads the caller's identity from that
token's claims; the publisher scopes idempotency keys by it (publisher/idempotency.py). Errors
are :class:`mailpipe.id_token.TokenError` and its :class:`~mailpipe.id_token.TokenKeysUnavailable`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from jwt import PyJWKClient

from mailpipe.id_token import (
    DEFAULT_LEEWAY_SECONDS,
    GOOGLE_JWKS_URL,
    TokenError,
    decode_claims,
    is_signature_removed,
    request_token,
    signing_keys,
)


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
    token = request_token(headers)
    keys = None if is_signature_removed(token) else _google_keys(jwks_url)
    # The audience is the service's URL or custom audience: Cloud Run checked it.
    claims = decode_claims(token, keys, audience=None, leeway_seconds=leeway_seconds)
    email = claims.get("email")
    if isinstance(email, str) and email:
        if claims.get("email_verified") is not True:
            raise TokenError("the caller's email in the ID token is not verified")
        return email.lower()
    subject = claims.get("sub")
    if isinstance(subject, str) and subject:
        return f"sub:{subject}"
    raise TokenError("the ID token names no caller (no email and no sub claim)")


@functools.lru_cache(maxsize=4)
def _google_keys(jwks_url: str) -> PyJWKClient:
    """One key client per JWKS URL for the process (its cache is what saves the fetches)."""
    return signing_keys(jwks_url)
