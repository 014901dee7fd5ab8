"""The suppression list's HTTP API, and the reads only it needs (docs/suppressions.md)::

    GET    /v1/suppressions                 active entries, newest last; ?reason= &domain=
                                            &limit= (1..1000) &page_token=
    GET    /v1/suppressions/{address|key}   one entry (404: not suppressed)
    PUT    /v1/suppressions/{address}       {"reason": "manual"|"complaint", "expires_at": ISO}
                                            201 added, 200 replaced
    DELETE /v1/suppressions/{address|key}   reactivate the recipient: 204 (404: not suppressed)

``{key}`` is the ``key`` an entry shows (``hmac-sha256:…`` where addresses are hashed), so an
operator can remove an entry the list shows without knowing the address. Answers and error texts
never repeat an address ``MAILPIPE_LOG_ADDRESSES`` does not allow to keep; these paths are not
traced (the address is in the URL).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, cast

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from mailpipe.httpjson import JsonBodyError, error_response, parse_json
from mailpipe.logs import redact_addresses
from mailpipe.mail import addr_spec
from mailpipe.record import RecordUnavailable, SuppressionList, SuppressionReason
from mailpipe.record.store import SUPPRESSIONS, Condition, Transaction, decode, encode
from mailpipe.record.suppressions import KEY_PREFIX, Suppression
from publisher.errors import ApiError, utc_time
from publisher.listing import parse_page_token, token_after

EXTENSION = "mailpipe.suppressions"  # the app's SuppressionList (None: none configured)
suppressions_api = Blueprint("suppressions", __name__)
_SETTABLE = (SuppressionReason.MANUAL, SuppressionReason.COMPLAINT)
_PUT_FIELDS = ("reason", "expires_at")


class _AnyText(PathConverter):
    """The rest of the path, line breaks included (``path`` stops at one): whatever a client
    puts there is answered by the address check, never by a 404 repeating the path."""

    regex = "(?s:.+)"
    part_isolating = False  # may span slashes: an address may hold "/" (RFC 5322 atext)


@suppressions_api.record_once
def _converter(state: BlueprintSetupState) -> None:  # before the routes below use it
    state.app.url_map.converters["anytext"] = _AnyText


@suppressions_api.errorhandler(RecordUnavailable)
def _unavailable(_: RecordUnavailable) -> Response:
    return error_response(503, "record_unavailable", "the delivery record is unavailable; retry")


def _list() -> SuppressionList:
    found = cast(SuppressionList | None, current_app.extensions.get(EXTENSION))
    if found is None or not found.policy.enabled:
        reason = found.policy.disabled_reason if found else "no suppression list is configured"
        raise ApiError(503, "suppressions_disabled", reason)
    return found


def _is_key(text: str) -> bool:
    """Whether ``text`` is a hashed key as an entry's ``key`` shows it."""
    digest = text.removeprefix(KEY_PREFIX)
    return (
        text.startswith(KEY_PREFIX) and len(digest) == 64 and not digest.strip("0123456789abcdef")
    )


def _key(suppressions: SuppressionList, address_or_key: str) -> str:
    return address_or_key if _is_key(address_or_key) else suppressions.policy.key_of(address_or_key)


def get_entry(suppressions: SuppressionList, address_or_key: str) -> Suppression | None:
    """The active entry of an address (or of a key), or None."""
    key = _key(suppressions, address_or_key)
    doc = suppressions.store.get_many(SUPPRESSIONS, [key]).get(key)
    entry = None if doc is None else decode(Suppression, doc)
    return entry if entry is not None and entry.active(suppressions.clock()) else None


def remove_entry(suppressions: SuppressionList, address_or_key: str) -> bool:
    """Delete the entry (reactivate the recipient); whether an active one was there."""
    key = _key(suppressions, address_or_key)
    return _change(suppressions, key, "unsuppress", lambda txn: txn.delete(SUPPRESSIONS, key))


def put_entry(
    suppressions: SuppressionList,
    address: str,
    reason: SuppressionReason,
    expires_at: dt.datetime | None,
) -> tuple[Suppression, bool]:
    """Add an operator's entry for ``address`` (a validated addr-spec), or replace its entry;
    whether an active one was replaced."""
    entry = suppressions.entry(address, reason, expires_at=expires_at)
    doc = encode(entry)
    return entry, _change(
        suppressions,
        entry.key,
        "suppress",
        lambda t: t.put(SUPPRESSIONS, entry.key, doc, None, False),
    )


def _change(
    suppressions: SuppressionList, key: str, operation: str, write: Callable[[Transaction], None]
) -> bool:
    """``write`` the entry of ``key`` in a transaction that reads it first; whether it was active.
    Decided inside the write, so of concurrent PUTs of one address only one finds none (201)."""

    def body(txn: Transaction) -> bool:
        doc = txn.get(SUPPRESSIONS, key)  # reads before writes
        write(txn)
        return doc is not None and decode(Suppression, doc).active(suppressions.clock())

    return suppressions.store.transact(operation, body)


def list_entries(
    suppressions: SuppressionList,
    *,
    reason: SuppressionReason | None = None,
    domain: str | None = None,
    limit: int = 100,
    page_token: str | None = None,
) -> tuple[list[Suppression], str | None]:
    """Active entries by ``(created_at, key)``, and the next page's token (None: last).
    ValueError: a malformed ``page_token``."""
    where: list[Condition] = [("reason", "==", str(reason))] if reason else []
    where += [("domain", "==", domain.lower())] if domain else []
    after = parse_page_token(page_token) if page_token else None
    now, items = suppressions.clock(), list[Suppression]()
    while True:
        docs = suppressions.store.query(SUPPRESSIONS, where, "created_at", after, limit + 1)
        for entry in (decode(Suppression, doc) for doc in docs):
            if entry.active(now):
                if len(items) == limit:
                    return items, token_after(items[-1].created_at, items[-1].key)
                items.append(entry)
            after = (entry.created_at, entry.key)
        if len(docs) <= limit:
            return items, None


def _json(entry: Suppression) -> Any:
    return encode(entry, time=dt.datetime.isoformat)


def _address(suppressions: SuppressionList, text: str, *, key_allowed: bool) -> str:
    """``text`` as a validated address (or a key, where allowed); 400 names what is wrong."""
    if key_allowed and _is_key(text):
        return text
    try:
        return addr_spec(text)
    except ValueError as exc:
        why = redact_addresses(str(exc), suppressions.policy.style)
        hint = " or the key of an entry (hmac-sha256:...)" if key_allowed else ""
        raise ApiError(
            400,
            "invalid_address",
            f"the path must end in an email address such as user@example.com{hint}: "
            "percent-encode it",
            {"address": why},
        ) from exc


def _expiry(value: object, now: dt.datetime) -> dt.datetime | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise TypeError
        when = utc_time(value)
    except (TypeError, ValueError) as exc:
        raise ApiError(
            400,
            "invalid_request",
            "expires_at must be an ISO 8601 time such as 2027-01-31T00:00:00Z, or null",
            {"expires_at": "is not an ISO 8601 time"},
        ) from exc
    if when <= now:
        raise ApiError(
            400,
            "invalid_request",
            "expires_at must be in the future (omit it for an entry that never expires)",
            {"expires_at": f"{when.isoformat()} has passed"},
        )
    return when


@suppressions_api.get("/v1/suppressions")
def list_suppressions() -> Response:
    suppressions = _list()
    args, fields = request.args, {}
    reason = args.get("reason")
    if reason is not None and reason not in set(SuppressionReason):
        fields["reason"] = "must be one of " + ", ".join(SuppressionReason)
    try:
        limit = int(args.get("limit", "100"))
        if not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        fields["limit"] = "must be an integer from 1 to 1000"
    if fields:
        raise ApiError(400, "invalid_query", "fix the fields listed", fields)
    try:
        items, token = list_entries(
            suppressions,
            reason=SuppressionReason(reason) if reason else None,
            domain=args.get("domain") or None,
            limit=limit,
            page_token=args.get("page_token") or None,
        )
    except ValueError as exc:
        raise ApiError(
            400,
            "invalid_query",
            "fix the fields listed",
            {"page_token": "was not issued by the API"},
        ) from exc
    return jsonify({"items": [_json(item) for item in items], "next_page_token": token})


@suppressions_api.get("/v1/suppressions/<anytext:address>")
def get_suppression(address: str) -> Response:
    suppressions = _list()
    entry = get_entry(suppressions, _address(suppressions, address, key_allowed=True))
    if entry is None:
        raise ApiError(404, "not_found", "this recipient is not suppressed")
    return jsonify(_json(entry))


@suppressions_api.put("/v1/suppressions/<anytext:address>")
def put_suppression(address: str) -> tuple[Response, int]:
    suppressions = _list()
    recipient = _address(suppressions, address, key_allowed=False)
    try:
        body: Any = parse_json(request.get_data(cache=False) or b"{}")
    except JsonBodyError as exc:
        raise ApiError(400, exc.code, exc.message, exc.fields) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", 'send {"reason": "manual"} or {}')
    unknown = {str(k)[:80]: "is not a field" for k in body if k not in _PUT_FIELDS}
    reason = body.get("reason", "manual")
    if reason not in set(_SETTABLE):
        unknown["reason"] = "must be manual or complaint (bounces are added by the subscriber)"
    if unknown:
        fixes = f"fields: {', '.join(_PUT_FIELDS)}"
        raise ApiError(400, "invalid_request", f"fix the fields listed ({fixes})", unknown)
    expires_at = _expiry(body.get("expires_at"), dt.datetime.now(dt.UTC))
    entry, replaced = put_entry(suppressions, recipient, SuppressionReason(reason), expires_at)
    return jsonify(_json(entry)), 200 if replaced else 201


@suppressions_api.delete("/v1/suppressions/<anytext:address>")
def delete_suppression(address: str) -> tuple[str, int]:
    suppressions = _list()
    if not remove_entry(suppressions, _address(suppressions, address, key_allowed=True)):
        raise ApiError(404, "not_found", "this recipient is not suppressed")
    return "", 204
