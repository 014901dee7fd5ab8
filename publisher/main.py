"""The publisher's production entry point: gunicorn serving the app on ``$PORT``.

``python -m publisher`` runs it (see :mod:`mailpipe.serving` for the SIGTERM behaviour).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

import flask
from flask import Flask

from mailpipe.events import EventsConfig, build_emitter
from mailpipe.id_token import GOOGLE_JWKS_URL, TokenError, TokenKeysUnavailable
from mailpipe.logs import configure_logging
from mailpipe.record import DeliveryRecord, open_record
from mailpipe.serving import serve_wsgi
from mailpipe.telemetry import Telemetry, idle_span_flush, setup_telemetry
from mailpipe.topology import load_topology
from publisher.app import ApiError, create_app
from publisher.caller import identify_caller
from publisher.config import PublisherConfig
from publisher.events import AcceptedEvents
from publisher.idempotency import CallerIdentity
from publisher.listing import oldest_undelivered
from publisher.metrics import PublisherMetrics
from publisher.pubsub import MailPublisher, PubSubMailPublisher
from publisher.reconcile import stuck_counts


def oldest_undelivered_age(
    record: DeliveryRecord,
    *,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Callable[[], float | None]:
    """The source of the ``mailpipe.oldest_undelivered_age`` gauge: seconds since the oldest
    undelivered mail was accepted, ``None`` when every mail is delivered (or given up on)."""

    def age() -> float | None:
        oldest = oldest_undelivered(record)
        return None if oldest is None else (clock() - oldest.accepted_at).total_seconds()

    return age


def caller_identity(*, local_mode: bool, jwks_url: str = GOOGLE_JWKS_URL) -> CallerIdentity:
    """Who is calling, for idempotency-key scopes: the invoker Cloud Run IAM verified.

    The publisher sits behind Cloud Run IAM (Terraform grants ``run.invoker`` to named callers
    only), which checks the caller's ID token and strips its signature; the token's claims name
    the caller (:func:`publisher.caller.identify_caller`). Local mode has no front and no token: one
    shared scope. An unacceptable token answers 401 (503 while Google's keys cannot be fetched).
    """

    def identify(request: flask.Request) -> str | None:
        try:
            # werkzeug's Headers is no Mapping subclass but reads like one (get is case-blind).
            headers = cast("Mapping[str, str]", request.headers)
            return identify_caller(headers, local_mode=local_mode, jwks_url=jwks_url)
        except TokenKeysUnavailable as exc:
            raise ApiError(503, "auth_unavailable", f"{exc}; retry later") from exc
        except TokenError as exc:
            raise ApiError(
                401,
                "unauthenticated",
                f"{exc}. Call the publisher with a Google-signed ID token for its URL "
                "(Authorization: Bearer ...), as Cloud Run IAM requires.",
            ) from exc

    return identify


def build_app(
    config: PublisherConfig,
    *,
    telemetry: Telemetry | None = None,
    events: EventsConfig | None = None,
) -> tuple[Flask, Callable[[], None]]:
    """Wire the production collaborators; returns the app and its ``close()``.

    ``telemetry`` replaces the one built from the config (tests pass stand-ins for Google's
    exporters' clients there); ``events`` turns the ``accepted`` event on.
    """
    telemetry = telemetry or setup_telemetry(config.telemetry)
    configure_logging(config.telemetry, project=config.pubsub.project)
    publisher: MailPublisher = PubSubMailPublisher(config.pubsub, timeout=config.publish_timeout)
    emitter = build_emitter(events, config.pubsub, config.telemetry, telemetry.meter_provider)
    if emitter is not None:
        publisher = AcceptedEvents(publisher, emitter)
    record = open_record(config.record)
    metrics = PublisherMetrics(telemetry.meter)
    # The lag alert's metric (delivery lagging > 10 min); read at each metric collection.
    metrics.set_oldest_undelivered_source(oldest_undelivered_age(record))
    # What `mailpipe reconcile --fix` would settle, for an alert on stuck records.
    metrics.set_stuck_source(stuck_counts(record, grace_seconds=config.reconcile_grace_seconds))
    app = create_app(
        config,
        publisher=publisher,
        record=record,
        metrics=metrics,
        tracer_provider=telemetry.tracer_provider,
        identify_caller=caller_identity(local_mode=config.pubsub.emulator_host is not None),
        suppressions=record.suppressions(config.suppressions),
    )
    span_flush = idle_span_flush(config.telemetry, telemetry)
    if span_flush is not None:
        # Outside the Flask instrumentation: the request's server span has ended (Flask's
        # teardown) when the flush runs, and the flush runs before the server writes the answer,
        # so the root span is exported before Cloud Run can throttle an idle instance.
        flask_app = app.wsgi_app

        def flushing_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            with span_flush.request():
                return flask_app(environ, start_response)

        app.wsgi_app = flushing_app  # type: ignore[method-assign]

    def close() -> None:
        publisher.close()
        metrics.set_oldest_undelivered_source(None)  # the last export must not read it
        metrics.set_stuck_source(None)
        record.close()
        telemetry.shutdown()

    return app, close


def serve(environ: Mapping[str, str] | None = None) -> None:
    """Read the config (failing fast) and serve until SIGTERM."""
    environ = os.environ if environ is None else environ
    config = PublisherConfig.from_env(environ)
    events = EventsConfig.from_env(environ, load_topology())
    serve_wsgi(
        lambda: build_app(config, events=events),
        host=config.host,
        port=config.port,
        http=config.http,
    )
