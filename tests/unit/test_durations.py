"""The one duration grammar (mailpipe/durations.py) and the sites that read durations with it."""

from __future__ import annotations

import datetime as dt

import pytest

from mailpipe.durations import DurationError, parse_duration
from mailpipe.topology import TopologyError, duration_seconds
from ops.replay import parse_since


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("60s", 60.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("7d", 604_800.0),
        ("1w", 604_800.0),
        ("2H", 7200.0),  # any case
        (" 30 m ", 1800.0),  # spaces around and between
        ("0s", 0.0),
    ],
)
def test_number_and_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "s", "m5", "-1s", "+1s", "1e3s", "1.5.5s", "1 y", "5 min", "٣s", "2h30m", "nan", "inf"],
)
def test_bad_input_says_what_is_accepted(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "e.g. 250ms, 60s, 30m, 2h, 7d or 1w" in message


def test_a_bare_number_needs_a_unit_unless_the_site_names_one() -> None:
    with pytest.raises(DurationError, match="a number and a unit"):
        parse_duration("90")
    assert parse_duration("90", default_unit="s") == 90.0
    assert parse_duration("90", default_unit="m") == 5400.0


def test_a_site_may_take_fewer_units() -> None:
    assert parse_duration("600s", units=("s",)) == 600.0
    with pytest.raises(DurationError, match=r"'10m' is not a duration: .*e\.g\. 60s$"):
        parse_duration("10m", units=("s",))


def test_whole_seconds() -> None:
    assert parse_duration("2m", whole_seconds=True) == 120.0
    with pytest.raises(DurationError, match="not a whole number of seconds"):
        parse_duration("1.5s", whole_seconds=True)


def test_a_number_too_large_for_a_float_is_refused() -> None:
    with pytest.raises(DurationError, match="too long"):
        parse_duration("9" * 400 + "s")


def test_an_unknown_unit_is_a_programming_error_not_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown duration unit") as info:
        parse_duration("1y", units=("y",))
    assert not isinstance(info.value, DurationError)


# --- the sites -------------------------------------------------------------------------------


def test_topology_takes_only_pubsubs_spelling() -> None:
    assert duration_seconds("600s") == 600
    for text in ("10m", "1.5s", " 600s", "600S", "600", ""):
        with pytest.raises(TopologyError, match="600s"):
            duration_seconds(text)


NOW = dt.datetime(2026, 11, 23, 12, tzinfo=dt.UTC)


def test_since_reads_ages_with_the_grammar() -> None:
    assert parse_since("90m", now=NOW) == NOW - dt.timedelta(minutes=90)
    assert parse_since("1w", now=NOW) == NOW - dt.timedelta(weeks=1)
    assert parse_since("2H", now=NOW) == NOW - dt.timedelta(hours=2)


def test_since_an_age_before_the_year_1_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="before the year 1"):
        parse_since("999999w", now=NOW)
    with pytest.raises(ValueError, match="before the year 1"):
        parse_since("99999999999d", now=NOW)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("5m", 300.0), ("1h", 3600.0), ("90", 90.0), ("250ms", 0.25)],
)
def test_what_canary_every_took_before_still_reads(text: str, seconds: float) -> None:
    assert parse_duration(text, default_unit="s") == seconds


def test_canary_every_takes_the_grammar_and_a_bare_number_of_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ops.cli import main

    assert main(["canary", "--every", "5 min"]) == 2
    assert "'5 min' is not a duration" in capsys.readouterr().err
