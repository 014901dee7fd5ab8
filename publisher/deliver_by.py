"""A mail's give-up time: the request's ``deliver_by``, its default, and its bounds.

Default: accepted + ``MAILPIPE_DEFAULT_DELIVER_WITHIN`` (72 h, SendGrid's; RFC 5321 §4.5.4.1 says
4-5 days). Maximum: accepted + the dead-letter subscription's message retention (topology.json):
a mail waiting there for its next attempt must still be there when it comes. docs/deliver-by.md.

Errors::

    DeliverByError (ValueError)   the requested time is past or beyond the maximum (HTTP 400)
"""

from __future__ import annotations

import datetime as dt

from mailpipe.config import EnvReader
from mailpipe.durations import DurationError, parse_duration
from mailpipe.topology import Topology, TopologyError, duration_seconds

DEFAULT_DELIVER_WITHIN = 72 * 3600.0
DELIVER_WITHIN_VARIABLE = "MAILPIPE_DEFAULT_DELIVER_WITHIN"


class DeliverByError(ValueError):
    """A requested ``deliver_by`` the pipeline cannot honour; the text says what it takes."""


def max_deliver_within(topology: Topology) -> float:
    """Seconds: the dead-letter subscription's message retention (7 days when undeclared)."""
    retention = topology.dead_letter_subscription.message_retention_duration or "604800s"
    try:
        return float(duration_seconds(retention))
    except TopologyError:  # validated with the topology; kept safe for a hand-built one
        return 604_800.0


def read_deliver_within(env: EnvReader, maximum: float) -> float:
    """``MAILPIPE_DEFAULT_DELIVER_WITHIN`` (a duration, e.g. ``72h``), at most ``maximum``."""
    text = env.raw(DELIVER_WITHIN_VARIABLE)
    if text is None:
        return min(DEFAULT_DELIVER_WITHIN, maximum)
    try:
        seconds = parse_duration(text)
    except DurationError as exc:
        env.problems[DELIVER_WITHIN_VARIABLE] = str(exc)
        return DEFAULT_DELIVER_WITHIN
    if not 60 <= seconds <= maximum:
        env.problems[DELIVER_WITHIN_VARIABLE] = (
            f"must be from 1m to the dead-letter subscription's retention ({maximum:g} s), "
            f"got {text!r}"
        )
    return seconds


def parse_deliver_by(value: str | int) -> dt.datetime:
    """An RFC 3339 time with an offset, or Unix seconds (as SendGrid takes), in UTC."""
    try:
        if isinstance(value, int):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        if len(value) <= 40 and value[:4].isdigit():
            parsed = dt.datetime.fromisoformat(value.strip().replace("z", "Z"))
            if parsed.tzinfo is not None:
                return parsed.astimezone(dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    raise DeliverByError(
        "must be an RFC 3339 time with an offset, such as 2026-12-01T09:00:00Z or "
        "2026-12-01T10:00:00+01:00, or Unix seconds"
    )


def resolve_deliver_by(
    requested: str | int | None,
    accepted_at: dt.datetime,
    *,
    default_within: float,
    max_within: float,
) -> dt.datetime:
    """The mail's ``deliver_by``: ``requested`` (parsed and checked) or the default; UTC."""
    if requested is None:
        return accepted_at + dt.timedelta(seconds=default_within)
    when = parse_deliver_by(requested)
    latest = accepted_at + dt.timedelta(seconds=max_within)
    if when <= accepted_at:
        raise DeliverByError(
            f"is in the past ({when.isoformat()}; now is {accepted_at.isoformat()}): give "
            "a later time, or leave it out for the default"
        )
    if when > latest:
        raise DeliverByError(
            f"is too far ahead: the maximum is {latest.isoformat()} (accepted + "
            f"{max_within / 3600:g} h, the dead-letter subscription's retention)"
        )
    return when
