"""The declared topology, applied to the real Pub/Sub emulator, reads back as declared."""

from __future__ import annotations

import dataclasses

import pytest

from emulator import (
    TopologyApplyError,
    apply_topology,
    delete_topology,
    read_topology,
    sync_topology,
)
from mailpipe.topology import DeadLetterPolicy, RetryPolicy, Topic, Topology
from tests.fixtures.topology import unique_topology, with_subscription

PUSH = "http://127.0.0.1:9/push"  # never called: nothing is published in these tests


@pytest.fixture
def declared(pubsub_emulator, pubsub_project):
    """The packaged declaration under unique names; deleted from the emulator afterwards."""
    topology = unique_topology()
    yield topology
    delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)


def _push_endpoints(topology: Topology) -> dict[str, str]:
    return {
        key: f"http://127.0.0.1:9{sub.push_path}"
        for key, sub in topology.subscriptions.items()
        if sub.delivery == "push"
    }


def test_applied_topology_equals_the_declaration(declared, pubsub_emulator, pubsub_project):
    apply_topology(
        declared,
        project=pubsub_project,
        push_endpoints=_push_endpoints(declared),
        emulator_host=pubsub_emulator.host,
    )
    assert read_topology(declared, project=pubsub_project) == declared


def test_push_declared_without_endpoint_is_applied_as_pull(
    declared, pubsub_emulator, pubsub_project
):
    apply_topology(declared, project=pubsub_project)  # host from PUBSUB_EMULATOR_HOST

    live = read_topology(declared, project=pubsub_project)
    assert live.delivery_subscription.delivery == "pull"
    assert live.delivery_subscription == dataclasses.replace(
        declared.delivery_subscription, delivery="pull"
    )


def test_applying_twice_changes_nothing(declared, pubsub_project):
    endpoints = _push_endpoints(declared)
    first = sync_topology(declared, project=pubsub_project, push_endpoints=endpoints)
    second = sync_topology(declared, project=pubsub_project, push_endpoints=endpoints)

    assert {str(change).split()[0] for change in first} == {"created"}
    assert len(first) == len(declared.topics) + len(declared.subscriptions)
    assert second == []


def test_applying_a_changed_declaration_updates_only_what_differs(declared, pubsub_project):
    sync_topology(declared, project=pubsub_project)
    changed = with_subscription(
        declared,
        "delivery",
        ack_deadline_seconds=30,
        retry_policy=RetryPolicy("1s", "5s"),
        dead_letter=DeadLetterPolicy("dead_letter", 5),
    )

    changes = sync_topology(changed, project=pubsub_project, push_endpoints={"delivery": PUSH})

    assert [str(c) for c in changes] == [
        f"updated subscription {declared.delivery_subscription.name} "
        "(ack_deadline_seconds, push_config, retry_policy, dead_letter_policy)"
    ]
    assert read_topology(changed, project=pubsub_project).delivery_subscription == (
        with_subscription(changed, "delivery", push_path="/push").delivery_subscription
    )


def test_settings_removed_from_the_declaration_are_cleared(declared, pubsub_project):
    sync_topology(declared, project=pubsub_project, push_endpoints={"delivery": PUSH})
    bare = with_subscription(declared, "delivery", retry_policy=None, dead_letter=None)

    sync_topology(bare, project=pubsub_project)  # no endpoint: back to pull

    live = read_topology(bare, project=pubsub_project).delivery_subscription
    assert (live.delivery, live.retry_policy, live.dead_letter) == ("pull", None, None)


def test_emulator_refusal_is_reported_as_a_topology_error(declared, pubsub_project):
    # The emulator validates like production: a name starting with "goog" is rejected.
    bad = Topology(
        topics={
            **declared.topics,
            "mail": Topic(key="mail", name="goog-mail"),
        },
        subscriptions=declared.subscriptions,
    )
    with pytest.raises(TopologyApplyError, match="goog-mail"):
        sync_topology(bad, project=pubsub_project)
