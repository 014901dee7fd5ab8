"""Delivery events: one message on the events topic per state change of a mail (docs/events.md).

:meth:`EventEmitter.emit` runs inside the mail's span, so the library's ``<topic> create`` span
joins the mail's trace. Best effort, never at the mail's expense: ``emit`` never raises nor waits;
a failed publish is logged and counted (``mailpipe.events.failed``). Consumers dedupe on
``event_id``.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import retry as api_retry
from google.cloud.pubsub_v1.types import BatchSettings
from opentelemetry import metrics, trace

from mailpipe.config import AddressStyle, EnvReader, PubSubConfig, TelemetryConfig
from mailpipe.logs import redact_address, redact_addresses, redact_secrets
from mailpipe.mail import QueuedMail
from mailpipe.pubsub import RETRYABLE_API_ERRORS, publisher_client
from mailpipe.topology import Topology

log = logging.getLogger(__name__)

EVENT_SCHEMA_VERSION = 1


class EventType(enum.StrEnum):
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    SUPPRESSED = "suppressed"
    DEAD_LETTERED = "dead_lettered"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    SANDBOXED = "sandboxed"


@dataclass(frozen=True)
class EventsConfig:
    """``MAILPIPE_EVENTS_TOPIC`` (``none``: no events), ``MAILPIPE_EVENTS_TIMEOUT`` (seconds)."""

    topic: str | None
    timeout: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str], topology: Topology) -> EventsConfig:
        env = EnvReader(environ)
        topic = env.string("MAILPIPE_EVENTS_TOPIC", topology.events_topic.name)
        timeout = env.number("MAILPIPE_EVENTS_TIMEOUT", 5.0, minimum=0.1, maximum=60.0)
        env.finish()
        return cls(topic=None if topic.lower() == "none" else topic, timeout=timeout)


class EventEmitter:
    """Publishes delivery events; ``client`` must trace (``publisher_client(tracing=True)``)."""

    def __init__(
        self,
        client: pubsub_v1.PublisherClient,
        topic_path: str,
        *,
        address_style: AddressStyle = "domain",
        timeout: float = 5.0,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._client, self._topic, self._style = client, topic_path, address_style
        self._timeout = timeout
        # Bounded like the wait: the library's default retries for 600 s in the background.
        retryable = api_retry.if_exception_type(*RETRYABLE_API_ERRORS)
        self._retry = api_retry.Retry(predicate=retryable, timeout=timeout)
        self._failed = (meter or metrics.get_meter("mailpipe.events")).create_counter(
            "mailpipe.events.failed", unit="{event}", description="Events that were not published"
        )
        self._answered = threading.Condition()  # close() waits for the events in flight
        self._in_flight = 0

    def emit(
        self,
        event_type: EventType,
        mail_id: str,
        *,
        mail: QueuedMail | None = None,
        attempt: int = 0,
        reply_code: int | None = None,
        enhanced_status: str | None = None,
        reply: str | None = None,
        recipients: list[str] | None = None,
    ) -> None:
        """Publish one event from inside the mail's span, without waiting. Never raises.

        ``mail`` (when known) gives recipients and metadata. Addresses (recipients, reply) are
        shown as ``MAILPIPE_LOG_ADDRESSES`` allows; domains always. ``recipients``: the ones the
        event is about (``suppressed``), if not all of the mail's.
        """
        try:
            if recipients is None:
                recipients = mail.request.recipients if mail is not None else []
            context = trace.get_current_span().get_span_context()
            event = {
                "schema_version": EVENT_SCHEMA_VERSION,
                "event_id": f"{mail_id}/{event_type}/{attempt}",
                "type": str(event_type),
                "mail_id": mail_id,
                "attempt": attempt,
                # `accepted` is dated when the publisher accepted the mail: it may be published
                # after the same mail's `delivered`.
                "occurred_at": (
                    mail.accepted_at
                    if event_type is EventType.ACCEPTED and mail is not None
                    else dt.datetime.now(dt.UTC)
                ).isoformat(timespec="milliseconds"),
                "trace_id": format(context.trace_id, "032x") if context.is_valid else None,
                "reply_code": reply_code,
                "enhanced_status": enhanced_status,
                "reply": redact_addresses(redact_secrets(reply), self._style) if reply else None,
                "recipient_domains": sorted({r.rpartition("@")[2].lower() for r in recipients}),
                "recipients": [redact_address(r, self._style) for r in recipients],
                "metadata": dict(mail.request.metadata) if mail is not None else {},
            }
            data = json.dumps(event, separators=(",", ":")).encode()
            attributes = {"event_type": str(event_type), "mail_id": mail_id}
            future = self._client.publish(
                self._topic, data, retry=self._retry, timeout=self._timeout, **attributes
            )
        except Exception as exc:  # an event must never fail (or hold up) the mail's delivery
            self._fail(event_type, mail_id, exc)
            return
        with self._answered:
            self._in_flight += 1
        future.add_done_callback(lambda done: self._done(event_type, mail_id, done))

    def _done(self, event_type: EventType, mail_id: str, future: Future[str]) -> None:
        if (exc := future.exception()) is not None:
            self._fail(event_type, mail_id, exc)
        with self._answered:
            self._in_flight -= 1
            self._answered.notify_all()

    def _fail(self, event_type: EventType, mail_id: str, exc: BaseException) -> None:
        log.error("could not publish the %s event of mail %s: %s", event_type, mail_id, exc)
        self._failed.add(1, {"mailpipe.event": str(event_type)})

    def close(self) -> None:
        """Send what is batched and wait (``MAILPIPE_EVENTS_TIMEOUT`` at most) for the answers."""
        self._client.stop()
        with self._answered:
            self._answered.wait_for(lambda: not self._in_flight, timeout=self._timeout + 1.0)


def build_emitter(
    config: EventsConfig | None,
    pubsub: PubSubConfig,
    telemetry: TelemetryConfig,
    meters: metrics.MeterProvider | None = None,
) -> EventEmitter | None:
    """A service's emitter, on its own client; None when events are off (no ``config``)."""
    if config is None or config.topic is None:
        return None
    # Nothing waits for an event: 50 ms lets the events of concurrent mails share a request.
    batch = BatchSettings(max_latency=0.05)
    client = publisher_client(pubsub.emulator_host, tracing=True, batch_settings=batch)
    meter = (meters or metrics.get_meter_provider()).get_meter("mailpipe.events")
    topic = f"projects/{pubsub.project}/topics/{config.topic}"
    return EventEmitter(
        client, topic, address_style=telemetry.address_style, timeout=config.timeout, meter=meter
    )
