"""The one duration grammar: ``250ms``, ``60s``, ``30m``, ``2h``, ``7d``, ``1w``.

A non-negative decimal number (ASCII digits) and a unit (any case; spaces around and between are
ignored). A site may take fewer units (``topology.json``: seconds only) or let a bare number mean
one unit (the canary's ``--every 90``); the grammar and the error message are the same everywhere.

Errors::

    DurationError (ValueError)   not a duration this site accepts; says what is accepted
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

# unit: (seconds, an example, its name)
_UNITS: dict[str, tuple[float, str, str]] = {
    "ms": (0.001, "250ms", "milliseconds"),
    "s": (1.0, "60s", "seconds"),
    "m": (60.0, "30m", "minutes"),
    "h": (3600.0, "2h", "hours"),
    "d": (86_400.0, "7d", "days"),
    "w": (604_800.0, "1w", "weeks"),
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)


class DurationError(ValueError):
    """Not a duration this site accepts."""


def describe(units: Iterable[str] = _UNITS, *, default_unit: str | None = None) -> str:
    """What a site accepts, for help texts and error messages: ``"e.g. 60s, 30m or 2h"``."""
    examples = [_UNITS[unit][1] for unit in units]
    text = examples[0] if len(examples) == 1 else f"{', '.join(examples[:-1])} or {examples[-1]}"
    if default_unit is not None:
        text += f" (a bare number is {_UNITS[default_unit][2]})"
    return f"a number and a unit, e.g. {text}"


def parse_duration(
    text: str,
    *,
    units: Iterable[str] = _UNITS,
    default_unit: str | None = None,
    whole_seconds: bool = False,
) -> float:
    """``text`` as seconds. ``units``: the units this site takes; ``default_unit``: the unit of a
    bare number (none: a unit is required); ``whole_seconds`` refuses fractions of a second."""
    allowed = tuple(units)
    unknown = [unit for unit in (*allowed, default_unit) if unit and unit not in _UNITS]
    if unknown:
        raise ValueError(f"unknown duration unit(s): {', '.join(unknown)}")
    match = _DURATION.fullmatch(text)
    unit = (match.group(2).lower() or default_unit) if match else None
    if match is None or unit not in allowed:
        raise DurationError(
            f"{text!r} is not a duration: use {describe(allowed, default_unit=default_unit)}"
        )
    seconds = float(match.group(1)) * _UNITS[unit][0]
    if not math.isfinite(seconds):
        raise DurationError(f"{text!r} is too long a duration")
    if whole_seconds and not seconds.is_integer():
        raise DurationError(f"{text!r} is not a whole number of seconds")
    return seconds
