"""The subscriber's time limits nest: pool wait < delivery timeout < lease, or it does not start."""

from __future__ import annotations

import pytest

from mailpipe.config import ConfigError
from mailpipe.topology import load_topology
from subscriber.config import SubscriberConfig
from tests.fixtures.topology import with_subscription

LOCAL = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}


def test_the_defaults_nest_with_the_declared_topology() -> None:
    config = SubscriberConfig.from_env(LOCAL)
    ack_deadline = load_topology().delivery_subscription.ack_deadline_seconds

    assert config.delivery_lease_seconds == ack_deadline == 120
    assert config.delivery_timeout == 60
    assert config.smtp.pool_wait == 10
    assert config.smtp.pool_wait < config.delivery_timeout < config.delivery_lease_seconds


@pytest.mark.parametrize(
    ("ack_deadline", "timeout", "wait"), [(10, 5, 2.5), (30, 15, 7.5), (600, 60, 10)]
)
def test_defaults_follow_a_shorter_ack_deadline(
    ack_deadline: int, timeout: float, wait: float
) -> None:
    topology = with_subscription(load_topology(), "delivery", ack_deadline_seconds=ack_deadline)
    config = SubscriberConfig.from_env(LOCAL, topology)

    assert (config.delivery_lease_seconds, config.delivery_timeout) == (ack_deadline, timeout)
    assert config.smtp.pool_wait == wait


def test_the_defaults_follow_an_explicit_lease() -> None:
    config = SubscriberConfig.from_env({**LOCAL, "MAILPIPE_DELIVERY_LEASE_SECONDS": "8"})
    assert (config.delivery_timeout, config.smtp.pool_wait) == (4, 2)


def test_explicit_values_that_nest_are_kept() -> None:
    config = SubscriberConfig.from_env(
        {**LOCAL, "MAILPIPE_DELIVERY_TIMEOUT": "90", "MAILPIPE_SMTP_POOL_WAIT": "0"}
    )
    assert (config.delivery_timeout, config.smtp.pool_wait) == (90, 0)


@pytest.mark.parametrize(
    ("env", "bad"),
    [
        ({"MAILPIPE_DELIVERY_TIMEOUT": "120"}, {"MAILPIPE_DELIVERY_TIMEOUT"}),
        ({"MAILPIPE_DELIVERY_TIMEOUT": "200"}, {"MAILPIPE_DELIVERY_TIMEOUT"}),
        ({"MAILPIPE_SMTP_POOL_WAIT": "60"}, {"MAILPIPE_SMTP_POOL_WAIT"}),
        (
            {"MAILPIPE_DELIVERY_LEASE_SECONDS": "30", "MAILPIPE_DELIVERY_TIMEOUT": "45"},
            {"MAILPIPE_DELIVERY_TIMEOUT"},
        ),
        (
            {"MAILPIPE_DELIVERY_TIMEOUT": "130", "MAILPIPE_SMTP_POOL_WAIT": "140"},
            {"MAILPIPE_DELIVERY_TIMEOUT", "MAILPIPE_SMTP_POOL_WAIT"},
        ),
    ],
)
def test_limits_that_do_not_nest_fail_fast_naming_each_variable(
    env: dict[str, str], bad: set[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        SubscriberConfig.from_env({**LOCAL, **env})

    assert set(raised.value.problems) == bad
    text = str(raised.value)
    if "MAILPIPE_DELIVERY_TIMEOUT" in bad:
        assert "shorter than the delivery lease" in text
        assert "MAILPIPE_DELIVERY_LEASE_SECONDS" in text
    if "MAILPIPE_SMTP_POOL_WAIT" in bad:
        assert "shorter than MAILPIPE_DELIVERY_TIMEOUT" in text


def test_a_malformed_value_is_reported_once() -> None:
    with pytest.raises(ConfigError) as raised:
        SubscriberConfig.from_env({**LOCAL, "MAILPIPE_SMTP_POOL_WAIT": "soon"})
    assert raised.value.problems == {"MAILPIPE_SMTP_POOL_WAIT": "must be a number, got 'soon'"}
