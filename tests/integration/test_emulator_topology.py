"""The declared topology, applied to the real Pub/Sub emulator, reads back as declared."""

from __future__ import annotations

import dataclasses
import logging

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


def _without_push_retry_policies(topology: Topology) -> Topology:
    """What the emulator gets: the declaration, its push subscriptions without a retry policy."""
    for key, sub in topology.subscriptions.items():
        if sub.delivery == "push":
            topology = with_subscription(topology, key, retry_policy=None)
    return topology


def test_applied_topology_equals_the_declaration(declared, pubsub_emulator, pubsub_project):
    apply_topology(
        declared,
        project=pubsub_project,
        push_endpoints=_push_endpoints(declared),
        emulator_host=pubsub_emulator.host,
    )
    assert read_topology(declared, project=pubsub_project) == (
        _without_push_retry_policies(declared)
    )


def test_push_subscriptions_get_no_retry_policy_on_the_emulator_and_it_is_said_once(
    declared, pubsub_project, caplog
):
    """With a retry policy the emulator stops re-pushing a failing message (local-vs-gcp 4b)."""
    pushed = [s for s in declared.subscriptions.values() if s.delivery == "push"]
    assert pushed and all(s.retry_policy is not None for s in pushed)  # as in production
    caplog.set_level(logging.WARNING, logger="emulator.pubsub_topology")

    endpoints = _push_endpoints(declared)
    sync_topology(declared, project=pubsub_project, push_endpoints=endpoints)
    again = sync_topology(declared, project=pubsub_project, push_endpoints=endpoints)

    live = read_topology(declared, project=pubsub_project)
    for sub in pushed:
        assert live.subscriptions[sub.key].delivery == "push"
        assert live.subscriptions[sub.key].retry_policy is None, sub.key
    assert again == []
    [told] = [r.getMessage() for r in caplog.records if "retry policy" in r.getMessage()]
    assert all(sub.name in told for sub in pushed) and "row 4b" in told
    # Pulled (no endpoint: the local pull worker), the declared policy is applied as it is.
    sync_topology(declared, project=pubsub_project)
    live = read_topology(declared, project=pubsub_project)
    assert live.delivery_subscription == dataclasses.replace(
        declared.delivery_subscription, delivery="pull"
    )


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
    # Pushed: without the retry policy (row 4b of docs/local-vs-gcp.md), which is cleared.
    assert read_topology(changed, project=pubsub_project).delivery_subscription == (
        with_subscription(
            changed, "delivery", push_path="/push", retry_policy=None
        ).delivery_subscription
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
