"""mailpipe.events without an emulator: its configuration, and a publish that cannot succeed.

The failing publish is real: google-cloud-pubsub's client aimed at a loopback port where nothing
listens (what an unreachable Pub/Sub looks like to the service). The emulator-backed behaviour
(the events a pipeline emits, their traces) is in tests/integration/test_delivery_events.py.
"""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from emulator.process import free_port
from mailpipe.config import ConfigError
from mailpipe.events import EventEmitter, EventsConfig, EventType, build_emitter
from mailpipe.mail import MailRequest, QueuedMail
from mailpipe.pubsub import publisher_client
from mailpipe.topology import load_topology
from publisher.config import PublisherConfig
from tests.fixtures.telemetry import metric_points


def test_the_events_topic_defaults_to_the_declaration() -> None:
    topology = load_topology()
    config = EventsConfig.from_env({}, topology)
    assert (config.topic, config.timeout) == ("mailpipe-delivery-events", 5.0)
    assert (
        EventsConfig.from_env({"MAILPIPE_EVENTS_TOPIC": "x-events"}, topology).topic == "x-events"
    )
    assert EventsConfig.from_env({"MAILPIPE_EVENTS_TIMEOUT": "0.5"}, topology).timeout == 0.5


def test_events_can_be_turned_off() -> None:
    config = EventsConfig.from_env({"MAILPIPE_EVENTS_TOPIC": "none"}, load_topology())
    assert config.topic is None
    services = PublisherConfig.from_env({})
    assert build_emitter(config, services.pubsub, services.telemetry) is None


@pytest.mark.parametrize("value", ["0", "61", "-1", "soon", "nan", "inf", "1e9"])
def test_a_bad_timeout_is_refused_with_its_name(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        EventsConfig.from_env({"MAILPIPE_EVENTS_TIMEOUT": value}, load_topology())
    assert "MAILPIPE_EVENTS_TIMEOUT" in caught.value.problems


def test_an_unreachable_pubsub_costs_a_log_line_and_a_count_never_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = InMemoryMetricReader()
    client = publisher_client(f"127.0.0.1:{free_port()}", tracing=True)
    emitter = EventEmitter(
        client,
        "projects/p/topics/mailpipe-delivery-events",
        timeout=0.5,
        meter=MeterProvider(metric_readers=[reader]).get_meter("test"),
    )
    mail = QueuedMail.accept(
        MailRequest.model_validate(
            {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}
        )
    )
    with caplog.at_level(logging.ERROR, logger="mailpipe.events"):
        emitter.emit(EventType.DELIVERED, mail.mail_id, mail=mail, attempt=1)  # does not wait
        emitter.close()  # waits for the answer: the failure, once the 0.5 s of retries are up
    assert f"could not publish the delivered event of mail {mail.mail_id}" in caplog.text
    [point] = metric_points(reader)["mailpipe.events.failed"]
    assert point.value == 1 and point.attributes == {"mailpipe.event": "delivered"}
