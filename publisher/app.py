"""The publisher's HTTP API (Flask): accept a mail, publish it, answer 202 with its ids.

A mail is answered 202 only after Pub/Sub has confirmed the publish; every failure before that
answers with a JSON error and leaves nothing half-accepted (the record's reservation is released,
whatever the exception). Idempotency keys (scope, fingerprint, lifetime): publisher/idempotency.py.

``create_app`` builds the app from its collaborators (kept as one :class:`ApiServices` in
``app.extensions["mailpipe"]``) and registers the :data:`api` blueprint, whose views read them
from there; :func:`accept_mail` is ``POST /v1/messages`` without HTTP: validate, reserve the
idempotency key, publish, record the mail queued, answer. :func:`accept_mails` is
``POST /v1/messages:batch`` without HTTP: the same steps for each mail (the same functions), all
mails handed to Pub/Sub before waiting for any, each in its own trace linked to the request's,
and the published mails recorded queued a hundred to a transaction.

Errors are JSON: ``{"error": {"code": "...", "message": "...", "fields": {...}}}``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from pydantic import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from mailpipe.attributes import SPAN_LINK_KIND, SPAN_MAIL_ID
from mailpipe.httpjson import JsonBodyError, error_response, install_json_errors, parse_json
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.record import (
    DeliveryRecord,
    MailRecord,
    MailStatus,
    RecordError,
    RecordUnavailable,
    SuppressionList,
)
from mailpipe.record.store import encode
from publisher.config import PublisherConfig
from publisher.deliver_by import DeliverByError, resolve_deliver_by
from publisher.errors import ApiError, utc_time
from publisher.idempotency import (
    IDEMPOTENCY_HEADER,
    CallerIdentity,
    InvalidIdempotencyHeader,
    caller_scope,
    header_key,
    request_fingerprint,
)
from publisher.listing import list_mails, oldest_undelivered
from publisher.metrics import PublisherMetrics
from publisher.openapi import MAIL_ID_PATTERN, MAX_BATCH_MAILS, openapi_document
from publisher.pubsub import MailPublisher, MailTooLarge, PublishError
from publisher.reconcile import diagnose, survey
from publisher.suppressions import EXTENSION as SUPPRESSIONS
from publisher.suppressions import suppressions_api

log = logging.getLogger(__name__)

# Big enough for Pub/Sub's 10 MB message limit plus JSON framing; the exact limit is checked on
# the encoded mail (413 either way).
MAX_REQUEST_BYTES = 10 * 1024 * 1024
STATS_STUCK_MAILS = 20  # stuck mails /v1/stats lists (all are counted); the CLI lists them all
_MAIL_ID = re.compile(MAIL_ID_PATTERN)
EXTENSION = "mailpipe"  # the app's ApiServices: current_app.extensions[EXTENSION]
UNTRACED_PATHS = (  # FlaskInstrumentor matches these regexes against the request URL
    r"/healthz(\?.*)?$,/v1/suppressions/"  # (the second has an address in the URL)
)
BATCH_MAIL_SPAN = "mail accept"  # each batch mail's own root span, linked to the request's
BATCH_LINK_KIND = "batch_request"  # the link's SPAN_LINK_KIND
_T = TypeVar("_T")

# The API's routes; create_app registers them on each app it builds.
api = Blueprint("api", __name__)


def _field_errors(exc: ValidationError) -> dict[str, str]:
    """``{"to.0": "is not a valid email address: …"}`` from pydantic's errors."""
    fields: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "body"
        message = str(error["msg"]).removeprefix("Value error, ")
        fields.setdefault(location, message)
    return fields


def _accepted_body(mail_id: str, message_id: str | None, trace_id: str | None) -> dict[str, Any]:
    return {"mail_id": mail_id, "message_id": message_id, "trace_id": trace_id, "status": "queued"}


def _current_trace_id() -> str | None:
    return _trace_id(trace.get_current_span())


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _parse_json_body() -> Any:
    if request.mimetype != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the mail as JSON with 'Content-Type: application/json' "
            f"(got {request.mimetype or 'no content type'!r})",
        )
    try:
        return parse_json(request.get_data(cache=False))
    except JsonBodyError as exc:
        raise ApiError(400, exc.code, exc.message, exc.fields) from exc


@dataclass(frozen=True)
class ApiServices:
    """What the API's views work with, one per app: ``current_app.extensions["mailpipe"]``."""

    config: PublisherConfig
    publisher: MailPublisher
    record: DeliveryRecord
    now: Callable[[], dt.datetime]
    metrics: PublisherMetrics | None = None
    identify_caller: CallerIdentity | None = None
    tracer: trace.Tracer | None = None  # the batch mails' spans (None: the global provider's)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of the API, before Flask turns it into a response."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def create_app(
    config: PublisherConfig,
    *,
    publisher: MailPublisher,
    record: DeliveryRecord,
    metrics: PublisherMetrics | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    identify_caller: CallerIdentity | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    suppressions: SuppressionList | None = None,
) -> Flask:
    """Build the publisher app. Collaborators are injected; nothing global is touched.

    ``identify_caller(request)`` names the caller; its idempotency keys are scoped to that name
    (``None``, or no function: one shared scope). ``clock`` is the time ``/v1/stats`` and the
    records' ``stuck`` field are judged at (default: now, UTC).
    """
    app = Flask("mailpipe.publisher")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = ApiServices(
        config=config,
        publisher=publisher,
        record=record,
        now=clock or (lambda: dt.datetime.now(dt.UTC)),
        metrics=metrics,
        identify_caller=identify_caller,
        tracer=trace.get_tracer(__name__, tracer_provider=tracer_provider),
    )
    # Cloud Run's startup and liveness probes hit /healthz every few seconds per instance: a trace
    # (and, with the per-request span flush, a Cloud Trace write) for each would be noise and cost.
    FlaskInstrumentor().instrument_app(
        app, tracer_provider=tracer_provider, excluded_urls=UNTRACED_PATHS
    )

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.fields)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: RequestEntityTooLarge) -> Response:
        return error_response(
            413,
            "request_too_large",
            f"the request body is larger than {MAX_REQUEST_BYTES:,} bytes; Pub/Sub messages are "
            "limited to 10 MB: send fewer or smaller attachments",
        )

    # Every other status (404, 405, 408, unexpected exceptions as 500) is JSON too.
    install_json_errors(app, not_found_hint="the API's paths are listed at /openapi.json", log=log)
    app.register_blueprint(api)
    app.extensions[SUPPRESSIONS] = suppressions  # /v1/suppressions (None: answers 503)
    app.register_blueprint(suppressions_api)
    return app


def _services() -> ApiServices:
    return cast(ApiServices, current_app.extensions[EXTENSION])


def _respond(answer: Answer) -> tuple[Response, int]:
    response = jsonify(answer.body)
    response.headers.update(answer.headers)
    return response, answer.status


@api.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@api.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


@api.post("/v1/messages")
def send_message() -> tuple[Response, int]:
    services = _services()
    payload = _parse_json_body()
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object describing a mail")
    try:
        key_in_header = header_key(request)
    except InvalidIdempotencyHeader as exc:
        raise ApiError(400, "invalid_request", str(exc), {IDEMPOTENCY_HEADER: str(exc)}) from exc
    answer = accept_mail(
        services,
        payload,
        key_in_header=key_in_header,
        scope=_request_caller(services),
    )
    return _respond(answer)


def _request_caller(services: ApiServices) -> Callable[[], str | None]:
    """The request's caller as a key scope, identified (its token decoded) once per request."""
    return functools.cache(lambda: caller_scope(services.identify_caller, request))


def accept_mail(
    services: ApiServices,
    payload: dict[str, Any],
    *,
    key_in_header: str | None = None,
    scope: Callable[[], str | None] = lambda: None,
) -> Answer:
    """Accept one mail: validate → reserve its key → publish → record it queued → answer 202.

    ``payload`` is the request's JSON object, ``key_in_header`` the ``Idempotency-Key`` header's
    key, ``scope()`` the caller (asked only for a key, or with MAILPIPE_SANDBOX_CALLERS).
    Raises :class:`ApiError` for every refusal; a reservation is released whatever fails before
    Pub/Sub confirmed the publish.
    """
    admitted = _admit(services, payload, key_in_header=key_in_header, scope=scope)
    if isinstance(admitted, Answer):
        return admitted  # an idempotent replay
    publisher = services.publisher
    return _queued(
        services, admitted, _guarded(services, admitted, lambda: publisher.publish(admitted.mail))
    )


@dataclass(frozen=True)
class _Admitted:
    """A mail validated, its idempotency key (if any) reserved, not yet published."""

    mail: QueuedMail
    request: MailRequest
    reserved: bool


def _admit(
    services: ApiServices,
    payload: dict[str, Any],
    *,
    key_in_header: str | None,
    scope: Callable[[], str | None],
) -> _Admitted | Answer:
    """Validate → reserve the key: the mail to publish, or the replay of its key's mail."""
    config, record = services.config, services.record
    if key_in_header is not None:
        body_key = payload.get("idempotency_key")
        if body_key is not None and body_key != key_in_header:
            raise ApiError(
                400,
                "invalid_request",
                f"the {IDEMPOTENCY_HEADER} header and idempotency_key differ; send one or the "
                "same value in both",
                {"idempotency_key": "differs from the Idempotency-Key header"},
            )
        payload = {**payload, "idempotency_key": key_in_header}
    try:
        mail_request = MailRequest.model_validate(payload)
    except ValidationError as exc:
        fields = _field_errors(exc)
        raise ApiError(
            400,
            "invalid_request",
            f"the mail request is invalid ({len(fields)} problem(s)): fix the fields listed",
            fields,
        ) from exc

    if not config.sender_allowed(mail_request.from_.domain):
        allowed = ", ".join(sorted(config.allowed_sender_domains or ()))
        raise ApiError(
            403,
            "sender_not_allowed",
            f"this service sends only from {allowed}: use a 'from' address at one of them",
            {"from": f"the domain {mail_request.from_.domain} is not an allowed sender domain"},
        )

    mail = QueuedMail.accept(_sandbox_default(config, mail_request, scope))
    try:
        deliver_by = resolve_deliver_by(
            mail_request.deliver_by,
            mail.accepted_at,
            default_within=config.default_deliver_within,
            max_within=config.max_deliver_within,
        )
    except DeliverByError as exc:
        raise ApiError(
            400, "invalid_request", f"deliver_by {exc}", {"deliver_by": str(exc)}
        ) from exc
    mail = mail.model_copy(update={"deliver_by": deliver_by})
    reserved = mail_request.idempotency_key is not None
    if reserved:
        # Only a key needs claiming before the publish (so a retry never publishes twice);
        # a mail without one gets its record in one write after the publish.
        fingerprint = request_fingerprint(mail_request)
        try:
            reservation = record.reserve(
                mail_id=mail.mail_id,
                accepted_at=mail.accepted_at,
                recipient_domains=mail_request.recipient_domains,
                idempotency_key=mail_request.idempotency_key,
                idempotency_scope=scope(),
                request_hash=fingerprint,
                reservation_seconds=config.idempotency_reservation_seconds,
                deliver_by=deliver_by,
            )
        except RecordError as exc:
            log.error("delivery record unavailable, refusing the mail: %s", exc)
            raise ApiError(
                503, "record_unavailable", "the delivery record is unavailable; retry later"
            ) from exc
        if not reservation.created:
            return _idempotent_replay(reservation.record, fingerprint)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(SPAN_MAIL_ID, mail.mail_id)
    return _Admitted(mail, mail_request, reserved)


def _sandbox_default(
    config: PublisherConfig, mail_request: MailRequest, caller: Callable[[], str | None]
) -> MailRequest:
    """The request as queued: sandboxed when its caller is one of MAILPIPE_SANDBOX_CALLERS
    (a caller that asks for a real send there is refused: nothing would be sent)."""
    if not (config.sandbox_callers and config.sandboxed_caller(caller())):
        return mail_request
    if mail_request.sandbox is False:
        raise ApiError(
            403,
            "sandbox_required",
            "this caller's mail is always sandboxed (MAILPIPE_SANDBOX_CALLERS): nothing would be "
            'sent; remove "sandbox": false, or send as a caller that may deliver',
            {"sandbox": "must be true or absent for this caller"},
        )
    return mail_request.model_copy(update={"sandbox": True})


def _guarded(services: ApiServices, admitted: _Admitted, step: Callable[[], _T]) -> _T:
    """Run a publish ``step`` of the admitted mail; on any failure release its key and raise
    the :class:`ApiError` that answers it."""
    mail = admitted.mail
    try:
        return step()
    except BaseException as exc:
        # Whatever failed before Pub/Sub confirmed, the key must not stay held: release it
        # (a process killed here leaves it until it expires; see publisher/reconcile.py).
        if admitted.reserved:
            _release(services.record, mail.mail_id)
        if not isinstance(exc, PublishError):
            raise
        if isinstance(exc, MailTooLarge):
            raise ApiError(413, "mail_too_large", str(exc)) from exc
        log.error("publish failed for mail %s: %s", mail.mail_id, exc)
        raise ApiError(
            503,
            "publish_failed",
            f"the mail was not accepted because Pub/Sub did not take it ({exc}); "
            "retry later (with the same idempotency_key to be safe)",
        ) from exc


def _queued(services: ApiServices, admitted: _Admitted, message_id: str) -> Answer:
    """Record the published mail queued and answer 202."""
    _mark_queued(services, [(admitted, message_id, _current_trace_id())])
    return _accepted(services, admitted, message_id)


MARK_QUEUED_GROUP = 100  # mails recorded queued per transaction (a batch has up to 500)


def _mark_queued(
    services: ApiServices, published: Sequence[tuple[_Admitted, str, str | None]]
) -> None:
    """Record the published mails (with their message and trace ids) queued, a group at a time."""
    mails = [
        {
            "mail_id": admitted.mail.mail_id,
            "message_id": message_id,
            "trace_id": trace_id,
            "accepted_at": admitted.mail.accepted_at,
            "recipient_domains": admitted.request.recipient_domains,
            "deliver_by": admitted.mail.deliver_by,
        }
        for admitted, message_id, trace_id in published
    ]
    # In groups: a Firestore transaction reads its documents one by one while the subscriber
    # claims the same mails, so a failed (contended) write costs one group, not the request.
    for start in range(0, len(mails), MARK_QUEUED_GROUP):
        group = mails[start : start + MARK_QUEUED_GROUP]
        try:
            services.record.mark_queued_many(group)
        except Exception:
            # The mails ARE on Pub/Sub: the subscriber's claim creates or completes each record,
            # so answering 202 is right. Failing here would make the client send them twice.
            for mail in group:
                log.warning("could not mark mail %s queued; the subscriber will", mail["mail_id"])


def _accepted(services: ApiServices, admitted: _Admitted, message_id: str) -> Answer:
    """The 202 of a published mail recorded queued (inside its span: the log line's trace)."""
    mail = admitted.mail
    trace_id = _current_trace_id()
    if services.metrics is not None:
        services.metrics.accepted()
    log.info(
        "mail accepted",
        extra={"json_fields": {"mail_id": mail.mail_id, "message_id": message_id}},
    )
    return Answer(
        202,
        _accepted_body(mail.mail_id, message_id, trace_id),
        {"Location": f"/v1/messages/{mail.mail_id}"},
    )


def _idempotent_replay(held: MailRecord, fingerprint: str) -> Answer:
    # Held by a record without a fingerprint (written before there were any): cannot tell.
    if held.request_hash is not None and held.request_hash != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this idempotency_key was already used for a different mail; use a new key for a "
            "new mail, and the same key only to retry the very same request",
            {"idempotency_key": "was used before with a different request"},
        )
    if held.status == MailStatus.ACCEPTING:
        raise ApiError(
            409,
            "idempotency_conflict",
            "a request with this idempotency_key is still being published; retry in a moment",
        )
    return Answer(
        202,
        _accepted_body(held.mail_id, held.message_id, held.trace_id),
        {"Idempotent-Replayed": "true", "Location": f"/v1/messages/{held.mail_id}"},
    )


@api.post("/v1/messages:batch")
def send_batch() -> tuple[Response, int]:
    """Up to :data:`MAX_BATCH_MAILS` mails in ``{"messages": [...]}``; each answered on its own.

    202: every mail was accepted. 207: read ``items``, some (or all) were not; each refused item
    carries the error the single endpoint would have answered, and only those need sending again.
    A request that is not a batch at all (not JSON, no list, too many mails, too large, an
    ``Idempotency-Key`` header) is refused whole with the usual error and nothing is accepted.
    """
    services = _services()
    payload = _parse_json_body()
    if request.headers.get(IDEMPOTENCY_HEADER) is not None:
        raise ApiError(
            400,
            "invalid_request",
            f"a batch takes no {IDEMPOTENCY_HEADER} header (it would name one mail among many): "
            "give each mail that needs one its own idempotency_key",
            {IDEMPOTENCY_HEADER: "not allowed on a batch; use each mail's idempotency_key"},
        )
    shape = 'send {"messages": [mail, ...]}: a JSON object whose "messages" is a list of mails'
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_request", f"the body must be a JSON object: {shape}")
    unknown = sorted(str(key) for key in payload if key != "messages")
    fields = {key[:80]: "is not a batch field (the mails go in messages)" for key in unknown[:10]}
    mails = payload.get("messages")
    if not isinstance(mails, list):
        fields["messages"] = "is required: a list of mails" if mails is None else "must be a list"
    elif not 1 <= len(mails) <= MAX_BATCH_MAILS:
        fields["messages"] = (
            f"must hold 1 to {MAX_BATCH_MAILS} mails (it holds {len(mails)}): "
            "split larger batches into several requests"
        )
    if fields:
        raise ApiError(
            400, "invalid_request", f"the batch is invalid: fix the fields listed ({shape})", fields
        )
    scope = _request_caller(services)
    scope()  # a token that does not identify the caller refuses the request, not each mail
    items = accept_mails(
        services,
        cast(list[Any], mails),  # a list of 1 to MAX_BATCH_MAILS items: checked above
        scope=scope,
    )
    return _respond(_batch_answer(items))


def accept_mails(
    services: ApiServices,
    payloads: Sequence[Any],
    *,
    scope: Callable[[], str | None] = lambda: None,
) -> list[Answer | ApiError]:
    """Accept each mail of a batch as :func:`accept_mail` does; one outcome per mail, in order.

    Every mail is validated and (with its own ``idempotency_key``) reserved, and handed to the
    Pub/Sub client without waiting, before any publish is waited for: the client sends them in
    its batches. Each mail then waits for its own confirmation, so a mail answered 202 is on
    Pub/Sub; the published mails are recorded queued, 100 to a transaction. Each mail has its own
    trace, rooted in a :data:`BATCH_MAIL_SPAN` span linked to the request's span (the current
    span).
    """
    tracer = services.tracer or trace.get_tracer(__name__)
    request_span = trace.get_current_span().get_span_context()
    links = (
        [trace.Link(request_span, {SPAN_LINK_KIND: BATCH_LINK_KIND})]
        if request_span.is_valid
        else []
    )
    outcomes: list[Answer | ApiError | None] = [None] * len(payloads)
    started: list[tuple[int, trace.Span, _Admitted, Callable[[], str]]] = []
    for index, payload in enumerate(payloads):
        span = tracer.start_span(BATCH_MAIL_SPAN, context=Context(), links=links)
        with trace.use_span(span, end_on_exit=False):
            try:
                if not isinstance(payload, dict):
                    raise ApiError(
                        400,
                        "invalid_request",
                        "each item of messages must be a JSON object describing a mail",
                    )
                admitted = _admit(services, payload, key_in_header=None, scope=scope)
                if isinstance(admitted, _Admitted):
                    start = functools.partial(services.publisher.start, admitted.mail)
                    wait = _guarded(services, admitted, start)
                    started.append((index, span, admitted, wait))
                    continue
                outcomes[index] = admitted  # an idempotent replay
            except Exception as exc:  # one mail's failure is that mail's answer, not the batch's
                outcomes[index] = _item_error(exc, span)
        span.end()
    published: list[tuple[int, trace.Span, _Admitted, str]] = []
    for index, span, admitted, wait in started:
        with trace.use_span(span, end_on_exit=False):
            try:
                published.append((index, span, admitted, _guarded(services, admitted, wait)))
                continue
            except Exception as exc:  # as above
                outcomes[index] = _item_error(exc, span)
        span.end()
    # The published mails recorded queued together: one record transaction per request.
    _mark_queued(services, [(a, message_id, _trace_id(s)) for _, s, a, message_id in published])
    for index, span, admitted, message_id in published:
        with trace.use_span(span, end_on_exit=True):
            try:
                outcomes[index] = _accepted(services, admitted, message_id)
            except Exception as exc:  # as above
                outcomes[index] = _item_error(exc, span)
    return [outcome for outcome in outcomes if outcome is not None]


def _item_error(exc: Exception, span: trace.Span) -> ApiError:
    if not isinstance(exc, ApiError):
        log.exception("unexpected error accepting a batch mail; it is answered 500")
        exc = ApiError(
            500,
            "internal",
            "an unexpected error occurred with this mail (it has been logged); send it again, "
            "with an idempotency_key so that it cannot be queued twice",
        )
    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code))
    return exc


def _batch_answer(items: list[Answer | ApiError]) -> Answer:
    """202 when every mail was accepted, else 207; one item per mail with its ``index``."""
    body: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if isinstance(item, Answer):
            replayed = (
                {"idempotent_replayed": True} if "Idempotent-Replayed" in item.headers else {}
            )
            body.append({"index": index, "status_code": item.status, **item.body, **replayed})
        else:
            error: dict[str, Any] = {"code": item.code, "message": item.message}
            if item.fields:
                error["fields"] = item.fields
            body.append({"index": index, "status_code": item.status, "error": error})
    accepted = sum(1 for item in items if isinstance(item, Answer))
    return Answer(
        202 if accepted == len(items) else 207,
        {
            "accepted": accepted,
            "refused": len(items) - accepted,
            "trace_id": _current_trace_id(),
            "items": body,
        },
    )


@api.get("/v1/messages/<mail_id>")
def get_message(mail_id: str) -> Response:
    services = _services()
    if not _MAIL_ID.fullmatch(mail_id):
        # No mail has such an id. Checked before the record: an id such as "..", "__x__"
        # or one with a lone surrogate must never become a Firestore document path.
        raise ApiError(
            404,
            "not_found",
            f"no mail has the id {mail_id[:80]!r}: use a mail_id POST /v1/messages answered",
            {
                "mail_id": "must be a mail id: a UUID in lowercase hex such as "
                "01a20a30-daab-780b-bf17-2cf98734ba05"
            },
        )
    found = _record_call(lambda: services.record.get(mail_id))
    if found is None:
        raise ApiError(404, "not_found", f"no mail with id {mail_id!r} is in the record")
    return jsonify(_record_json(services, found, services.now()))


# The fields the status API shows, in its order (not the idempotency or lease bookkeeping).
_SHOWN = (
    "mail_id status accepted_at updated_at delivered_at trace_id message_id recipient_domains"
    " last_error replays attempts deliver_by next_attempt_at"
)


def _record_json(services: ApiServices, found: MailRecord, at: dt.datetime) -> dict[str, Any]:
    """A record as the API shows it, with ``stuck`` when reconcile would settle it."""
    stuck = diagnose(found, now=at, grace_seconds=services.config.reconcile_grace_seconds)
    fields = encode(found, time=dt.datetime.isoformat)
    shown = {name: fields[name] for name in _SHOWN.split()}
    return {**shown, "stuck": stuck.to_json(at) if stuck else None}


@api.get("/v1/messages")
def list_messages() -> Response:
    services = _services()
    status_text = request.args.get("status")
    status = None
    fields: dict[str, str] = {}
    if status_text:
        try:
            status = MailStatus(status_text)
        except ValueError:
            fields["status"] = "must be one of " + ", ".join(s.value for s in MailStatus)
    since = None
    if request.args.get("since"):
        try:
            since = utc_time(request.args["since"])
        except ValueError as exc:
            fields["since"] = str(exc)
    try:
        limit = int(request.args.get("limit", "100"))
        if not 1 <= limit <= 1000:
            raise ValueError
    except ValueError:
        fields["limit"] = "must be an integer from 1 to 1000"
    if fields:
        raise ApiError(400, "invalid_query", "the query is invalid: fix the fields listed", fields)
    try:
        page = _record_call(
            lambda: list_mails(
                services.record,
                status=status,
                since=since,
                limit=limit,
                page_token=request.args.get("page_token"),
            )
        )
    except ValueError as exc:  # the record's answer to a page_token it never issued
        raise ApiError(
            400,
            "invalid_query",
            "the query is invalid: fix the fields listed",
            {"page_token": "is not a page token this API returned"},
        ) from exc
    at = services.now()
    return jsonify(
        {
            "items": [_record_json(services, item, at) for item in page.items],
            "next_page_token": page.next_page_token,
        }
    )


@api.get("/v1/stats")
def stats() -> Response:
    services = _services()
    at = services.now()
    oldest = _record_call(lambda: oldest_undelivered(services.record))
    age = None
    if oldest is not None:
        age = (at - oldest.accepted_at).total_seconds()
    found = _record_call(
        lambda: survey(
            services.record, now=at, grace_seconds=services.config.reconcile_grace_seconds
        )
    )
    return jsonify(
        {
            "oldest_undelivered_mail_id": oldest.mail_id if oldest else None,
            "oldest_undelivered_age_seconds": age,
            "stuck": found.to_json(max_mails=STATS_STUCK_MAILS),
        }
    )


def _record_call(call: Any) -> Any:
    try:
        return call()
    except RecordUnavailable as exc:
        raise ApiError(
            503, "record_unavailable", "the delivery record is unavailable; retry later"
        ) from exc


def _release(record: DeliveryRecord, mail_id: str) -> None:
    try:
        record.release(mail_id)
    except RecordError:
        log.exception("could not release the reservation of unpublished mail %s", mail_id)
