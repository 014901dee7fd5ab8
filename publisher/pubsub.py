"""Publishing mails to Pub/Sub with the client library's own OpenTelemetry tracing.

``enable_open_telemetry_tracing=True`` makes the client start the ``<topic> create`` PRODUCER span
as a child of the current span (the Flask request) and put its context in the
``googclient_traceparent`` attribute; we do not hand-roll propagation on top of it.

:meth:`PubSubMailPublisher.start` hands a mail to the client's batch without waiting and returns
the wait: ``POST /v1/messages:batch`` starts all its mails before it waits for any, so they go to
Pub/Sub together; :meth:`~PubSubMailPublisher.publish` is start-then-wait.

Errors (translated in :meth:`PubSubMailPublisher.start`'s wait; Google's API errors in
:func:`mailpipe.pubsub.translate_api_errors`, the one mapping)::

    PublishError                  base: the mail was NOT accepted (HTTP 503 / 413)
    ├── PublishUnavailable        Pub/Sub unreachable, timed out or refused the request (also a
    │                             PubSubUnavailable)
    └── MailTooLarge              the encoded mail exceeds Pub/Sub's 10 MB message limit
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import retry as api_retry
from google.cloud.pubsub_v1.publisher import exceptions as publisher_exceptions
from google.cloud.pubsub_v1.types import BatchSettings

from mailpipe.config import PubSubConfig
from mailpipe.mail import QueuedMail
from mailpipe.pubsub import (
    RETRYABLE_API_ERRORS,
    PubSubUnavailable,
    publisher_client,
    translate_api_errors,
)

_RESULT_MARGIN_SECONDS = 5.0
# Pub/Sub's hard limit is 10,000,000 bytes per publish request; the client library counts the
# request envelope too, so keep a margin for attributes and framing.
MAX_PUBSUB_DATA_BYTES = 9_990_000


class PublishError(Exception):
    """The mail could not be published; nothing was accepted."""


class PublishUnavailable(PublishError, PubSubUnavailable):
    """Pub/Sub did not take the message (unreachable, timeout, permission, quota)."""


class MailTooLarge(PublishError):
    """The encoded mail is larger than a Pub/Sub message may be."""

    def __init__(self, size: int, limit: int = MAX_PUBSUB_DATA_BYTES) -> None:
        super().__init__(
            f"the encoded mail is {size:,} bytes; Pub/Sub messages are limited to {limit:,} bytes "
            "(attachments are base64-encoded: send fewer or smaller attachments)"
        )
        self.size = size
        self.limit = limit


class MailPublisher(Protocol):
    """What the publisher app needs: publish one mail, get its Pub/Sub message id."""

    def publish(self, mail: QueuedMail) -> str: ...

    def start(self, mail: QueuedMail) -> Callable[[], str]:
        """Begin publishing ``mail``; the returned call waits for its message id and raises
        what :meth:`publish` raises (``start`` itself raises nothing of its own)."""
        ...

    def close(self) -> None: ...


class PubSubMailPublisher:
    """Publishes :class:`QueuedMail` to the mail topic and waits until Pub/Sub has it."""

    def __init__(
        self,
        config: PubSubConfig,
        *,
        timeout: float = 30.0,
        client: pubsub_v1.PublisherClient | None = None,
    ) -> None:
        self._topic_path = config.topic_path
        self._timeout = timeout
        # The client library's default retries a failed publish for up to 600 s, long after we
        # answered 503: a mail the client was told to send again would then be sent twice. The
        # retries and the last RPC end within ``timeout``, before we answer.
        self._rpc_timeout = max(timeout / 3, 0.05)
        self._retry = api_retry.Retry(
            initial=0.1,
            maximum=max(timeout / 6, 0.1),
            multiplier=2,
            predicate=api_retry.if_exception_type(*RETRYABLE_API_ERRORS),
            timeout=timeout - self._rpc_timeout,
        )
        if client is None:
            # Requests wait for their publish future, so a short batch window only groups
            # concurrent requests; it never delays a lone one by more than 5 ms.
            batch = BatchSettings(max_latency=0.005, max_messages=100)
            client = publisher_client(config.emulator_host, tracing=True, batch_settings=batch)
        self._client = client

    def publish(self, mail: QueuedMail) -> str:
        return self.start(mail)()

    def start(self, mail: QueuedMail) -> Callable[[], str]:
        data, attributes = mail.to_pubsub()
        if len(data) > MAX_PUBSUB_DATA_BYTES:
            return _raise(MailTooLarge(len(data)))
        try:
            with self._translated(len(data)):
                future = self._client.publish(
                    self._topic_path,
                    data,
                    retry=self._retry,
                    timeout=self._rpc_timeout,
                    **attributes,
                )
        except PublishError as exc:
            return _raise(exc)

        def wait() -> str:
            with self._translated(len(data)):
                # The retries end within the timeout; the margin covers batching and callbacks.
                return str(future.result(timeout=self._timeout + _RESULT_MARGIN_SECONDS))

        return wait

    @contextmanager
    def _translated(self, size: int) -> Iterator[None]:
        try:
            with translate_api_errors("Pub/Sub publish failed", PublishUnavailable):
                yield
        except publisher_exceptions.MessageTooLargeError as exc:
            raise MailTooLarge(size) from exc
        except (concurrent.futures.TimeoutError, TimeoutError) as exc:
            raise PublishUnavailable(
                f"Pub/Sub did not confirm the publish within {self._timeout:g} s"
            ) from exc

    def close(self) -> None:
        """Send what is batched and stop the client (called on SIGTERM)."""
        self._client.stop()


def _raise(error: PublishError) -> Callable[[], str]:
    """A wait that raises ``error``: a publish that failed before it began fails when waited on."""

    def wait() -> str:
        raise error

    return wait
