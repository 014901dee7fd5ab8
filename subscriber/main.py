"""The subscriber's entry points: ``python -m subscriber push`` (Cloud Run) or ``pull`` (a worker).

Both build the same :class:`~subscriber.delivery.DeliveryService` from the config.

- ``push``: gunicorn serves :func:`subscriber.push.create_push_app` on ``$PORT``: the mail
  subscription pushes to ``/``, the dead-letter record subscription to ``/dead-letter``.
- ``pull``: streaming pull on the mail subscription and on the dead-letter record subscription,
  until SIGTERM or SIGINT; deliveries in flight finish before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType

from flask import Flask

from mailpipe.events import EventEmitter, EventsConfig, build_emitter
from mailpipe.logs import configure_logging, register_secret
from mailpipe.record import DeliveryRecord, open_record
from mailpipe.serving import serve_wsgi
from mailpipe.telemetry import Telemetry, idle_span_flush, setup_telemetry
from mailpipe.topology import load_topology
from subscriber.auth import PushAuthenticator
from subscriber.config import SubscriberConfig
from subscriber.dead_letters import DeadLetterRecorder
from subscriber.delivery import DeliveryService
from subscriber.metrics import DeliveryMetrics
from subscriber.pull import PullWorker, make_subscriber_client
from subscriber.push import PushHandler, create_push_app
from subscriber.redaction import credential_forms
from subscriber.smtp import SmtpSender
from subscriber.suppression import RecipientScreen

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The subscriber's wired collaborators and how to close them."""

    delivery: DeliveryService
    dead_letters: DeadLetterRecorder
    sender: SmtpSender
    record: DeliveryRecord
    telemetry: Telemetry
    events: EventEmitter | None = None

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self.sender.close()
        self.record.close()
        self.telemetry.shutdown()


def build_services(
    config: SubscriberConfig,
    *,
    telemetry: Telemetry | None = None,
    events: EventsConfig | None = None,
) -> Services:
    """``events`` turns the delivery events on (docs/events.md). If a part fails to start, the
    parts built before it are closed: a FaaS host retries the start on every request."""
    with contextlib.ExitStack() as built:
        if telemetry is None:
            telemetry = setup_telemetry(config.telemetry)
            built.callback(telemetry.shutdown)
        services = _build_services(config, telemetry, events, built)
        built.pop_all()
    return services


def _build_services(
    config: SubscriberConfig,
    telemetry: Telemetry,
    events: EventsConfig | None,
    built: contextlib.ExitStack,
) -> Services:
    configure_logging(config.telemetry, project=config.pubsub.project)
    # The password in every form AUTH gives it, so no log line can show one.
    for form in credential_forms(config.smtp.username, config.smtp.password):
        register_secret(form)
    tracer = telemetry.tracer("mailpipe.subscriber")
    metrics = DeliveryMetrics(telemetry.meter)
    sender = SmtpSender(
        config.smtp,
        tracer=tracer,
        address_style=config.telemetry.address_style,
        metrics=metrics,
    )
    built.callback(sender.close)
    record = open_record(config.record)
    built.callback(record.close)
    screen = None
    if config.suppressions.enabled:
        screen = RecipientScreen(
            record.suppressions(config.suppressions), config.telemetry.address_style
        )
    else:
        log.warning("%s: every recipient is sent to", config.suppressions.disabled_reason)
    emitter = build_emitter(events, config.pubsub, config.telemetry, telemetry.meter_provider)
    if emitter is not None:
        built.callback(emitter.close)
    delivery = DeliveryService(
        sender=sender,
        record=record,
        tracer=tracer,
        message_id_domain=config.smtp.message_id_domain,
        metrics=metrics,
        lease_seconds=config.delivery_lease_seconds,
        address_style=config.telemetry.address_style,
        delivery_timeout=config.delivery_timeout,
        events=emitter,
        screen=screen,
    )
    dead_letters = DeadLetterRecorder(
        record=record,
        tracer=tracer,
        metrics=metrics,
        events=emitter,
        schedule=config.retry_schedule,
    )
    return Services(delivery, dead_letters, sender, record, telemetry, emitter)


def build_push_handler(config: SubscriberConfig, services: Services) -> PushHandler:
    """The push handler with the OIDC check (on whenever an audience is configured) in the mode
    ``MAILPIPE_PUSH_AUTH`` declares, and the span flush of :class:`IdleSpanFlush`."""
    if not config.local_mode and not (config.push_audience and config.push_service_account):
        raise ValueError(
            "the push endpoint needs MAILPIPE_PUSH_AUDIENCE and MAILPIPE_PUSH_SERVICE_ACCOUNT "
            "outside local mode (PUBSUB_EMULATOR_HOST unset): Pub/Sub's OIDC token must be checked"
        )
    authenticator = (
        PushAuthenticator(
            audience=config.push_audience,
            service_account_email=config.push_service_account,
            mode=config.push_auth,
        )
        if config.push_audience
        else None
    )
    return PushHandler(
        config,
        delivery=services.delivery,
        dead_letters=services.dead_letters,
        authenticator=authenticator,
        span_flush=idle_span_flush(config.telemetry, services.telemetry),
    )


def build_push_app(
    config: SubscriberConfig,
    *,
    telemetry: Telemetry | None = None,
    events: EventsConfig | None = None,
) -> tuple[Flask, Callable[[], None]]:
    """The push app and its ``close()``; ``telemetry`` replaces the one built from the config."""
    services = build_services(config, telemetry=telemetry, events=events)
    handler = build_push_handler(config, services)
    topology = load_topology()
    app = create_push_app(
        handler,
        push_path=topology.delivery_subscription.push_path,
        dead_letter_path=topology.dead_letter_record_subscription.push_path,
    )
    return app, services.close


def serve_push(config: SubscriberConfig, *, events: EventsConfig | None = None) -> None:
    serve_wsgi(
        lambda: build_push_app(config, events=events),
        host=config.host,
        port=config.port,
        http=config.http,
    )


def run_pull(
    config: SubscriberConfig,
    *,
    stop: threading.Event | None = None,
    events: EventsConfig | None = None,
) -> None:
    """Deliver with streaming pull until ``stop`` is set or SIGTERM/SIGINT arrives."""
    services = build_services(config, events=events)
    client = make_subscriber_client(config.pubsub)
    workers = [
        PullWorker(
            subscription_path=config.pubsub.subscription_path,
            handler=lambda message, parent: services.delivery.deliver(message, parent=parent).ack,
            client=client,
            max_messages=config.pull_max_messages,
            max_workers=max(config.smtp.pool_size * 2, 4),
        ),
        PullWorker(
            subscription_path=config.pubsub.dead_letter_record_subscription_path,
            handler=lambda message, parent: services.dead_letters.handle(message, parent=parent),
            client=client,
            max_messages=10,
            max_workers=2,
        ),
    ]
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received signal %s: stopping after deliveries in flight", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    for worker in workers:
        worker.start()
    log.info("pulling from %s", config.pubsub.subscription_path)
    try:
        while not stop.wait(0.5):
            for worker in workers:
                worker.check()
    finally:
        for worker in workers:
            worker.stop()
        client.close()
        services.close()


def main(mode: str, environ: Mapping[str, str] | None = None) -> None:
    environ = os.environ if environ is None else environ
    config = SubscriberConfig.from_env(environ, push=mode == "push")
    events = EventsConfig.from_env(environ, load_topology())
    if mode == "push":
        serve_push(config, events=events)
    else:
        run_pull(config, events=events)
