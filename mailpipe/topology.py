"""The Pub/Sub topology, declared once in ``topology.json``: Terraform reads the same file
(``terraform/topology.tf``), the emulator applies it (:func:`emulator.apply_topology`).

Errors::

    TopologyError   the declaration is malformed or outside Pub/Sub's documented limits
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from mailpipe.durations import DurationError, parse_duration

# Pub/Sub resource IDs: start with a letter, 3..255 of [A-Za-z0-9-_.~+%], not "goog"-prefixed.
_RESOURCE_ID = re.compile(r"^(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")

DeliveryMode = Literal["push", "pull"]


class TopologyError(ValueError):
    """The topology declaration is malformed or outside Pub/Sub's limits."""


def duration_seconds(value: str) -> int:
    """A duration of the declaration, such as ``"600s"``, in whole seconds.

    Terraform hands these strings to Pub/Sub as written (protobuf-JSON durations): only whole
    seconds in that exact spelling are taken."""
    try:
        seconds = int(parse_duration(value, units=("s",), whole_seconds=True))
    except DurationError as exc:
        raise TopologyError(f"{exc} (whole seconds as Pub/Sub spells them: '600s')") from exc
    if value != f"{seconds}s":  # spaces, "600S", "0600s": not Pub/Sub's spelling
        raise TopologyError(f"{value!r} is not a duration as Pub/Sub spells them: use '{seconds}s'")
    return seconds


@dataclass(frozen=True)
class Topic:
    key: str
    name: str
    message_retention_duration: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    minimum_backoff: str
    maximum_backoff: str


@dataclass(frozen=True)
class DeadLetterPolicy:
    topic: str  # the key (not the name) of the dead-letter topic in ``topics``
    max_delivery_attempts: int


@dataclass(frozen=True)
class Subscription:
    key: str
    name: str
    topic: str  # the key (not the name) of the topic in ``topics``
    delivery: DeliveryMode
    ack_deadline_seconds: int
    push_path: str = "/"
    message_retention_duration: str | None = None
    retry_policy: RetryPolicy | None = None
    dead_letter: DeadLetterPolicy | None = None


@dataclass(frozen=True)
class Topology:
    topics: dict[str, Topic]
    subscriptions: dict[str, Subscription]

    @property
    def mail_topic(self) -> Topic:
        return self.topics["mail"]

    @property
    def dead_letter_topic(self) -> Topic:
        return self.topics["dead_letter"]

    @property
    def events_topic(self) -> Topic:
        return self.topics["events"]

    @property
    def delivery_subscription(self) -> Subscription:
        return self.subscriptions["delivery"]

    @property
    def dead_letter_subscription(self) -> Subscription:  # dead-lettered mails, to inspect, replay
        return self.subscriptions["dead_letter"]

    @property
    def dead_letter_record_subscription(self) -> Subscription:  # marks them in the record
        return self.subscriptions["dead_letter_record"]

    def validate(self) -> None:
        problems: list[str] = []
        for required in ("mail", "dead_letter", "events"):
            if required not in self.topics:
                problems.append(f"topics.{required} is missing")
        for required in ("delivery", "dead_letter", "dead_letter_record"):
            if required not in self.subscriptions:
                problems.append(f"subscriptions.{required} is missing")
        for topic in self.topics.values():
            if not _RESOURCE_ID.match(topic.name):
                problems.append(f"topics.{topic.key}.name {topic.name!r} is not a valid Pub/Sub id")
        for sub in self.subscriptions.values():
            where = f"subscriptions.{sub.key}"
            if not _RESOURCE_ID.match(sub.name):
                problems.append(f"{where}.name {sub.name!r} is not a valid Pub/Sub id")
            if sub.topic not in self.topics:
                problems.append(f"{where}.topic {sub.topic!r} is not a key of topics")
            if sub.delivery not in ("push", "pull"):
                problems.append(f"{where}.delivery must be push or pull")
            if not 10 <= sub.ack_deadline_seconds <= 600:
                problems.append(f"{where}.ack_deadline_seconds must be 10..600 (Pub/Sub's limits)")
            if sub.retry_policy is not None:
                try:
                    low = duration_seconds(sub.retry_policy.minimum_backoff)
                    high = duration_seconds(sub.retry_policy.maximum_backoff)
                except TopologyError as exc:
                    problems.append(f"{where}.retry_policy: {exc}")
                else:
                    if not (0 <= low <= high <= 600):
                        problems.append(
                            f"{where}.retry_policy must satisfy 0 <= min <= max <= 600s"
                        )
            if sub.dead_letter is not None:
                if sub.dead_letter.topic not in self.topics:
                    problems.append(f"{where}.dead_letter.topic is not a key of topics")
                elif sub.dead_letter.topic == sub.topic:
                    problems.append(f"{where}.dead_letter.topic must differ from its own topic")
                if not 5 <= sub.dead_letter.max_delivery_attempts <= 100:
                    problems.append(f"{where}.dead_letter.max_delivery_attempts must be 5..100")
        if problems:
            raise TopologyError("invalid topology: " + "; ".join(problems))


def parse_topology(document: dict[str, Any]) -> Topology:
    """Build a validated :class:`Topology` from the JSON document."""
    try:
        topics = {
            key: Topic(key, spec["name"], spec.get("message_retention_duration"))
            for key, spec in document["topics"].items()
        }
        subscriptions = {}
        for key, spec in document["subscriptions"].items():
            retry = spec.get("retry_policy")
            dead_letter = spec.get("dead_letter")
            subscriptions[key] = Subscription(
                key=key,
                name=spec["name"],
                topic=spec["topic"],
                delivery=spec.get("delivery", "pull"),
                ack_deadline_seconds=int(spec.get("ack_deadline_seconds", 10)),
                push_path=spec.get("push_path", "/"),
                message_retention_duration=spec.get("message_retention_duration"),
                retry_policy=RetryPolicy(**retry) if retry else None,
                dead_letter=DeadLetterPolicy(**dead_letter) if dead_letter else None,
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise TopologyError(f"malformed topology declaration: {exc!r}") from exc
    topology = Topology(topics=topics, subscriptions=subscriptions)
    topology.validate()
    return topology


def default_topology_path() -> Path:
    """Path of the packaged declaration (``mailpipe/topology.json``)."""
    return Path(str(resources.files("mailpipe").joinpath("topology.json")))


def load_topology(path: Path | None = None) -> Topology:
    """Read and validate the declaration (the packaged one by default)."""
    source = path or default_topology_path()
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TopologyError(f"cannot read topology from {source}: {exc}") from exc
    return parse_topology(document)
