"""Pub/Sub clients built one way: against the emulator over a channel without gRPC's 4 MiB
receive limit (docs/local-vs-gcp.md, row 9), with the library's own tracing where asked.

Google's API errors are translated in one place, :func:`translate_api_errors`::

    PubSubUnavailable     Pub/Sub could not be reached, timed out or refused the request; callers
                          subclass it (PublishUnavailable, DeadLetterUnavailable)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.api_core import exceptions as api_exceptions
from google.cloud.pubsub_v1.types import BatchSettings, PublisherOptions, SubscriberOptions
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

# What the client library retries by default (google.pubsub_v1 publisher transport).
RETRYABLE_API_ERRORS: tuple[type[Exception], ...] = (
    api_exceptions.Aborted,
    api_exceptions.Cancelled,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.ServiceUnavailable,
    api_exceptions.Unknown,
)


class PubSubUnavailable(Exception):
    """Pub/Sub could not be reached, timed out or refused the request (Google's error: the
    ``__cause__``)."""


@contextmanager
def translate_api_errors(
    what: str, error: Callable[[str], Exception] = PubSubUnavailable
) -> Iterator[None]:
    """The one place Google's API errors become mailpipe's: ``error(f"{what}: {reason}")``."""
    try:
        yield
    except api_exceptions.GoogleAPICallError as exc:
        raise error(f"{what}: {exc.message or exc}") from exc
    except api_exceptions.RetryError as exc:
        raise error(f"{what}: Pub/Sub could not be reached (retries exhausted)") from exc


def emulator_channel(host: str) -> grpc.Channel:
    """An insecure channel to the emulator at ``host`` without message size limits."""
    unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    return grpc.insecure_channel(host, options=unlimited)


def publisher_client(
    emulator_host: str | None,
    *,
    tracing: bool,
    batch_settings: BatchSettings | None = None,
    publisher_options: PublisherOptions | None = None,
) -> pubsub_v1.PublisherClient:
    """A publisher (also the topic admin client): the emulator's if ``emulator_host`` is set.
    ``tracing`` adds the ``<topic> create`` span and the ``googclient_traceparent`` attribute."""
    options = publisher_options or PublisherOptions()
    if tracing:
        options = options._replace(enable_open_telemetry_tracing=True)
    batch = batch_settings or BatchSettings()
    if emulator_host:
        transport = PublisherGrpcTransport(channel=emulator_channel(emulator_host))
        return pubsub_v1.PublisherClient(batch, options, transport=transport)
    return pubsub_v1.PublisherClient(batch, options)


def subscriber_client(
    emulator_host: str | None,
    *,
    tracing: bool,
    subscriber_options: SubscriberOptions | None = None,
) -> pubsub_v1.SubscriberClient:
    """A subscriber (also the subscription admin client): the emulator's if ``emulator_host``.
    ``tracing`` adds streaming pull's ``<subscription> subscribe`` span."""
    options = subscriber_options or SubscriberOptions()
    if tracing:
        options = options._replace(enable_open_telemetry_tracing=True)
    if emulator_host:
        transport = SubscriberGrpcTransport(channel=emulator_channel(emulator_host))
        return pubsub_v1.SubscriberClient(options, transport=transport)
    return pubsub_v1.SubscriberClient(options)
