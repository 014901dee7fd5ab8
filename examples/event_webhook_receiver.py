"""A receiver for mailpipe's delivery events (Terraform ``event_webhooks``; docs/events.md).

Pub/Sub pushes each event to your HTTPS endpoint with ``Authorization: Bearer <ID token>``, an
OIDC token Google signed for the ``mailpipe-event-webhooks`` service account. Before trusting a
request, check all of it (this example does, with PyJWT):

- the RS256 **signature** against Google's public keys (``GOOGLE_JWKS_URL``);
- the **issuer** (``https://accounts.google.com`` or ``accounts.google.com``) and expiry;
- the **audience**: the webhook's ``audience``, or its endpoint URL when none was set;
- the **email**: the webhook service account, with ``email_verified`` true.

Then answer 2xx quickly (204 here): any other answer, or none within the ack deadline (30 s), makes
Pub/Sub push the event again later. Events arrive at least once and in no guaranteed order, so
deduplicate on ``event_id`` and order by ``occurred_at`` / ``attempt``.

Both push formats are read: the default JSON envelope (``message.data`` is the event, base64) and
``no_wrapper`` (the body is the event; ``googclient_traceparent``, ``event_type`` and ``mail_id``
come as headers). Run it::

    pip install 'PyJWT[crypto]'
    python examples/event_webhook_receiver.py --port 8080 \\
        --audience https://hooks.example.com/mailpipe \\
        --service-account mailpipe-event-webhooks@PROJECT.iam.gserviceaccount.com

Behind Cloud Run with IAM (``--no-allow-unauthenticated``) the token reaches you with its signature
removed by Cloud Run, which verified it: check the claims only there (docs/events.md).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

GOOGLE_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_ISSUERS = ["https://accounts.google.com", "accounts.google.com"]
ATTRIBUTE_HEADERS = ("googclient_traceparent", "event_type", "mail_id")

log = logging.getLogger("event_webhook_receiver")


class Unauthorized(Exception):
    """The request does not carry a valid token of the expected sender."""


class BadEvent(Exception):
    """The body is not a mailpipe event."""


class TokenVerifier:
    """Checks a push request's ``Authorization`` header: signature, issuer, audience, email."""

    def __init__(
        self,
        *,
        audience: str,
        service_account: str,
        jwks_url: str = GOOGLE_JWKS_URL,
        leeway_seconds: float = 30.0,
    ) -> None:
        self.audience = audience
        self.service_account = service_account
        self.leeway_seconds = leeway_seconds
        self._keys = jwt.PyJWKClient(jwks_url, cache_keys=True)

    def verify(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing Authorization: Bearer token")
        try:
            key = self._keys.get_signing_key_from_jwt(token.strip()).key
            claims: dict[str, Any] = jwt.decode(
                token.strip(),
                key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=GOOGLE_ISSUERS,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "email"]},
            )
        except jwt.PyJWTError as exc:  # signature, expiry, issuer, audience, unknown key
            raise Unauthorized(f"invalid token: {exc}") from exc
        if claims.get("email") != self.service_account or claims.get("email_verified") is not True:
            raise Unauthorized("the token was not issued for the webhook's service account")
        return claims


def read_event(body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The event and its attributes, from a wrapped or a ``no_wrapper`` push."""
    try:
        document = json.loads(body)
        if isinstance(document, dict) and isinstance(document.get("message"), dict):
            message = document["message"]
            event = json.loads(base64.b64decode(message.get("data", ""), validate=True))
            attributes = dict(message.get("attributes") or {})
        else:
            event = document
            lowered = {k.lower(): v for k, v in headers.items()}
            attributes = {name: lowered[name] for name in ATTRIBUTE_HEADERS if name in lowered}
    except (ValueError, binascii.Error) as exc:
        raise BadEvent(f"not a mailpipe event: {exc}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("event_id"), str):
        raise BadEvent("not a mailpipe event: no event_id")
    return event, attributes


class Deduplicator:
    """Remembers the last ``size`` event ids (a real receiver keeps them in its database)."""

    def __init__(self, size: int = 100_000) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def handled(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._seen

    def remember(self, event_id: str) -> None:
        """Called once the event is handled: a failed handling must be retried, not deduplicated."""
        with self._lock:
            self._seen[event_id] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)


EventCallback = Callable[[dict[str, Any], dict[str, str]], None]


def make_handler(verifier: TokenVerifier, on_event: EventCallback) -> type[BaseHTTPRequestHandler]:
    """An HTTP handler: 401 for a bad token, 400 for a bad body, else ``on_event`` once and 204."""
    seen = Deduplicator()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                verifier.verify(self.headers.get("Authorization"))
                length = int(self.headers.get("Content-Length") or 0)
                event, attributes = read_event(self.rfile.read(length), dict(self.headers.items()))
            except Unauthorized as exc:
                return self._answer(401, "unauthenticated", str(exc))
            except (BadEvent, ValueError) as exc:
                # Pub/Sub pushes it again (with backoff, for the subscription's 7-day retention):
                # the body came with a valid token, so it is a bug to look into, not an attack.
                return self._answer(400, "bad_event", str(exc))
            if not seen.handled(event["event_id"]):
                on_event(event, attributes)  # raises: no answer, Pub/Sub retries, not deduplicated
                seen.remember(event["event_id"])
            return self._answer(204)

        def _answer(self, status: int, code: str = "", message: str = "") -> None:
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status != 204:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return Handler


def print_event(event: dict[str, Any], attributes: dict[str, str]) -> None:
    print(
        event["occurred_at"],
        event["type"],
        event["mail_id"],
        f"attempt={event['attempt']}",
        event.get("reply_code") or "",
        f"traceparent={attributes.get('googclient_traceparent', '-')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--audience", required=True, help="the webhook's audience (or endpoint)")
    parser.add_argument("--service-account", required=True, help="the token's expected email")
    parser.add_argument("--jwks-url", default=GOOGLE_JWKS_URL)
    args = parser.parse_args(argv)
    verifier = TokenVerifier(
        audience=args.audience, service_account=args.service_account, jwks_url=args.jwks_url
    )
    server = ThreadingHTTPServer((args.host, args.port), make_handler(verifier, print_event))
    print(f"listening on http://{args.host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
