"""Apply the declared topology (``mailpipe/topology.json``) to the Pub/Sub emulator; read it back.

Applying is idempotent: what is missing is created, what differs is updated in place (ack deadline,
retry policy, dead-letter policy, push config, retention), and a second run changes nothing. A
setting the declaration leaves out (``None``) is left to the service's default, as in Terraform.
A subscription whose topic changed is deleted and recreated (the emulator keeps nothing anyway).

Push subscriptions need an endpoint URL that only the caller knows (``push_endpoints`` maps the
subscription key, e.g. ``"delivery"``, to a full URL). A subscription declared ``push`` without an
endpoint is created as pull: that is how the local streaming-pull worker consumes it.

Only the emulator is ever addressed: the host comes from ``emulator_host`` or
``$PUBSUB_EMULATOR_HOST``, and without either these functions refuse to run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc
from google.protobuf import field_mask_pb2
from google.pubsub_v1 import types as pubsub_types

from emulator.clients import publisher_client, resolve_pubsub_host, subscriber_client
from emulator.errors import TopologyApplyError
from mailpipe.pubsub import translate_api_errors
from mailpipe.topology import (
    DeadLetterPolicy,
    RetryPolicy,
    Subscription,
    Topic,
    Topology,
    duration_seconds,
)

log = logging.getLogger(__name__)

# A generous bound for admin calls: the emulator answers in milliseconds; never hang.
_RPC_TIMEOUT = 30.0


@dataclass(frozen=True)
class TopologyChange:
    """One change made by :func:`sync_topology` (for CLI output and logs)."""

    action: Literal["created", "updated", "recreated"]
    kind: Literal["topic", "subscription"]
    name: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.action} {self.kind} {self.name}{detail}"


def _translated(what: str) -> AbstractContextManager[None]:
    """Google's API errors become :class:`TopologyApplyError` (:mod:`publisher.pubsub` maps)."""
    return translate_api_errors(what, TopologyApplyError)


def _duration(value: str | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=duration_seconds(value))


def _duration_text(value: timedelta | None) -> str | None:
    if value is None or not value:
        return None
    return f"{int(value.total_seconds())}s"


def _desired_topic(topic: Topic, project: str) -> pubsub_types.Topic:
    desired = pubsub_types.Topic(name=f"projects/{project}/topics/{topic.name}")
    if topic.message_retention_duration is not None:
        desired.message_retention_duration = _duration(topic.message_retention_duration)
    return desired


def _desired_subscription(
    topology: Topology, sub: Subscription, project: str, push_endpoint: str | None
) -> pubsub_types.Subscription:
    desired = pubsub_types.Subscription(
        name=f"projects/{project}/subscriptions/{sub.name}",
        topic=f"projects/{project}/topics/{topology.topics[sub.topic].name}",
        ack_deadline_seconds=sub.ack_deadline_seconds,
    )
    if sub.delivery == "push" and push_endpoint:
        desired.push_config = pubsub_types.PushConfig(push_endpoint=push_endpoint)
    if sub.message_retention_duration is not None:
        desired.message_retention_duration = _duration(sub.message_retention_duration)
    if sub.retry_policy is not None:
        desired.retry_policy = pubsub_types.RetryPolicy(
            minimum_backoff=_duration(sub.retry_policy.minimum_backoff),
            maximum_backoff=_duration(sub.retry_policy.maximum_backoff),
        )
    if sub.dead_letter is not None:
        dlq_topic = topology.topics[sub.dead_letter.topic].name
        desired.dead_letter_policy = pubsub_types.DeadLetterPolicy(
            dead_letter_topic=f"projects/{project}/topics/{dlq_topic}",
            max_delivery_attempts=sub.dead_letter.max_delivery_attempts,
        )
    return desired


def _differing_subscription_fields(
    sub: Subscription, desired: pubsub_types.Subscription, live: pubsub_types.Subscription
) -> list[str]:
    paths = []
    if live.ack_deadline_seconds != desired.ack_deadline_seconds:
        paths.append("ack_deadline_seconds")
    if live.push_config.push_endpoint != desired.push_config.push_endpoint:
        paths.append("push_config")
    if sub.message_retention_duration is not None and (
        live.message_retention_duration != desired.message_retention_duration
    ):
        paths.append("message_retention_duration")
    if live.retry_policy != desired.retry_policy:
        paths.append("retry_policy")
    if live.dead_letter_policy != desired.dead_letter_policy:
        paths.append("dead_letter_policy")
    return paths


def sync_topology(
    topology: Topology,
    *,
    project: str,
    push_endpoints: Mapping[str, str] | None = None,
    emulator_host: str | None = None,
) -> list[TopologyChange]:
    """Make the emulator's resources match ``topology``; return the changes made (maybe none)."""
    host = resolve_pubsub_host(emulator_host)
    endpoints = dict(push_endpoints or {})
    unknown = set(endpoints) - set(topology.subscriptions)
    if unknown:
        raise TopologyApplyError(f"push_endpoints names unknown subscriptions: {sorted(unknown)}")
    changes: list[TopologyChange] = []
    publisher = publisher_client(host)
    subscriber = subscriber_client(host)
    try:
        for topic in topology.topics.values():
            changes.extend(_sync_topic(publisher, topic, project))
        for sub in topology.subscriptions.values():
            desired = _desired_subscription(topology, sub, project, endpoints.get(sub.key))
            changes.extend(_sync_subscription(subscriber, sub, desired))
    finally:
        subscriber.close()
        publisher.transport.close()
    for change in changes:
        log.info("%s", change)
    return changes


def _sync_topic(
    publisher: pubsub_v1.PublisherClient, topic: Topic, project: str
) -> list[TopologyChange]:
    desired = _desired_topic(topic, project)
    with _translated(f"reading topic {desired.name}"):
        try:
            live = publisher.get_topic(topic=desired.name, timeout=_RPC_TIMEOUT)
        except gexc.NotFound:
            live = None
    if live is None:
        with _translated(f"creating topic {desired.name}"):
            publisher.create_topic(request=desired, timeout=_RPC_TIMEOUT)
        return [TopologyChange("created", "topic", topic.name)]
    if (
        topic.message_retention_duration is not None
        and live.message_retention_duration != desired.message_retention_duration
    ):
        mask = field_mask_pb2.FieldMask(paths=["message_retention_duration"])
        with _translated(f"updating topic {desired.name}"):
            publisher.update_topic(
                request={"topic": desired, "update_mask": mask}, timeout=_RPC_TIMEOUT
            )
        return [TopologyChange("updated", "topic", topic.name, ("message_retention_duration",))]
    return []


def _sync_subscription(
    subscriber: pubsub_v1.SubscriberClient, sub: Subscription, desired: pubsub_types.Subscription
) -> list[TopologyChange]:
    with _translated(f"reading subscription {desired.name}"):
        try:
            live = subscriber.get_subscription(subscription=desired.name, timeout=_RPC_TIMEOUT)
        except gexc.NotFound:
            live = None
    action: Literal["created", "recreated"] = "created"
    if live is not None and live.topic != desired.topic:
        # The topic of a subscription cannot be changed in place.
        with _translated(f"deleting subscription {desired.name} to move it to {desired.topic}"):
            subscriber.delete_subscription(subscription=desired.name, timeout=_RPC_TIMEOUT)
        live, action = None, "recreated"
    if live is None:
        with _translated(f"creating subscription {desired.name}"):
            subscriber.create_subscription(request=desired, timeout=_RPC_TIMEOUT)
        return [TopologyChange(action, "subscription", sub.name)]
    paths = _differing_subscription_fields(sub, desired, live)
    if not paths:
        return []
    mask = field_mask_pb2.FieldMask(paths=paths)
    with _translated(f"updating subscription {desired.name} ({', '.join(paths)})"):
        subscriber.update_subscription(
            request={"subscription": desired, "update_mask": mask}, timeout=_RPC_TIMEOUT
        )
    return [TopologyChange("updated", "subscription", sub.name, tuple(paths))]


def apply_topology(
    topology: Topology,
    *,
    project: str,
    push_endpoints: Mapping[str, str] | None = None,
    emulator_host: str | None = None,
) -> None:
    """Create or update the emulator's topics and subscriptions so they match ``topology``.

    ``push_endpoints`` maps a subscription key to its full push URL; a ``push`` subscription
    without one is created as pull. Raises :class:`TopologyApplyError` if the emulator refuses.
    """
    sync_topology(
        topology, project=project, push_endpoints=push_endpoints, emulator_host=emulator_host
    )


def read_topology(
    topology: Topology, *, project: str, emulator_host: str | None = None
) -> Topology:
    """Read the live resources named by ``topology`` back into a :class:`Topology`.

    Keys come from ``topology``; every setting comes from the emulator. ``push_path`` is read
    from the push endpoint's URL; a pull subscription has none, so the declared one is kept.
    Raises :class:`TopologyApplyError` if a resource is missing.
    """
    host = resolve_pubsub_host(emulator_host)
    publisher = publisher_client(host)
    subscriber = subscriber_client(host)
    topic_keys = {
        f"projects/{project}/topics/{topic.name}": key for key, topic in topology.topics.items()
    }
    try:
        topics = {}
        for key, topic in topology.topics.items():
            name = f"projects/{project}/topics/{topic.name}"
            with _translated(f"reading topic {name}"):
                live_topic = publisher.get_topic(topic=name, timeout=_RPC_TIMEOUT)
            topics[key] = Topic(
                key=key,
                name=live_topic.name.rsplit("/", 1)[1],
                message_retention_duration=_duration_text(live_topic.message_retention_duration),
            )
        subscriptions = {}
        for key, sub in topology.subscriptions.items():
            name = f"projects/{project}/subscriptions/{sub.name}"
            with _translated(f"reading subscription {name}"):
                live = subscriber.get_subscription(subscription=name, timeout=_RPC_TIMEOUT)
            subscriptions[key] = _subscription_from_live(live, key, sub, topic_keys)
    finally:
        subscriber.close()
        publisher.transport.close()
    return Topology(topics=topics, subscriptions=subscriptions)


def _subscription_from_live(
    live: pubsub_types.Subscription,
    key: str,
    declared: Subscription,
    topic_keys: Mapping[str, str],
) -> Subscription:
    endpoint = live.push_config.push_endpoint
    retry = None
    if "retry_policy" in live:
        retry = RetryPolicy(
            minimum_backoff=_duration_text(live.retry_policy.minimum_backoff) or "0s",
            maximum_backoff=_duration_text(live.retry_policy.maximum_backoff) or "0s",
        )
    dead_letter = None
    if live.dead_letter_policy.dead_letter_topic:
        dead_letter = DeadLetterPolicy(
            topic=topic_keys.get(
                live.dead_letter_policy.dead_letter_topic, live.dead_letter_policy.dead_letter_topic
            ),
            max_delivery_attempts=live.dead_letter_policy.max_delivery_attempts,
        )
    return dataclasses.replace(
        declared,
        key=key,
        name=live.name.rsplit("/", 1)[1],
        topic=topic_keys.get(live.topic, live.topic),
        delivery="push" if endpoint else "pull",
        ack_deadline_seconds=live.ack_deadline_seconds,
        push_path=(urlsplit(endpoint).path or "/") if endpoint else declared.push_path,
        message_retention_duration=_duration_text(live.message_retention_duration),
        retry_policy=retry,
        dead_letter=dead_letter,
    )


def delete_topology(topology: Topology, *, project: str, emulator_host: str | None = None) -> None:
    """Delete the topology's subscriptions and topics from the emulator (missing ones are fine)."""
    host = resolve_pubsub_host(emulator_host)
    publisher = publisher_client(host)
    subscriber = subscriber_client(host)
    try:
        for sub in topology.subscriptions.values():
            name = f"projects/{project}/subscriptions/{sub.name}"
            with _translated(f"deleting subscription {name}"), suppress(gexc.NotFound):
                subscriber.delete_subscription(subscription=name, timeout=_RPC_TIMEOUT)
        for topic in topology.topics.values():
            name = f"projects/{project}/topics/{topic.name}"
            with _translated(f"deleting topic {name}"), suppress(gexc.NotFound):
                publisher.delete_topic(topic=name, timeout=_RPC_TIMEOUT)
    finally:
        subscriber.close()
        publisher.transport.close()
