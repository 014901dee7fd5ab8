"""google-cloud-pubsub clients bound to an emulator host given explicitly (not via the environment).

Built by :mod:`mailpipe.pubsub` like the services' clients (its channel lifts gRPC's 4 MiB receive
limit); this module only refuses to fall through to the real service when no host is known.
"""

from __future__ import annotations

import os

import google.cloud.pubsub_v1 as pubsub_v1

from emulator.errors import EmulatorError
from emulator.process import PUBSUB_HOST_VAR
from mailpipe import pubsub


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
    return pubsub.publisher_client(
        resolve_pubsub_host(emulator_host),
        tracing=False,
        publisher_options=publisher_options,
        batch_settings=batch_settings,
    )


def subscriber_client(
    emulator_host: str | None = None,
    *,
    subscriber_options: pubsub_v1.types.SubscriberOptions | None = None,
) -> pubsub_v1.SubscriberClient:
    """A subscriber (also the subscription admin client) talking to the emulator."""
    return pubsub.subscriber_client(
        resolve_pubsub_host(emulator_host), tracing=False, subscriber_options=subscriber_options
    )
