"""A bad start names every bad variable in one ConfigError: the shared ones (read in
mailpipe/config.py) and the service's own (publisher/config.py, subscriber/config.py) together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from mailpipe.config import ConfigError
from publisher.config import PublisherConfig
from subscriber.config import SubscriberConfig

LOCAL = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}
SHARED_BAD = {
    "MAILPIPE_TRACES": "stdout",
    "MAILPIPE_RECORD": "postgres://db",
    "MAILPIPE_HTTP_READ_TIMEOUT": "soon",
    "PORT": "0",
}


@pytest.mark.parametrize(
    ("read", "own_bad"),
    [
        (
            PublisherConfig.from_env,
            {"MAILPIPE_PUBLISH_TIMEOUT": "fast", "MAILPIPE_ALLOWED_SENDER_DOMAINS": "*.example"},
        ),
        (
            SubscriberConfig.from_env,
            {"MAILPIPE_SMTP_PORT": "70000", "MAILPIPE_PUSH_AUTH": "maybe"},
        ),
    ],
    ids=["publisher", "subscriber"],
)
def test_one_error_names_the_shared_and_the_service_variables(
    read: Callable[[Mapping[str, str]], Any], own_bad: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        read({**LOCAL, **SHARED_BAD, **own_bad})

    assert set(raised.value.problems) == set(SHARED_BAD) | set(own_bad)
    message = str(raised.value)
    assert f"({len(SHARED_BAD) + len(own_bad)} problem(s))" in message
    assert all(f"  {name}: " in message for name in (*SHARED_BAD, *own_bad))
