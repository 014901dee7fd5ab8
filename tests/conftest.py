"""Shared fixtures. Each concern keeps its fixtures in its own module under tests/fixtures/."""

from __future__ import annotations

import os
import signal

# Before anything imports grpc: the tests start services with subprocess after using Pub/Sub
# clients, and gRPC's fork handlers can make such a child abort before exec (see ./dev).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = [
    "tests.fixtures.emulators",
    "tests.fixtures.smtp",
    "tests.fixtures.telemetry",
    "tests.fixtures.pipeline",
    "tests.fixtures.imap",
]


def pytest_configure() -> None:
    # A shell without job control starts background commands (`./dev test &`, a CI runner's
    # script) with SIGINT ignored, and an ignored signal stays ignored across exec: the processes
    # the tests start would then shrug off the Ctrl-C that the tests send, as no terminal user's
    # would. Handle it here as an interactive run does; exec resets a handled signal to default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
