"""JSON over HTTP for both services: strict request bodies and JSON answers for every error.

:func:`parse_json` refuses what docs/hostile-input.md lists (too deep, too long an integer,
``NaN``, lone surrogates, not UTF-8) with ``JsonBodyError (ValueError)``: ``code``, ``message``
(what to fix), ``fields`` (``{dotted.path: what is wrong}``). :func:`install_json_errors` makes
a Flask app answer every error it produces itself in the one format,
``{"error": {"code": "...", "message": "...", "fields": {...}}}``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from mailpipe.logs import redact_addresses

# Deeper than any mail needs (a mail is 3 levels; metadata gets the rest) and far below the
# interpreter's recursion limit, which json, pydantic and the encoders all depend on.
MAX_JSON_DEPTH = 32
# Integers this long already lose precision in most JSON parsers (JavaScript's end at 2**53, 16
# digits); Python's own limit on int/str conversion (sys.get_int_max_str_digits(), 4300 by
# default) would otherwise surface as an error deep inside the service.
MAX_INTEGER_DIGITS = 100
_MESSAGE_PATH_CHARS = 200  # how much of a request path an error message repeats
_SURROGATE_PROBLEM = "contains a lone surrogate (a \\ud800-\\udfff escape without its pair)"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what UTF-8 cannot encode


class JsonBodyError(ValueError):
    """A request body that is not JSON the services accept."""

    def __init__(self, code: str, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = dict(fields or {})


def _unreadable(problem: str) -> JsonBodyError:
    return JsonBodyError("invalid_json", f"the body is not JSON this API reads: {problem}")


def _too_deep(at: str = "") -> JsonBodyError:
    return JsonBodyError(
        "json_too_deep",
        f"the JSON nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects{at}: flatten it",
    )


def error_code(name: str) -> str:
    """An HTTP reason phrase as an error code: ``Request Timeout`` → ``request_timeout``."""
    return name.lower().replace(" ", "_").replace("-", "_") or "error"


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INTEGER_DIGITS:
        raise _unreadable(
            f"a number has {digits} digits; integers may have at most {MAX_INTEGER_DIGITS} "
            "(send big values as strings)"
        )
    try:
        return int(text)
    except ValueError as exc:  # a lower sys.set_int_max_str_digits() than our limit
        raise _unreadable(f"a number has {digits} digits, more than this service reads") from exc


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _unreadable(f"the number {text[:40]} is out of range (beyond ±1.8e308)")
    return value


def _parse_constant(name: str) -> Any:
    raise _unreadable(f"{name} is not JSON: send numbers that are finite")


def _path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in parts) or "body"


def check_json_value(value: Any) -> None:
    """Raise :class:`JsonBodyError` if ``value`` (parsed JSON) nests deeper than
    :data:`MAX_JSON_DEPTH` or holds a lone surrogate in a string or key. Iterative."""
    surrogates: dict[str, str] = {}
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str) and _LONE_SURROGATE.search(item):
            surrogates.setdefault(_path(where), _SURROGATE_PROBLEM)
        elif isinstance(item, dict | list):
            if len(where) >= MAX_JSON_DEPTH:  # the value itself is level 1
                raise _too_deep(f" at {_path(where)!r}")
            for key, child in item.items() if isinstance(item, dict) else enumerate(item):
                if isinstance(key, str) and _LONE_SURROGATE.search(key):
                    surrogates.setdefault(_path(where), "has a key that " + _SURROGATE_PROBLEM)
                else:
                    stack.append((child, (*where, key)))
    if surrogates:
        raise JsonBodyError(
            "invalid_encoding",
            "the JSON holds lone surrogates (\\ud800-\\udfff escapes without their pair), "
            "which are not Unicode text: send valid Unicode",
            surrogates,
        )


def parse_json(raw: bytes) -> Any:
    """Parse a request body strictly (see the module docstring); raise :class:`JsonBodyError`."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except UnicodeDecodeError as exc:
        raise JsonBodyError(
            "invalid_encoding", f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc
    except RecursionError as exc:
        raise _too_deep() from exc
    except json.JSONDecodeError as exc:
        raise JsonBodyError(
            "invalid_json",
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from exc
    check_json_value(value)
    return value


def error_response(
    status: int,
    code: str,
    message: str,
    fields: Mapping[str, str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The one error format: ``{"error": {"code", "message", "fields"?}}`` with ``status``."""
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = dict(fields)
    return current_app.make_response((jsonify({"error": body}), status, dict(headers or {})))


def _shown_path() -> str:
    # Paths can hold addresses (/v1/suppressions/ADDRESS): never echoed whole, whatever the policy.
    path = redact_addresses(request.path, "domain")
    return path[:_MESSAGE_PATH_CHARS] + "…" if len(path) > _MESSAGE_PATH_CHARS else path


def _http_error_message(exc: HTTPException, not_found_hint: str) -> str:
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        allowed = ", ".join(sorted(set(exc.valid_methods)))
        return f"{request.method} is not allowed on {_shown_path()!r}: use {allowed}"
    if isinstance(exc, NotFound) and exc.description == NotFound.description:
        return f"nothing is served at {_shown_path()!r}: {not_found_hint}"
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if isinstance(exc, RequestEntityTooLarge) and limit:
        return f"the request body is larger than {limit:,} bytes: send less"
    return exc.description or exc.name or "error"


def json_error_handlers(
    *, not_found_hint: str, log: logging.Logger
) -> dict[type[Exception], Callable[[Any], Response]]:
    """Handlers by exception class (for ``Flask.register_error_handler`` or functions-framework's
    ``errorhandler``): any ``HTTPException`` and any unexpected exception (500, logged)."""

    def http_error(exc: HTTPException) -> Response:
        # Keep what it says beyond its body: Allow (405), Location, Retry-After.
        kept = {
            name: value
            for name, value in exc.get_response().headers.items()
            if name.lower() not in ("content-type", "content-length")
        }
        message = _http_error_message(exc, not_found_hint)
        return error_response(exc.code or 500, error_code(exc.name), message, headers=kept)

    def unexpected(_exc: Exception) -> Response:
        log.exception("unexpected error while handling %s %s", request.method, _shown_path())
        return error_response(500, "internal", "an unexpected error occurred; it has been logged")

    return {HTTPException: http_error, Exception: unexpected}


def install_json_errors(app: Flask, *, not_found_hint: str, log: logging.Logger) -> None:
    """Answer every error of ``app`` in JSON; ``not_found_hint`` tells a client where the app's
    paths are. Handlers for more specific exception classes still take precedence."""
    # Werkzeug answers a path with "//" (also "%2F" decoded next to a slash) with an HTML 308 to
    # the merged path, and Flask never routes redirects to error handlers: do not merge, so such a
    # path is simply not found, in JSON.
    app.url_map.merge_slashes = False
    for exc_class, handler in json_error_handlers(not_found_hint=not_found_hint, log=log).items():
        app.register_error_handler(exc_class, handler)

    @app.after_request
    def _json_options(response: Response) -> Response:
        # Flask answers OPTIONS itself with an empty text/html body: say the same in JSON.
        if request.method == "OPTIONS" and response.status_code == 200 and not response.is_json:
            allowed = [m.strip() for m in response.headers.get("Allow", "").split(",") if m]
            response.set_data(json.dumps({"allow": allowed}))
            response.mimetype = "application/json"
        return response
