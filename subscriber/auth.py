"""Checking the OIDC token Pub/Sub push attaches to each request.

The push subscription carries ``oidc_token {service_account_email, audience}``, so every push has
``Authorization: Bearer <Google-signed ID token>`` for that account and audience. Where the check
happens is a deployment declaration, ``MAILPIPE_PUSH_AUTH`` (the token logic is
:mod:`mailpipe.oidc`):

``cloud-run``
    The subscriber runs on Cloud Run with IAM in front (invoker check on, ``run.invoker`` for the
    push account only). Cloud Run verifies the signature and the invoker, then forwards the token
    with its signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``; the subscriber checks the
    claims: issuer, audience, the push account's email, ``email_verified``, expiry.
``signature`` (default)
    Anywhere else: the subscriber verifies the RS256 signature against Google's keys, then the
    claims. A stripped token is refused here: without Cloud Run IAM in front, nobody verified it.

The emulator never sends a token, so the check is off only in local mode (``PUBSUB_EMULATOR_HOST``)
without ``MAILPIPE_PUSH_AUDIENCE``.

Errors::

    PushAuthError          the request is not from our push subscription (HTTP 401)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailpipe.oidc import (
    AUTHORIZATION,
    GOOGLE_ISSUERS,
    GOOGLE_JWKS_URL,
    SERVERLESS_AUTHORIZATION,
    ExpectedToken,
    PushAuthMode,
    RequestAuthenticator,
    TokenError,
)

__all__ = ["GOOGLE_ISSUERS", "GOOGLE_JWKS_URL", "PushAuthError", "PushAuthenticator"]


class PushAuthError(Exception):
    """The push request's credentials are missing or invalid. The message is safe to return."""


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
