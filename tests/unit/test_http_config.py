"""MAILPIPE_HTTP_READ_TIMEOUT and MAILPIPE_HTTP_KEEPALIVE_TIMEOUT: defaults, and every bad value
reported at once (both services read them)."""

from __future__ import annotations

import pytest

from mailpipe.config import ConfigError, HttpConfig
from mailpipe.serving import worker_class
from publisher.config import PublisherConfig
from subscriber.config import SubscriberConfig

LOCAL = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}


@pytest.mark.parametrize("read", [PublisherConfig.from_env, SubscriberConfig.from_env])
def test_defaults(read: object) -> None:
    config = read(LOCAL)  # type: ignore[operator]
    assert config.http == HttpConfig(read_timeout=30.0, keepalive_timeout=5)


@pytest.mark.parametrize("read", [PublisherConfig.from_env, SubscriberConfig.from_env])
def test_values_are_read(read: object) -> None:
    env = {**LOCAL, "MAILPIPE_HTTP_READ_TIMEOUT": "2.5", "MAILPIPE_HTTP_KEEPALIVE_TIMEOUT": "7"}
    assert read(env).http == HttpConfig(read_timeout=2.5, keepalive_timeout=7)  # type: ignore[operator]


def test_bad_values_are_each_reported() -> None:
    env = {**LOCAL, "MAILPIPE_HTTP_READ_TIMEOUT": "soon", "MAILPIPE_HTTP_KEEPALIVE_TIMEOUT": "0"}
    with pytest.raises(ConfigError) as caught:
        PublisherConfig.from_env(env)
    assert set(caught.value.problems) == {
        "MAILPIPE_HTTP_READ_TIMEOUT",
        "MAILPIPE_HTTP_KEEPALIVE_TIMEOUT",
    }


def test_the_worker_class_carries_the_read_timeout() -> None:
    worker = worker_class(HttpConfig(read_timeout=3.0, keepalive_timeout=5))
    assert worker.read_timeout == 3.0
