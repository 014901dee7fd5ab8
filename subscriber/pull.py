"""The streaming-pull worker: the same delivery core, fed by ``SubscriberClient.subscribe``.

The client's own OpenTelemetry option (``enable_open_telemetry_tracing=True``) makes its
``<subscription> subscribe`` CONSUMER span a child of the publisher's ``create`` span. Inside the
callback there is no current span (google-cloud-pubsub 2.44 detaches it), so ``mail deliver`` is
parented explicitly on that subscribe span.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures

import google.cloud.pubsub_v1 as pubsub_v1
from google.cloud.pubsub_v1.subscriber.message import Message
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from google.cloud.pubsub_v1.types import FlowControl
from opentelemetry import context as otel_context
from opentelemetry import trace

from mailpipe.attributes import publisher_context
from mailpipe.config import PubSubConfig
from mailpipe.pubsub import subscriber_client
from subscriber.delivery import ReceivedMessage

log = logging.getLogger(__name__)

Handler = Callable[[ReceivedMessage, otel_context.Context | None], bool]
"""Handles one message with the given parent context; returns True to ack, False to nack."""


def make_subscriber_client(config: PubSubConfig) -> pubsub_v1.SubscriberClient:
    """A subscriber client with OpenTelemetry on; against the emulator, without the 4 MiB cap."""
    logging.getLogger("opentelemetry.sdk.trace").addFilter(_not_ended_twice)  # added once
    return subscriber_client(config.emulator_host, tracing=True)


def _not_ended_twice(record: logging.LogRecord) -> bool:
    """google-cloud-pubsub 2.44 with OpenTelemetry ends its subscribe span twice per acked
    message and the SDK warns each time (python-pubsub PR #1513, unmerged): once per mail, it
    would drown real warnings."""
    return record.getMessage() != "Calling end() on an ended span."


def delivery_parent(message: Message) -> otel_context.Context | None:
    """The parent of ``mail deliver``: the library's subscribe span, else the publisher's."""
    otel_data = getattr(message, "opentelemetry_data", None)
    subscribe_span = getattr(otel_data, "subscribe_span", None) if otel_data else None
    if subscribe_span is not None and subscribe_span.get_span_context().is_valid:
        return trace.set_span_in_context(subscribe_span)
    return publisher_context(message.attributes)


class PullWorker:
    """Receives from one subscription with streaming pull until :meth:`stop`."""

    def __init__(
        self,
        *,
        subscription_path: str,
        handler: Handler,
        client: pubsub_v1.SubscriberClient,
        max_messages: int = 100,
        max_workers: int = 16,
        lease_extension_seconds: int = 20,
    ) -> None:
        self._subscription_path = subscription_path
        self._handler = handler
        self._client = client
        # Each lease extension (and the stream's ack deadline) lasts at most this long, so the
        # messages a stopped or killed worker held come back to the others within it, instead of
        # the client's 60 s default. Running deliveries keep being extended.
        self._flow_control = FlowControl(
            max_messages=max_messages, max_duration_per_lease_extension=lease_extension_seconds
        )
        self._executor = futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="mailpipe-deliver"
        )
        self._future: pubsub_v1.subscriber.futures.StreamingPullFuture | None = None
        self._stopped = threading.Event()

    def _callback(self, message: Message) -> None:
        received = ReceivedMessage(
            data=message.data,
            attributes=dict(message.attributes),
            message_id=message.message_id,
            delivery_attempt=message.delivery_attempt,
        )
        try:
            ack = self._handler(received, delivery_parent(message))
        except Exception:
            # Never let a bug drop a message: nack it so Pub/Sub retries (and dead-letters).
            log.exception("handler crashed for message %s; nacking", message.message_id)
            message.nack()
            return
        if ack:
            message.ack()
        else:
            message.nack()

    def start(self) -> None:
        self._future = self._client.subscribe(
            self._subscription_path,
            callback=self._callback,
            flow_control=self._flow_control,
            scheduler=ThreadScheduler(self._executor),
            await_callbacks_on_shutdown=True,
        )

    def check(self) -> None:
        """Raise the stream's error if it ended on its own (e.g. the subscription is missing)."""
        if self._future is not None and self._future.done() and not self._stopped.is_set():
            self._future.result()  # raises the stream's exception
            raise RuntimeError(f"streaming pull on {self._subscription_path} ended unexpectedly")

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop receiving, let running deliveries finish, and release the stream.

        Messages received but not yet handed to a delivery are not acked and come back after the
        ack deadline; nothing is lost. The wait is bounded because google-cloud-pubsub 2.44 with
        OpenTelemetry on can fail inside its own shutdown thread (it asserts on a process span
        that never started when it nacks such messages), leaving the future unresolved.
        """
        self._stopped.set()
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result(timeout=grace_seconds)
            except futures.TimeoutError:
                log.warning(
                    "streaming pull on %s did not shut down within %.0f s; undelivered messages "
                    "will be redelivered after their ack deadline",
                    self._subscription_path,
                    grace_seconds,
                )
            except Exception:  # cancelled streams raise; nothing to do
                log.debug("streaming pull ended", exc_info=True)
        self._executor.shutdown(wait=True)
