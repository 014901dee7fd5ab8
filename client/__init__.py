"""The one client of the publisher's HTTP API, for the CLI (ops/), the canary and local runs.

``from client import PublisherApi``; the code and its error tree are in client/api.py. No service
and no part of the core imports it (tests/unit/test_layers.py), and it imports nothing of the
repository, so an image that carries a tool needs only this folder besides the core.
"""

from __future__ import annotations

from client.api import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    FINAL_STATUSES,
    Accepted,
    ApiAuthError,
    ApiBadAnswer,
    ApiError,
    ApiHttpError,
    ApiTimeout,
    ApiUnreachable,
    AuthHeader,
    PublisherApi,
    deliver_by,
    google_id_token_auth,
    no_auth,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "FINAL_STATUSES",
    "Accepted",
    "ApiAuthError",
    "ApiBadAnswer",
    "ApiError",
    "ApiHttpError",
    "ApiTimeout",
    "ApiUnreachable",
    "AuthHeader",
    "PublisherApi",
    "deliver_by",
    "google_id_token_auth",
    "no_auth",
]
