"""Delivery events: one message on the events topic per state change of a mail (docs/events.md).

:meth:`EventEmitter.emit` runs inside the mail's span, so the library's ``<topic> create`` span
joins the mail's trace and its context rides in ``googclient_traceparent``. Guarantee: best
effort, at most one publish per recorded state change (after the record write); ``emit`` never
raises and waits at most ``MAILPIPE_EVENTS_TIMEOUT``: a failure is logged and counted
(``mailpipe.events.failed``), and the mail goes on untouched. Consumers dedupe on ``event_id``.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import retry as api_retry
from google.cloud.pubsub_v1.types import BatchSettings
from opentelemetry import metrics, trace

from mailpipe.config import AddressStyle, ConfigError, PubSubConfig, TelemetryConfig
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
        topic = environ.get("MAILPIPE_EVENTS_TOPIC", "").strip() or topology.events_topic.name
        text = environ.get("MAILPIPE_EVENTS_TIMEOUT", "").strip() or "5"
        timeout = float(text) if text.replace(".", "", 1).isdigit() else -1.0
        if not 0.1 <= timeout <= 60.0:
            raise ConfigError({"MAILPIPE_EVENTS_TIMEOUT": f"must be 0.1..60 seconds, got {text!r}"})
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
    ) -> bool:
        """Publish one event from inside the mail's span; True once Pub/Sub has it. Never raises.

        ``mail`` (when known) gives recipients and metadata. Addresses (recipients, reply) are
        shown as ``MAILPIPE_LOG_ADDRESSES`` allows; domains always.
        """
        try:
            recipients = mail.request.recipients if mail is not None else []
            context = trace.get_current_span().get_span_context()
            event = {
                "schema_version": EVENT_SCHEMA_VERSION,
                "event_id": f"{mail_id}/{event_type}/{attempt}",
                "type": str(event_type),
                "mail_id": mail_id,
                "attempt": attempt,
                # `accepted` happened when the publisher accepted the mail, which may be after
                # the subscriber already delivered it by the time this event is published.
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
            self._client.publish(
                self._topic, data, retry=self._retry, timeout=self._timeout, **attributes
            ).result(timeout=self._timeout + 1.0)
            return True
        except Exception as exc:  # an event must never fail (or hold up) the mail's delivery
            log.error("could not publish the %s event of mail %s: %s", event_type, mail_id, exc)
            self._failed.add(1, {"mailpipe.event": str(event_type)})
            return False

    def close(self) -> None:
        self._client.stop()


def build_emitter(
    config: EventsConfig | None,
    pubsub: PubSubConfig,
    telemetry: TelemetryConfig,
    meters: metrics.MeterProvider | None = None,
) -> EventEmitter | None:
    """A service's emitter, on its own client; None when events are off (no ``config``)."""
    if config is None or config.topic is None:
        return None
    batch = BatchSettings(max_latency=0.005)  # a lone event waits 5 ms at most
    client = publisher_client(pubsub.emulator_host, tracing=True, batch_settings=batch)
    meter = (meters or metrics.get_meter_provider()).get_meter("mailpipe.events")
    topic = f"projects/{pubsub.project}/topics/{config.topic}"
    return EventEmitter(
        client, topic, address_style=telemetry.address_style, timeout=config.timeout, meter=meter
    )
