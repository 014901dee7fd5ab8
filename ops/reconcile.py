"""Settle the stuck records a survey found (``mailpipe reconcile --fix``).

What counts as stuck, what each fix does and the races it handles: publisher/reconcile.py (the
survey, which the publisher's ``/v1/stats`` shows too). Each fix is one atomic call of the record
(``release_expired_reservation``, ``mark_unconfirmed``) that re-checks the record, so a mail that
moved on since the survey is left alone. A fix that fails is reported per mail and the others are
still tried.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from mailpipe.record import DeliveryRecord, RecordError
from publisher.reconcile import StuckKind, StuckMail, Survey


class FixAction(enum.StrEnum):
    RELEASED = "released"  # the expired reservation was deleted, its key freed
    MARKED_UNCONFIRMED = "marked_unconfirmed"  # the stalled delivery is now unconfirmed
    LEFT_ALONE = "left_alone"  # it moved on since the survey (a delivery took it over)
    FAILED = "failed"  # the record refused or could not be reached; see detail


@dataclass(frozen=True)
class FixOutcome:
    mail: StuckMail
    action: FixAction
    detail: str = ""

    def to_json(self, now: dt.datetime) -> dict[str, object]:
        return {**self.mail.to_json(now), "action": str(self.action), "detail": self.detail}


@dataclass(frozen=True)
class FixReport:
    outcomes: list[FixOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(outcome.action is not FixAction.FAILED for outcome in self.outcomes)

    def counts(self) -> dict[str, int]:
        return {str(action): self.count(action) for action in FixAction}

    def count(self, action: FixAction) -> int:
        return sum(1 for outcome in self.outcomes if outcome.action is action)


def fix(
    record: DeliveryRecord,
    found: Survey,
    *,
    on_outcome: Callable[[FixOutcome], None] = lambda _: None,
) -> FixReport:
    """Settle every stuck mail of ``found`` (see the module docstring); each fix re-checks the
    record atomically, so one that moved on since the survey is left alone."""
    report = FixReport()
    for mail in found.stuck:
        try:
            if mail.kind is StuckKind.EXPIRED_RESERVATION:
                released = record.release_expired_reservation(mail.mail_id)
                action = FixAction.RELEASED if released else FixAction.LEFT_ALONE
                detail = (
                    "reservation deleted; its idempotency key is free"
                    if released
                    else "no longer an expired reservation (published, or released already)"
                )
            else:
                marked = record.mark_unconfirmed(mail.mail_id, grace_seconds=found.grace_seconds)
                action = FixAction.MARKED_UNCONFIRMED if marked else FixAction.LEFT_ALONE
                detail = (
                    marked.last_error or ""
                    if marked
                    else "no longer stalled (a delivery claimed or finished it)"
                )
        except RecordError as exc:
            action, detail = FixAction.FAILED, str(exc)
        outcome = FixOutcome(mail, action, detail)
        report.outcomes.append(outcome)
        on_outcome(outcome)
    return report
