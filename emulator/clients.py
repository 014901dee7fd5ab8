"""google-cloud-pubsub clients bound to an emulator host given explicitly (not via the environment).

The channel lifts gRPC's 4 MiB receive limit: with the library's own emulator channel, messages over
about 4 MiB fail on unary pull and vanish silently on streaming pull (``docs/local-vs-gcp.md``).
"""

from __future__ import annotations

import os

import google.cloud.pubsub_v1 as pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from emulator.errors import EmulatorError
from emulator.process import PUBSUB_HOST_VAR
from mailpipe.grpc_channel import emulator_channel


def resolve_pubsub_host(emulator_host: str | None) -> str:
    """``emulator_host`` or ``$PUBSUB_EMULATOR_HOST``; never falls through to the real service."""
    host = emulator_host or os.environ.get(PUBSUB_HOST_VAR, "").strip()
    if not host:
        raise EmulatorError(
            f"no Pub/Sub emulator host: pass emulator_host or set {PUBSUB_HOST_VAR} "
            "(this code never talks to the real Pub/Sub service)"
        )
    return host


def publisher_client(
    emulator_host: str | None = None,
    *,
    publisher_options: pubsub_v1.types.PublisherOptions | None = None,
    batch_settings: pubsub_v1.types.BatchSettings | None = None,
) -> pubsub_v1.PublisherClient:
    """A publisher (also the topic admin client) talking to the emulator."""
    transport = PublisherGrpcTransport(channel=emulator_channel(resolve_pubsub_host(emulator_host)))
    return pubsub_v1.PublisherClient(
        batch_settings or (), publisher_options or (), transport=transport
    )


def subscriber_client(
    emulator_host: str | None = None,
    *,
    subscriber_options: pubsub_v1.types.SubscriberOptions | None = None,
) -> pubsub_v1.SubscriberClient:
    """A subscriber (also the subscription admin client) talking to the emulator."""
    transport = SubscriberGrpcTransport(
        channel=emulator_channel(resolve_pubsub_host(emulator_host))
    )
    return pubsub_v1.SubscriberClient(subscriber_options or (), transport=transport)
