"""Pub/Sub clients for every part of mailpipe.

:func:`publisher_client` and :func:`subscriber_client` build google-cloud-pubsub clients the same
way for the publisher, the pull worker, ``mailpipe dlq`` and the emulator helpers:

* against the emulator (``emulator_host`` given) over a channel without gRPC's size limits. With
  ``PUBSUB_EMULATOR_HOST`` alone, google-cloud-pubsub builds ``grpc.insecure_channel(host)``, which
  keeps gRPC's 4 MiB receive limit: messages over about 4 MiB then fail on unary pull and vanish
  silently on streaming pull (docs/local-vs-gcp.md, row 9). Mail with attachments can be 10 MB;
* with the library's own OpenTelemetry tracing (``tracing=True``) where a trace must cross Pub/Sub:
  it writes and reads the ``googclient_traceparent`` attribute (:mod:`mailpipe.attributes`).

Google's API errors are translated in one place, :func:`publisher.pubsub.translate_api_errors` (the
subscriber makes no unary API call: it is pushed to, or pulls by streaming).
"""

from __future__ import annotations

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.cloud.pubsub_v1.types import BatchSettings, PublisherOptions, SubscriberOptions
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport


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

    ``tracing`` turns the library's OpenTelemetry tracing on (the ``<topic> create`` span and the
    ``googclient_traceparent`` attribute); ``publisher_options`` may turn it on as well.
    """
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

    ``tracing`` turns the library's OpenTelemetry tracing on (the ``<subscription> subscribe``
    span of streaming pull, parented on the publisher's ``create`` span).
    """
    options = subscriber_options or SubscriberOptions()
    if tracing:
        options = options._replace(enable_open_telemetry_tracing=True)
    if emulator_host:
        transport = SubscriberGrpcTransport(channel=emulator_channel(emulator_host))
        return pubsub_v1.SubscriberClient(options, transport=transport)
    return pubsub_v1.SubscriberClient(options)
