"""Verifying the OIDC token Pub/Sub push attaches to each request.

In production the push subscription carries ``oidc_token {service_account_email, audience}`` and
every POST has ``Authorization: Bearer <Google-signed JWT>``. We check signature (Google's JWKS),
issuer, audience, expiry, and that the token was minted for the expected service account. The
emulator never sends a token, so the check is off only in local mode (``PUBSUB_EMULATOR_HOST``).

Errors::

    PushAuthError          the request is not from our push subscription (HTTP 401)
"""

from __future__ import annotations

from typing import Any

import jwt

GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


class PushAuthError(Exception):
    """The push request's credentials are missing or invalid. The message is safe to return."""


class PushAuthenticator:
    """Checks ``Authorization: Bearer`` tokens on push requests.

    ``jwks_url`` is Google's by default; tests point it at a local JWKS on loopback.
    """

    def __init__(
        self,
        *,
        audience: str,
        service_account_email: str | None = None,
        jwks_url: str = GOOGLE_JWKS_URL,
        issuers: tuple[str, ...] = GOOGLE_ISSUERS,
        leeway_seconds: float = 30.0,
    ) -> None:
        self._audience = audience
        self._email = service_account_email
        self._issuers = issuers
        self._leeway = leeway_seconds
        # Keys are cached (Google rotates them about daily); an unknown `kid` refetches.
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=10)

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """Return the token's claims, or raise :class:`PushAuthError`."""
        if not authorization or not authorization.startswith("Bearer "):
            raise PushAuthError("missing 'Authorization: Bearer <token>' header")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self._audience,
                issuer=list(self._issuers),
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise PushAuthError("could not fetch the token signing keys") from exc
        except jwt.PyJWTError as exc:
            # PyJWT's messages name the failed check, never the token itself.
            raise PushAuthError(f"invalid push token: {exc}") from exc
        if self._email is not None and (
            claims.get("email") != self._email or claims.get("email_verified") is not True
        ):
            raise PushAuthError("push token was not issued for the expected service account")
        return claims
