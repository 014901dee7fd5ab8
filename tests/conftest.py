"""Shared fixtures. Each concern keeps its fixtures in its own module under tests/fixtures/."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.emulators",
    "tests.fixtures.smtp",
    "tests.fixtures.telemetry",
    "tests.fixtures.pipeline",
    "tests.fixtures.imap",
]
