"""Idempotency keys of ``POST /v1/messages``: which key, in whose scope, for which request.

Modelled on the IETF draft "The Idempotency-Key HTTP Header Field"
(draft-ietf-httpapi-idempotency-key-header) and Stripe's idempotent requests:

- **Key.** The body's ``idempotency_key`` or the ``Idempotency-Key`` header: a bare token
  (``Idempotency-Key: order-42``) or the draft's Structured Field string
  (``Idempotency-Key: "order-42"``, RFC 8941 §3.3.3). Both given must name the same key; more
  than one header is refused (the draft: clients MUST NOT send more than one; WSGI servers join
  repeated headers with commas, so a bare key with a comma is refused too).
- **Scope.** Keys are scoped to the caller: ``create_app(identify_caller=...)`` tells who is
  calling (on Cloud Run, from the verified ID token); ``None`` is the one shared scope of a local
  or single-tenant deployment. A caller reusing another caller's key gets a new mail, never the
  other's ids (the draft's "composite key" advice).
- **Fingerprint.** What counts as "the same request" is the *validated* request without its key:
  SHA-256 over the canonical JSON (keys sorted, no whitespace) of ``MailRequest`` as the API
  validated it, defaults filled in. So reordered JSON members, the key given by header instead
  of field, ``"cc": []`` against no ``cc``, or a ``reply_to`` string against a one-item list are
  the same request; a different subject, body, recipient, recipient order, header, attachment or
  metadata value is a different one, answered 422 (the draft's status for a key reused with
  another payload; Stripe refuses such a request too).
- **Lifetime.** A key's reservation holds it while the publish is in progress, at most
  ``MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS`` (then it was left by a crash and is taken over or
  released by ``mailpipe reconcile --fix``); a retry meanwhile gets 409. Any failure before the
  publish completes releases it at once. A completed key is remembered as long as its mail's
  record: forever in SQLite, 30 days (``TTL``) in Firestore, whose TTL policy then deletes both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import flask

from mailpipe.mail import MailRequest

IDEMPOTENCY_HEADER = "Idempotency-Key"

CallerIdentity = Callable[[flask.Request], "str | None"]


class InvalidIdempotencyHeader(ValueError):
    """The ``Idempotency-Key`` header is malformed or repeated; the message says how."""


def header_key(request: flask.Request) -> str | None:
    """The key the ``Idempotency-Key`` header carries, ``None`` without one.

    The key's own syntax (length, characters) is the body field's, checked by ``MailRequest``.
    """
    values = request.headers.getlist(IDEMPOTENCY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyHeader(f"send one {IDEMPOTENCY_HEADER} header, not {len(values)}")
    value = values[0].strip()
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        return _sf_string(value)
    if "," in value:
        # WSGI servers (gunicorn, werkzeug) join repeated headers with commas: "a,b" is two keys.
        raise InvalidIdempotencyHeader(
            f"send one {IDEMPOTENCY_HEADER} header; a bare key in it cannot contain a comma "
            '(repeated headers arrive joined by commas): quote it ("a,b") or send it as '
            "idempotency_key"
        )
    return value


def _sf_string(value: str) -> str:
    """Decode an RFC 8941 sf-string (``"..."``, with ``\\"`` and ``\\\\`` the only escapes)."""
    out: list[str] = []
    chars = iter(value[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                raise InvalidIdempotencyHeader(
                    f'{IDEMPOTENCY_HEADER} is a quoted string with an invalid escape; only \\" '
                    "and \\\\ may follow a backslash"
                )
            out.append(escaped)
        elif char == '"':
            raise InvalidIdempotencyHeader(
                f"{IDEMPOTENCY_HEADER} is a quoted string with an unescaped quote inside"
            )
        else:
            out.append(char)
    return "".join(out)


def request_fingerprint(mail_request: MailRequest) -> str:
    """SHA-256 (hex) of the validated request without its idempotency key (see above)."""
    # `sandbox` unset leaves the fingerprints of requests made before the field unchanged.
    unset = {"sandbox"} if mail_request.sandbox is None else set()
    canonical = mail_request.model_dump(
        mode="json", by_alias=True, exclude={"idempotency_key", *unset}
    )
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def caller_scope(identify_caller: CallerIdentity | None, request: flask.Request) -> str | None:
    """The scope of the caller's keys: its identity, or ``None`` (the one shared scope)."""
    if identify_caller is None:
        return None
    return identify_caller(request) or None
