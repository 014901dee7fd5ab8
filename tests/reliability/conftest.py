"""Shows every reliability run's counts at the end of the pytest session (also without ``-s``)."""

from __future__ import annotations

from typing import Any

from tests.reliability.harness import COUNT_LINES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if COUNT_LINES:
        terminalreporter.section("mailpipe reliability counts")
        for line in COUNT_LINES:
            terminalreporter.write_line(line)
