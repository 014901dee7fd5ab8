"""The publisher served over HTTP on loopback, publishing to the Pub/Sub emulator for real."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mailpipe.record import open_record
from mailpipe.topology import Topology
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.pubsub import PubSubMailPublisher
from tests.fixtures.http import serve_app
from tests.fixtures.topology import unique_topology


@pytest.fixture(scope="module")
def publisher_url(
    pubsub_emulator: object,
    pubsub_project: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real publisher (Flask app over HTTP, emulator, SQLite record) for one test module."""

    from emulator import delete_topology, sync_topology

    topology: Topology = unique_topology()
    host = pubsub_emulator.host  # type: ignore[attr-defined]
    sync_topology(topology, project=pubsub_project, emulator_host=host)
    record_path: Path = tmp_path_factory.mktemp("fuzz") / "record.sqlite3"
    config = PublisherConfig.from_env(
        {
            "PUBSUB_EMULATOR_HOST": host,
            "GOOGLE_CLOUD_PROJECT": pubsub_project,
            "MAILPIPE_TOPIC": topology.mail_topic.name,
            "MAILPIPE_RECORD": f"sqlite:///{record_path}",
            "MAILPIPE_SUPPRESSION_KEY": "fuzz-only-suppression-key-0123456789abcdef",
        },
        topology,
    )
    publisher = PubSubMailPublisher(config.pubsub, timeout=10)
    record = open_record(config.record)
    try:
        suppressions = record.suppressions(config.suppressions)
        app = create_app(config, publisher=publisher, record=record, suppressions=suppressions)
        with serve_app(app) as url:
            yield url
    finally:
        publisher.close()
        record.close()
        delete_topology(topology, project=pubsub_project, emulator_host=host)


@pytest.fixture(scope="module")
def http(publisher_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=publisher_url, timeout=30) as client:
        yield client


JsonCheck = Callable[[httpx.Response], None]
