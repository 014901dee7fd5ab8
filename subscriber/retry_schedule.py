"""When a dead-lettered mail is tried again: ``MAILPIPE_RETRY_SCHEDULE``, an Exim-like grammar.

Rules separated by ``;``, each measured from the mail's acceptance (durations in
:mod:`mailpipe.durations`' grammar)::

    F,<until>,<every>              fixed: an attempt every <every> until <until>
    G,<until>,<first>,<factor>     growing: <first>, then each gap <factor> times the one before

Default (Exim's ``F,2h,15m; G,16h,1h,1.5; F,4d,6h`` shortened so gaps stay within 1-6 h; RFC 5321
§4.5.4.1: at least every 30 minutes early on): :data:`DEFAULT_RETRY_SCHEDULE`. After the last
rule its last gap repeats: the mail's ``deliver_by`` is the one give-up time. docs/deliver-by.md.

Errors::

    RetryScheduleError (ValueError)   the text is not a schedule; the message says why
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from mailpipe.durations import DurationError, parse_duration

DEFAULT_RETRY_SCHEDULE = "F,2h,15m; G,12h,1h,1.5; F,7d,6h"
RETRY_SCHEDULE_VARIABLE = "MAILPIPE_RETRY_SCHEDULE"
_FORMS = "rules such as 'F,2h,15m; G,12h,1h,1.5' (F,<until>,<every> or G,<until>,<first>,<factor>)"


class RetryScheduleError(ValueError):
    """Not a retry schedule."""


@dataclass(frozen=True)
class Rule:
    until: float  # seconds after acceptance
    gap: float  # seconds: the (first) gap between attempts
    factor: float = 1.0  # each gap is the one before times this (F: 1)


@dataclass(frozen=True)
class RetrySchedule:
    rules: tuple[Rule, ...]

    @classmethod
    def parse(cls, text: str) -> RetrySchedule:
        rules = []
        for part in (p.strip() for p in text.split(";")):
            fields = [f.strip() for f in part.split(",")]
            kind = fields[0].upper()
            if (kind, len(fields)) not in (("F", 3), ("G", 4)):
                raise RetryScheduleError(f"{part!r} is not a rule: use {_FORMS}")
            try:
                until, gap = (parse_duration(f) for f in fields[1:3])
                factor = float(fields[3]) if kind == "G" else 1.0
            except (DurationError, ValueError) as exc:
                raise RetryScheduleError(f"rule {part!r}: {exc}") from exc
            if gap < 1 or not (1.0 <= factor <= 100.0) or until <= 0:
                raise RetryScheduleError(
                    f"rule {part!r}: gaps must be at least 1s, factors 1..100, limits above 0"
                )
            rules.append(Rule(until, gap, factor))
        return cls(tuple(rules))

    def next_offset(self, elapsed: float) -> float:
        """Seconds after acceptance of the first scheduled attempt later than ``elapsed``."""
        t, gap = 0.0, self.rules[0].gap
        for rule in self.rules:
            gap = rule.gap
            while t + gap <= rule.until:
                if t + gap > elapsed:
                    return t + gap
                if rule.factor == 1.0:  # jump over the fixed gaps already past
                    t += math.floor((min(elapsed, rule.until) - t) / gap) * gap
                else:
                    t, gap = t + gap, gap * rule.factor
        return t + (math.floor((elapsed - t) / gap) + 1) * gap  # t <= elapsed here

    def next_attempt(
        self, accepted_at: dt.datetime, now: dt.datetime, deliver_by: dt.datetime | None
    ) -> dt.datetime | None:
        """The next attempt's time, or None when none comes before ``deliver_by``."""
        elapsed = (now - accepted_at).total_seconds()
        at = accepted_at + dt.timedelta(seconds=self.next_offset(max(elapsed, 0.0)))
        return None if deliver_by is not None and at >= deliver_by else at
