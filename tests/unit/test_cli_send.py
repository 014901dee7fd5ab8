"""``mailpipe send --deliver-by``: what is typed goes to the API in the form it takes (digits as
Unix seconds, a JSON number; anything else as typed, for the API to check and explain)."""

from __future__ import annotations

import pytest

from client import deliver_by


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("1796115600", 1796115600),
        (" 1796115600 ", 1796115600),
        ("2026-12-01T09:00:00Z", "2026-12-01T09:00:00Z"),
        ("2026-12-01T10:00:00+01:00", "2026-12-01T10:00:00+01:00"),
        ("-5", "-5"),  # the API says what it takes
        ("1.5", "1.5"),
        ("١٧٩٦١١٥٦٠٠", "١٧٩٦١١٥٦٠٠"),  # not ASCII digits: as typed, not a number
        ("9" * 19, "9" * 19),  # too long for seconds; never int("9" * 5000)
        ("", ""),
    ],
)
def test_deliver_by_is_sent_as_the_api_takes_it(typed: str, sent: str | int) -> None:
    value = deliver_by(typed)
    assert value == sent and type(value) is type(sent)
