"""The retry schedule of dead-lettered mails (subscriber/retry_schedule.py) and the give-up time's
configuration (MAILPIPE_RETRY_SCHEDULE, MAILPIPE_DEFAULT_DELIVER_WITHIN)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from mailpipe.config import ConfigError
from publisher.config import PublisherConfig
from subscriber.config import SubscriberConfig
from subscriber.retry_schedule import DEFAULT_RETRY_SCHEDULE, RetrySchedule, RetryScheduleError

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
MIN, HOUR = 60.0, 3600.0


def attempts(schedule: RetrySchedule, until: float) -> list[float]:
    """Every scheduled attempt (seconds after acceptance) up to ``until``."""
    found, at = [], 0.0
    while (at := schedule.next_offset(at)) <= until:
        found.append(at)
    return found


def test_the_default_retries_every_15_minutes_for_2_hours_then_every_1_to_6_hours() -> None:
    offsets = attempts(RetrySchedule.parse(DEFAULT_RETRY_SCHEDULE), 72 * HOUR)
    early = [at for at in offsets if at <= 2 * HOUR]
    assert early == [n * 15 * MIN for n in range(1, 9)]  # RFC 5321 4.5.4.1: at most 30 min
    gaps = [b - a for a, b in itertools.pairwise(offsets) if a >= 2 * HOUR]
    assert gaps == sorted(gaps)  # growing, then steady
    assert min(gaps) >= 1 * HOUR and max(gaps) <= 6 * HOUR


def test_the_next_attempt_is_the_first_scheduled_one_after_now() -> None:
    schedule = RetrySchedule.parse("F,1h,10m; G,5h,1h,2")
    assert schedule.next_offset(0) == 10 * MIN
    assert schedule.next_offset(10 * MIN) == 20 * MIN  # exactly on one: the next
    assert schedule.next_offset(59 * MIN) == 60 * MIN
    assert schedule.next_offset(61 * MIN) == 2 * HOUR  # growing: +1 h, +2 h
    assert schedule.next_offset(2 * HOUR) == 4 * HOUR
    # Past the last rule its last gap repeats: deliver_by is the only give-up time.
    assert schedule.next_offset(100 * HOUR) > 100 * HOUR


def test_a_schedule_of_seconds_for_tests() -> None:
    assert attempts(RetrySchedule.parse("F,1h,2s"), 10) == [2, 4, 6, 8, 10]


def test_no_attempt_is_scheduled_at_or_after_deliver_by() -> None:
    schedule = RetrySchedule.parse("F,1h,15m")
    now = T0 + dt.timedelta(minutes=20)
    assert schedule.next_attempt(T0, now, None) == T0 + dt.timedelta(minutes=30)
    assert schedule.next_attempt(T0, now, T0 + dt.timedelta(minutes=31)) is not None
    assert schedule.next_attempt(T0, now, T0 + dt.timedelta(minutes=30)) is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a rule"),
        ("every 15 minutes", "is not a rule"),
        ("F,2h", "is not a rule"),
        ("X,2h,15m", "is not a rule"),
        ("F,2h,fast", "not a duration"),
        ("G,16h,1h,lots", "rule 'G,16h,1h,lots'"),
        ("F,2h,0s", "at least 1s"),
        ("G,16h,1h,0.5", "factors 1..100"),
        ("F,2h,15m;", "is not a rule"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(RetryScheduleError, match=says):
        RetrySchedule.parse(text)


def test_bad_settings_stop_each_service_naming_the_variable() -> None:
    env = {"GOOGLE_CLOUD_PROJECT": "p", "MAILPIPE_RETRY_SCHEDULE": "every 15 minutes"}
    with pytest.raises(ConfigError, match="MAILPIPE_RETRY_SCHEDULE"):
        SubscriberConfig.from_env(env)
    for value, says in (("3 days", "not a duration"), ("30d", "retention"), ("10s", "1m")):
        env = {"GOOGLE_CLOUD_PROJECT": "p", "MAILPIPE_DEFAULT_DELIVER_WITHIN": value}
        with pytest.raises(ConfigError, match=says):
            PublisherConfig.from_env(env)


def test_settings_in_the_one_duration_grammar() -> None:
    env = {"GOOGLE_CLOUD_PROJECT": "p", "MAILPIPE_DEFAULT_DELIVER_WITHIN": "5d"}
    config = PublisherConfig.from_env(env)
    assert (config.default_deliver_within, config.max_deliver_within) == (5 * 86_400, 7 * 86_400)
    env = {"GOOGLE_CLOUD_PROJECT": "p", "MAILPIPE_RETRY_SCHEDULE": "f, 30m, 5m"}
    assert SubscriberConfig.from_env(env).retry_schedule.next_offset(0) == 5 * MIN
