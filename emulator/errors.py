"""Errors raised by the ``emulator`` package (one tree, one base).

::

    EmulatorError                 base: anything about the local emulators went wrong
    ├── EmulatorNotInstalled      the emulator (or Java) is missing; says how to install it
    ├── EmulatorStartError        the emulator did not become ready; carries the tail of its log
    └── TopologyApplyError        the topology could not be applied to / read from the emulator

Lower-level exceptions (``OSError``, ``subprocess``, ``google.api_core.exceptions``) are translated
where they occur, with ``raise ... from exc``.
"""

from __future__ import annotations

from pathlib import Path


class EmulatorError(Exception):
    """Base class of every error raised by :mod:`emulator`."""


class EmulatorNotInstalled(EmulatorError):
    """An emulator (or the Java runtime it needs) is not installed on this machine."""


class EmulatorStartError(EmulatorError):
    """An emulator process did not become ready; the message ends with the tail of its log."""

    def __init__(self, message: str, *, log_path: Path | None = None, log_tail: str = "") -> None:
        self.log_path = log_path
        self.log_tail = log_tail
        text = message
        if log_path is not None:
            text += f"\nlog: {log_path}"
        if log_tail:
            text += "\n--- last lines of the emulator log ---\n" + log_tail
        super().__init__(text)


class TopologyApplyError(EmulatorError):
    """The Pub/Sub emulator rejected or failed a topology operation."""
