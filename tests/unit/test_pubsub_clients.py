"""mailpipe.pubsub, the one client factory, and publisher.pubsub's one translation of Google's
API errors.

The clients are built for an emulator address nobody listens on: building one opens no
connection, and nothing here sends a request (the integration tests do, against the emulator).
"""

from __future__ import annotations

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud.pubsub_v1.types import BatchSettings, PublisherOptions

from mailpipe.pubsub import (
    PubSubUnavailable,
    publisher_client,
    subscriber_client,
    translate_api_errors,
)
from ops.replay import DeadLetterUnavailable

NOBODY = "127.0.0.1:9"  # discard port: never contacted, clients connect lazily


def test_an_api_error_becomes_the_given_mailpipe_error_with_googles_message() -> None:
    refused = api_exceptions.PermissionDenied("the caller may not publish to topic mail")
    failing = translate_api_errors("Pub/Sub pull failed", DeadLetterUnavailable)
    with pytest.raises(DeadLetterUnavailable) as raised, failing:
        raise refused
    assert str(raised.value) == "Pub/Sub pull failed: the caller may not publish to topic mail"
    assert raised.value.__cause__ is refused
    assert isinstance(raised.value, PubSubUnavailable)
    assert not isinstance(raised.value.__cause__, api_exceptions.DeadlineExceeded)


def test_exhausted_retries_say_pubsub_could_not_be_reached() -> None:
    expected = r"^publish: Pub/Sub could not be reached"
    with pytest.raises(PubSubUnavailable, match=expected), translate_api_errors("publish"):
        raise api_exceptions.RetryError("deadline of 5.0s exceeded", cause=None)


def test_a_deadline_is_told_apart_from_other_failures() -> None:
    with pytest.raises(PubSubUnavailable) as raised, translate_api_errors("pull"):
        raise api_exceptions.DeadlineExceeded("pull timed out")
    assert isinstance(raised.value.__cause__, api_exceptions.DeadlineExceeded)


def test_errors_that_are_not_googles_pass_through_untouched() -> None:
    with pytest.raises(KeyError), translate_api_errors("pull"):
        raise KeyError("mail_id")


@pytest.mark.parametrize("tracing", [True, False])
def test_tracing_is_on_only_when_asked(tracing: bool) -> None:
    publisher = publisher_client(NOBODY, tracing=tracing)
    subscriber = subscriber_client(NOBODY, tracing=tracing)
    try:
        assert publisher.publisher_options.enable_open_telemetry_tracing is tracing
        assert subscriber.subscriber_options.enable_open_telemetry_tracing is tracing
    finally:
        publisher.stop()
        subscriber.close()


def test_publisher_keeps_the_callers_options_and_batching() -> None:
    options = PublisherOptions(enable_message_ordering=True)
    batch = BatchSettings(max_latency=0.005, max_messages=100)
    client = publisher_client(NOBODY, tracing=True, publisher_options=options, batch_settings=batch)
    try:
        assert client.publisher_options.enable_message_ordering
        assert client.publisher_options.enable_open_telemetry_tracing
        assert client.batch_settings == batch
    finally:
        client.stop()
