"""The publisher served over HTTP on loopback, publishing to the Pub/Sub emulator for real."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from emulator import RunningEmulator
from tests.fixtures.publishing import publishing


@pytest.fixture(scope="module")
def publisher_url(
    pubsub_emulator: RunningEmulator,
    pubsub_project: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real publisher (Flask app over HTTP, emulator, SQLite record) for one test module."""
    with (
        publishing(
            pubsub_emulator,
            pubsub_project,
            tmp_path_factory.mktemp("fuzz"),
            # The contract fuzzing reaches a working suppression list, not its 503 "disabled".
            env={"MAILPIPE_SUPPRESSION_KEY": "fuzz-only-suppression-key-0123456789abcdef"},
        ) as parts,
        parts.served() as url,
    ):
        yield url


@pytest.fixture(scope="module")
def http(publisher_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=publisher_url, timeout=30) as client:
        yield client


JsonCheck = Callable[[httpx.Response], None]
