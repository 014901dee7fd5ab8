"""The topology declaration (mailpipe/topology.json) and how the emulator side reads it.

No servers here: the live round trip is in tests/integration/test_emulator_topology.py.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from google.pubsub_v1 import types as pubsub_types

from emulator import EmulatorError, TopologyApplyError, sync_topology
from emulator.pubsub_topology import (
    _desired_subscription,
    _differing_subscription_fields,
    _subscription_from_live,
)
from mailpipe.topology import (
    DeadLetterPolicy,
    RetryPolicy,
    TopologyError,
    default_topology_path,
    load_topology,
    parse_topology,
)
from tests.fixtures.topology import with_suffix

PROJECT = "mailpipe-local"


@pytest.fixture
def document() -> dict:
    return json.loads(default_topology_path().read_text(encoding="utf-8"))


def test_packaged_declaration_is_valid_and_has_the_pipeline_resources():
    topology = load_topology()
    assert topology.mail_topic.name == "mailpipe-mail"
    assert topology.delivery_subscription.topic == "mail"
    assert topology.delivery_subscription.dead_letter is not None
    assert topology.delivery_subscription.dead_letter.topic == "dead_letter"
    assert topology.dead_letter_subscription.topic == "dead_letter"


def test_with_suffix_renames_every_resource_and_keeps_the_links():
    topology = with_suffix(load_topology(), "abc123")
    names = [t.name for t in topology.topics.values()]
    names += [s.name for s in topology.subscriptions.values()]
    assert all(name.endswith("-abc123") for name in names)
    assert topology.delivery_subscription.topic == "mail"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("subscriptions", "delivery", "ack_deadline_seconds"), 5, "ack_deadline_seconds"),
        (("subscriptions", "delivery", "dead_letter", "max_delivery_attempts"), 4, "5..100"),
        (("subscriptions", "delivery", "dead_letter", "topic"), "nope", "dead_letter.topic"),
        (("subscriptions", "delivery", "topic"), "nope", "is not a key of topics"),
        (("subscriptions", "delivery", "retry_policy", "minimum_backoff"), "700s", "<= 600s"),
        (("subscriptions", "delivery", "retry_policy", "maximum_backoff"), "10m", "'600s'"),
        (("topics", "mail", "name"), "goog-mail", "not a valid Pub/Sub id"),
    ],
)
def test_declaration_outside_pubsub_limits_is_rejected(document, path, value, message):
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(TopologyError, match=message.replace(".", r"\.")):
        parse_topology(document)


def test_every_problem_is_reported_at_once(document):
    document["subscriptions"]["delivery"]["ack_deadline_seconds"] = 601
    document["subscriptions"]["dead_letter"]["name"] = "x"
    with pytest.raises(TopologyError) as info:
        parse_topology(document)
    assert "ack_deadline_seconds" in str(info.value)
    assert "'x' is not a valid Pub/Sub id" in str(info.value)


def test_unreadable_declaration_names_the_file(tmp_path: Path):
    broken = tmp_path / "topology.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(TopologyError, match=str(broken)):
        load_topology(broken)


def test_desired_push_subscription_carries_every_declared_setting_but_the_retry_policy():
    topology = load_topology()
    sub = topology.delivery_subscription
    desired = _desired_subscription(topology, sub, PROJECT, "http://127.0.0.1:8080/")
    assert desired.name == f"projects/{PROJECT}/subscriptions/mailpipe-delivery"
    assert desired.topic == f"projects/{PROJECT}/topics/mailpipe-mail"
    assert desired.push_config.push_endpoint == "http://127.0.0.1:8080/"
    assert desired.ack_deadline_seconds == sub.ack_deadline_seconds
    # Left off on the emulator, which stops re-pushing with one (docs/local-vs-gcp.md, row 4b).
    assert sub.retry_policy is not None and "retry_policy" not in desired
    assert desired.dead_letter_policy.dead_letter_topic == (
        f"projects/{PROJECT}/topics/mailpipe-mail-dead-letter"
    )
    assert desired.dead_letter_policy.max_delivery_attempts == 10


def test_push_subscription_without_endpoint_becomes_pull_with_its_retry_policy():
    topology = load_topology()
    desired = _desired_subscription(topology, topology.delivery_subscription, PROJECT, None)
    assert desired.push_config.push_endpoint == ""
    assert desired.retry_policy.minimum_backoff == timedelta(seconds=10)
    assert desired.retry_policy.maximum_backoff == timedelta(seconds=600)


def test_only_differing_fields_are_updated():
    topology = load_topology()
    sub = topology.delivery_subscription
    live = _desired_subscription(topology, sub, PROJECT, None)
    assert _differing_subscription_fields(sub, live, live) == []

    changed = dataclasses.replace(
        sub, ack_deadline_seconds=30, retry_policy=RetryPolicy("1s", "2s"), dead_letter=None
    )
    desired = _desired_subscription(topology, changed, PROJECT, "http://127.0.0.1:1/")
    assert _differing_subscription_fields(changed, desired, live) == [
        "ack_deadline_seconds",
        "push_config",
        "retry_policy",
        "dead_letter_policy",
    ]


def test_live_subscription_reads_back_as_its_declaration():
    topology = load_topology()
    topic_keys = {f"projects/{PROJECT}/topics/{t.name}": k for k, t in topology.topics.items()}
    for key, sub in topology.subscriptions.items():
        endpoint = f"http://127.0.0.1:8080{sub.push_path}" if sub.delivery == "push" else None
        live = _desired_subscription(topology, sub, PROJECT, endpoint)
        # A push subscription goes to the emulator without its retry policy (row 4b).
        expected = dataclasses.replace(sub, retry_policy=None) if endpoint else sub
        assert _subscription_from_live(live, key, sub, topic_keys) == expected


def test_read_back_reports_live_values_not_declared_ones():
    topology = load_topology()
    sub = topology.delivery_subscription
    live = pubsub_types.Subscription(
        name=f"projects/{PROJECT}/subscriptions/{sub.name}",
        topic=f"projects/{PROJECT}/topics/mailpipe-mail",
        ack_deadline_seconds=42,
        dead_letter_policy=pubsub_types.DeadLetterPolicy(
            dead_letter_topic=f"projects/{PROJECT}/topics/mailpipe-mail-dead-letter",
            max_delivery_attempts=7,
        ),
    )
    topic_keys = {f"projects/{PROJECT}/topics/{t.name}": k for k, t in topology.topics.items()}
    read = _subscription_from_live(live, "delivery", sub, topic_keys)
    assert read.delivery == "pull"
    assert read.ack_deadline_seconds == 42
    assert read.retry_policy is None
    assert read.message_retention_duration is None
    assert read.dead_letter == DeadLetterPolicy("dead_letter", 7)


def test_applying_refuses_without_an_emulator_host(monkeypatch):
    # Safety: with no emulator named, never fall through to the real Pub/Sub service.
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    with pytest.raises(EmulatorError, match="PUBSUB_EMULATOR_HOST"):
        sync_topology(load_topology(), project=PROJECT)


def test_push_endpoint_for_an_unknown_subscription_is_an_error():
    with pytest.raises(TopologyApplyError, match="unknown subscriptions"):
        sync_topology(
            load_topology(),
            project=PROJECT,
            push_endpoints={"nope": "http://127.0.0.1:1/"},
            emulator_host="127.0.0.1:1",
        )
