"""The publisher API's one error type, and the time parsing its routes share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping


class ApiError(Exception):
    """An error answered to the client as JSON with ``status`` (create_app's one handler)."""

    def __init__(
        self, status: int, code: str, message: str, fields: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = dict(fields or {})


def utc_time(text: str) -> dt.datetime:
    """An ISO 8601 time as an aware UTC time (naive: UTC); ValueError names what is wrong."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError("must be an ISO 8601 time such as 2026-11-23T10:00:00Z") from exc
    try:
        # An offset at the calendar's edge (0001-01-01T00:00+01:00) has no UTC equivalent.
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    except OverflowError as exc:
        raise ValueError(
            "is outside the times the record holds (0001-01-01 to 9999-12-31 in UTC)"
        ) from exc
