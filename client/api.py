"""The client of the publisher's HTTP API for operators' tools: the CLI, the canary, local runs.

::

    api = PublisherApi("http://127.0.0.1:8080")
    accepted = api.send(mail)                      # POST /v1/messages → Accepted
    record = api.record(accepted.mail_id)          # GET /v1/messages/ID → dict, None if unknown
    page = api.records(status="dead_lettered")     # GET /v1/messages → {"items", ...}
    stats = api.stats()                            # GET /v1/stats → dict
    record = api.wait(mail_id, {"delivered"}, timeout=60)   # polls record() until then
    api.suppressions(reason="bounce")              # GET /v1/suppressions → {"items", ...}
    api.suppress("a@example.org", expires_at=None) # PUT /v1/suppressions/ADDRESS → the entry
    api.unsuppress("a@example.org")                # DELETE …: True, False if not suppressed
    mail["deliver_by"] = deliver_by("1796115600")  # typed text as the API takes it (an int)

It imports nothing of the repository (only ``requests``, and google-auth for
:func:`google_id_token_auth`). One timeout, :data:`DEFAULT_TIMEOUT`, per request unless the caller
gives another. Without a ``requests.Session`` threads may share a client; with one, requests
reuse its connections (one thread at a time).

Errors (``requests``' exceptions are translated in one place, :meth:`PublisherApi._request`)::

    ApiError                .url: the request's URL; str() is a message for a person
    ├── ApiAuthError        no credentials for the Authorization header (google_id_token_auth)
    ├── ApiUnreachable      nothing answered: connection refused, unknown host, reset, TLS failure
    ├── ApiTimeout          no answer within the timeout (after a POST the mail may be accepted)
    ├── ApiHttpError        an error status; .status, and from the JSON error body .code,
    │                       .message, .fields, .body (the whole JSON answer; code and body are
    │                       None when it is not the API's error format, e.g. a proxy's HTML page)
    └── ApiBadAnswer        a success status whose body is not the JSON the API documents
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import requests

DEFAULT_URL = "http://127.0.0.1:8080"
# Seconds per request: longer than the publisher's own Pub/Sub budget (30 s and a margin), so a
# slow publish ends in the publisher's 503, which says what happened, not in a client timeout.
DEFAULT_TIMEOUT = 60.0
FINAL_STATUSES = frozenset(
    {"delivered", "bounced", "dead_lettered", "expired", "sandboxed", "suppressed"}
)
_MAX_TEXT = 300  # how much of a body that is not the expected JSON a message repeats


class ApiError(Exception):
    """A request to the publisher's API failed; the text says how, for a person."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ApiAuthError(ApiError):
    """The credentials for the request could not be had."""


class ApiUnreachable(ApiError):
    """Nothing answered at the URL."""


class ApiTimeout(ApiError):
    """No answer within the timeout."""


class ApiHttpError(ApiError):
    """The publisher (or something in front of it) answered an error status."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int,
        code: str | None,
        detail: str,
        fields: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, url=url)
        self.status = status
        self.code = code
        self.message = detail
        self.fields = dict(fields or {})
        self.body = dict(body) if body is not None else None


class ApiBadAnswer(ApiError):
    """A success status with a body that is not the documented JSON."""


@dataclass(frozen=True)
class Accepted:
    """The 202 answer to ``POST /v1/messages``."""

    mail_id: str
    trace_id: str | None
    body: dict[str, Any] = field(default_factory=dict)


class AuthHeader(Protocol):
    def __call__(self) -> Mapping[str, str]: ...


def no_auth() -> Mapping[str, str]:
    return {}


def google_id_token_auth(audience: str) -> AuthHeader:
    """``Authorization: Bearer <ID token for audience>`` from Google's metadata server / ADC.

    Cloud Run's IAM invoker check needs it; google-auth caches nothing here, so a token is fetched
    per call (a run makes a handful of requests).
    """

    def header() -> Mapping[str, str]:
        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.id_token

        try:
            token = google.oauth2.id_token.fetch_id_token(
                google.auth.transport.requests.Request(), audience
            )
        except google.auth.exceptions.GoogleAuthError as exc:
            raise ApiAuthError(
                f"cannot get a Google ID token for {audience}: {clip(exc)}", url=audience
            ) from exc
        return {"Authorization": f"Bearer {token}"}

    return header


_UNIX_SECONDS = re.compile(r"[0-9]{1,18}")


def deliver_by(text: str) -> str | int:
    """A ``deliver_by`` typed by a person, as ``POST /v1/messages`` takes it: Unix seconds as a
    JSON number, anything else as the text given. The publisher checks it, and its 400 says
    what to send instead (docs/deliver-by.md)."""
    return int(text) if _UNIX_SECONDS.fullmatch(text.strip()) else text


def clip(text: object, limit: int = _MAX_TEXT) -> str:
    """Text from the other side for a message: one line, bounded (no terminal/log injection)."""
    line = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text)).strip()
    return line if len(line) <= limit else line[:limit] + "…"


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason of a requests exception (``Connection refused``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    found: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            found = current.strerror
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = current.args[0] if current.args else None
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or current.__context__
        current = inner
    return found or type(exc).__name__


class PublisherApi:
    """``/v1/messages`` and ``/v1/stats`` of a running publisher at ``url``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        session: requests.Session | None = None,
        auth: AuthHeader = no_auth,
        timeout: float = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        # Without a session each request has its own connection, so threads may share the client.
        self._session = session
        self._auth = auth
        self._timeout = timeout
        self._sleep = sleep

    def send(self, mail: Mapping[str, Any]) -> Accepted:
        """``POST /v1/messages``; the 202's ids."""
        body = self._json("POST", "/v1/messages", json=dict(mail), expect=(202,))
        mail_id = body.get("mail_id")
        if not isinstance(mail_id, str) or not mail_id:
            raise ApiBadAnswer(
                f"the publisher's 202 has no mail_id: {clip(body)}", url=self.url + "/v1/messages"
            )
        trace_id = body.get("trace_id")
        return Accepted(mail_id, trace_id if isinstance(trace_id, str) else None, body)

    def record(self, mail_id: str, *, missing_ok: bool = True) -> dict[str, Any] | None:
        """``GET /v1/messages/ID``: the delivery record; None if the publisher has none (404),
        or with ``missing_ok=False`` its 404 as :class:`ApiHttpError` (it says why)."""
        try:
            record = self._json("GET", f"/v1/messages/{quote(mail_id, safe='')}")
        except ApiHttpError as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise
        if not isinstance(record.get("status"), str):
            raise ApiBadAnswer(
                f"the publisher's record of {mail_id} has no status: {clip(record)}",
                url=f"{self.url}/v1/messages/{mail_id}",
            )
        return record

    def records(
        self,
        *,
        status: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> dict[str, Any]:
        """``GET /v1/messages``: one page of records (``items``, ``next_page_token``)."""
        query = {"status": status, "since": since, "limit": limit, "page_token": page_token}
        params = {name: str(value) for name, value in query.items() if value is not None}
        return self._json("GET", "/v1/messages", params=params)

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``: the oldest undelivered mail and the stuck records."""
        return self._json("GET", "/v1/stats")

    def suppressions(self, **query: str | int | None) -> dict[str, Any]:
        """``GET /v1/suppressions``: one page (query: reason, domain, limit, page_token)."""
        params = {name: str(value) for name, value in query.items() if value is not None}
        return self._json("GET", "/v1/suppressions", params=params)

    def suppress(
        self, address: str, *, reason: str = "manual", expires_at: str | None = None
    ) -> dict[str, Any]:
        """``PUT /v1/suppressions/ADDRESS``: the entry as stored."""
        body = {"reason": reason, **({"expires_at": expires_at} if expires_at else {})}
        return self._json("PUT", _suppression_path(address), json=body, expect=(200, 201))

    def unsuppress(self, address_or_key: str) -> bool:
        """``DELETE /v1/suppressions/ADDRESS``: True if it was suppressed (now reactivated)."""
        url = self.url + _suppression_path(address_or_key)
        response = self._request("DELETE", url)
        if response.status_code not in (204, 404):
            raise _http_error("DELETE", url, response)
        return response.status_code == 204

    def wait(
        self,
        mail_id: str,
        statuses: Collection[str] = FINAL_STATUSES,
        *,
        timeout: float,
        interval: float = 0.2,
    ) -> dict[str, Any] | None:
        """Read the record until its status is one of ``statuses`` or ``timeout`` seconds pass;
        return the last record read (check its status), None if there never was one.

        A 5xx answer or a timeout counts as "not yet" (the record store may be briefly
        unavailable); anything else is raised.
        """
        deadline = time.monotonic() + timeout
        record: dict[str, Any] | None = None
        while True:
            try:
                record = self.record(mail_id) or record
            except (ApiTimeout, ApiHttpError) as exc:
                if isinstance(exc, ApiHttpError) and exc.status < 500:
                    raise
            if record is not None and record["status"] in statuses:
                return record
            left = deadline - time.monotonic()
            if left <= 0:
                return record
            self._sleep(min(interval, left))

    # --- one place for the transport ------------------------------------------------------------

    def _json(
        self, method: str, path: str, *, expect: Collection[int] = (200,), **kwargs: Any
    ) -> dict[str, Any]:
        url = self.url + path
        response = self._request(method, url, **kwargs)
        if response.status_code not in expect:
            raise _http_error(method, url, response)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiBadAnswer(
                f"the publisher answered {method} {path} with HTTP {response.status_code} but "
                f"not a JSON object: {clip(response.text) or '(empty body)'}",
                url=url,
            )
        return body

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            send = self._session.request if self._session is not None else requests.request
            return send(method, url, headers=dict(self._auth()), timeout=self._timeout, **kwargs)
        except requests.Timeout as exc:
            maybe = (
                "; the mail may have been accepted: send it again with the same idempotency_key"
                if method == "POST"
                else ""
            )
            raise ApiTimeout(
                f"the publisher at {self.url} did not answer {method} within "
                f"{self._timeout:g} s{maybe}",
                url=url,
            ) from exc
        except (requests.RequestException, OSError) as exc:
            raise ApiUnreachable(
                f"cannot reach the publisher at {self.url}: {_reason(exc)}", url=url
            ) from exc


def _suppression_path(address: str) -> str:
    return "/v1/suppressions/" + quote(address, safe="@:")


def _http_error(method: str, url: str, response: requests.Response) -> ApiHttpError:
    status = response.status_code
    try:
        body = response.json()
        error = body["error"]
        code, detail = str(error["code"]), str(error["message"])
        fields = {str(k): str(v) for k, v in (error.get("fields") or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        text = clip(response.text) or "(empty body)"
        return ApiHttpError(
            f"the publisher answered {method} with HTTP {status}: {text}",
            url=url,
            status=status,
            code=None,
            detail=text,
        )
    return ApiHttpError(
        f"the publisher answered {method} with HTTP {status} {code}: {clip(detail)}",
        url=url,
        status=status,
        code=code,
        detail=detail,
        fields=fields,
        body=body,
    )
