"""The push endpoint: Pub/Sub (or Eventarc) POSTs each message here.

Accepted bodies:

- the Pub/Sub push envelope ``{"message": {"data", "attributes", "messageId", …},
  "subscription", "deliveryAttempt"}`` (``deliveryAttempt`` is absent in the emulator);
- a CloudEvent of type ``google.cloud.pubsub.topic.v1.messagePublished``, binary (``ce-*``
  headers) or structured (``application/cloudevents+json``), whose data is that envelope.

Answers: 204 = ack (delivered, bounced, duplicate); 503 = nack (deferred: Pub/Sub retries with the
subscription's backoff); 400 = the body is not a push message (also a nack: it ends on the
dead-letter topic, where it can be inspected); 401 = not from our push subscription. 202 is not
used: the emulator treats it as a nack. Every answer with a body is JSON, whatever the status
(404, 405, 408, 413, and 500 for an unexpected failure, which Pub/Sub also retries): see
:mod:`mailpipe.httpjson`. Bodies are parsed with its limits (depth, integer size, lone surrogates).
"""

from __future__ import annotations

import base64
import binascii
import logging
from contextlib import nullcontext
from typing import Any

from cloudevents.http import from_http
from flask import Flask, Request, Response, jsonify, request
from opentelemetry.trace import Link, SpanKind

from mailpipe.attributes import SPAN_LINK_KIND, context_link, extract_context, publisher_context
from mailpipe.httpjson import (
    JsonBodyError,
    check_json_value,
    error_response,
    install_json_errors,
    parse_json,
)
from mailpipe.telemetry import IdleSpanFlush
from subscriber.auth import PushAuthenticator, PushAuthError
from subscriber.config import SubscriberConfig
from subscriber.dead_letters import DeadLetterRecorder
from subscriber.delivery import DeliveryService, ReceivedMessage

log = logging.getLogger(__name__)

PUBSUB_EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"


class MalformedPush(ValueError):
    """The request body is not a Pub/Sub push message; the text says what is wrong."""


def _json_object(data: Any, what: str) -> dict[str, Any]:
    """``data`` (JSON text, bytes or already parsed) as a JSON object within the body limits."""
    try:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")  # a lone surrogate fails as UTF-8
        if isinstance(data, bytes):
            data = parse_json(data)
        else:
            check_json_value(data)
    except JsonBodyError as exc:
        raise MalformedPush(f"{what} is not JSON a Pub/Sub push carries: {exc.message}") from exc
    if not isinstance(data, dict):
        raise MalformedPush(f"{what} must be a JSON object (a Pub/Sub push envelope)")
    return data


def _envelope_from_request(req: Request) -> dict[str, Any]:
    """The push envelope, from either the plain push body or a CloudEvent."""
    is_cloudevent = (
        "ce-specversion" in req.headers or req.mimetype == "application/cloudevents+json"
    )
    raw = req.get_data(cache=True)
    if is_cloudevent:
        try:
            event = from_http(dict(req.headers), raw)
        except Exception as exc:  # the cloudevents SDK raises many unrelated types
            raise MalformedPush(f"not a valid CloudEvent: {exc}") from exc
        if event["type"] != PUBSUB_EVENT_TYPE:
            raise MalformedPush(
                f"CloudEvent type must be {PUBSUB_EVENT_TYPE}, got {event['type']!r}"
            )
        if event.data is None:
            raise MalformedPush("CloudEvent data must be an object holding 'message'")
        return _json_object(event.data, "CloudEvent data")
    return _json_object(raw, "body")


def parse_push(req: Request) -> ReceivedMessage:
    """Decode a push request into a :class:`ReceivedMessage` or raise :class:`MalformedPush`."""
    envelope = _envelope_from_request(req)
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise MalformedPush("envelope has no 'message' object")
    message_id = message.get("messageId") or message.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise MalformedPush("message has no 'messageId'")
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise MalformedPush("message 'attributes' must map strings to strings")
    encoded = message.get("data", "")
    if not isinstance(encoded, str):
        raise MalformedPush("message 'data' must be a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedPush("message 'data' is not valid base64") from exc
    attempt = envelope.get("deliveryAttempt")
    return ReceivedMessage(
        data=data,
        attributes=attributes,
        message_id=message_id,
        delivery_attempt=attempt if isinstance(attempt, int) and attempt > 0 else None,
    )


def _request_link(req: Request) -> list[Link]:
    """A link to the HTTP request's own trace (Cloud Run's), kept for correlation only."""
    link = context_link(extract_context(dict(req.headers)), {SPAN_LINK_KIND: "cloud_run_request"})
    return [link] if link else []


class PushHandler:
    """Answers push requests (from any WSGI framework's request object) with the delivery core.

    ``authenticator`` may be ``None`` only in local mode (the emulator sends no token); outside
    it, refusing to start is safer than an endpoint anyone could POST mail to. Each request runs
    inside ``span_flush`` (when given): the request that leaves the process idle exports the spans
    before its answer, because with request-based billing Cloud Run throttles the CPU once no
    request is in flight. Metrics are never flushed here (they export on their own period).
    """

    def __init__(
        self,
        config: SubscriberConfig,
        *,
        delivery: DeliveryService,
        dead_letters: DeadLetterRecorder,
        authenticator: PushAuthenticator | None,
        span_flush: IdleSpanFlush | None = None,
    ) -> None:
        if authenticator is None and not config.local_mode:
            raise ValueError(
                "the push endpoint needs MAILPIPE_PUSH_AUDIENCE and MAILPIPE_PUSH_SERVICE_ACCOUNT "
                "outside local mode (PUBSUB_EMULATOR_HOST unset): Pub/Sub's OIDC token must be "
                "checked"
            )
        self._delivery = delivery
        self._dead_letters = dead_letters
        self._authenticator = authenticator
        self._span_flush = span_flush

    def _request_scope(self) -> Any:
        return self._span_flush.request() if self._span_flush is not None else nullcontext()

    def _receive(self, req: Request) -> ReceivedMessage | Response:
        """The authenticated, decoded message, or the error answer (401, 400) to send instead."""
        if self._authenticator is not None:
            try:
                self._authenticator.verify(
                    req.headers.get("Authorization"),
                    serverless_authorization=req.headers.get("X-Serverless-Authorization"),
                )
            except PushAuthError as exc:
                log.warning("rejected push request: %s", exc)
                return error_response(401, "unauthenticated", str(exc))
        try:
            return parse_push(req)
        except MalformedPush as exc:
            return error_response(400, "malformed_push", str(exc))

    def deliver(self, req: Request) -> Response:
        """A message of the mail subscription: deliver it; 204 acks, 503 asks for a retry."""
        with self._request_scope():
            received = self._receive(req)
            if isinstance(received, Response):
                return received
            result = self._delivery.deliver(
                received,
                parent=publisher_context(received.attributes),
                kind=SpanKind.CONSUMER,
                links=_request_link(req),
            )
        if result.ack:
            return Response(status=204)
        return error_response(503, f"mail_{result.outcome}", result.detail or str(result.outcome))

    def dead_letter(self, req: Request) -> Response:
        """A message of the dead-letter record subscription: mark the mail dead-lettered."""
        with self._request_scope():
            received = self._receive(req)
            if isinstance(received, Response):
                return received
            ack = self._dead_letters.handle(received, parent=publisher_context(received.attributes))
        if ack:
            return Response(status=204)
        return error_response(
            503, "record_unavailable", "the delivery record is unavailable; retry"
        )


def create_push_app(
    handler: PushHandler,
    *,
    push_path: str = "/",
    dead_letter_path: str = "/dead-letter",
) -> Flask:
    """Build the push endpoint: the mail subscription POSTs to ``push_path``, the dead-letter
    record subscription to ``dead_letter_path`` (both from topology.json)."""
    app = Flask("mailpipe.subscriber.push")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024  # base64 of a 10 MB message + envelope
    install_json_errors(
        app,
        not_found_hint=f"Pub/Sub pushes to {push_path!r} and {dead_letter_path!r}",
        log=log,
    )

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.post(dead_letter_path)
    def dead_letter() -> Response:
        return handler.dead_letter(request)

    @app.post(push_path)
    def push() -> Response:
        return handler.deliver(request)

    return app
