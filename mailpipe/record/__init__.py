"""The delivery record: what happened to every mail, keyed by its mail id.

One interface (:class:`DeliveryRecord`), two backends: SQLite (the embedded default,
``sqlite:///PATH``) and Firestore on GCP (``firestore://DATABASE``). Open one with
:func:`open_record`. See :mod:`mailpipe.record.base` for the model and the error tree.
"""

from __future__ import annotations

from mailpipe.record.base import (
    DEFAULT_RESERVATION_SECONDS,
    AlreadyFinal,
    Attempt,
    Claim,
    ClaimResult,
    DeliveryRecord,
    IdempotencyConflict,
    InvalidMailId,
    LeaseRenewal,
    MailNotFound,
    MailRecord,
    MailStatus,
    Page,
    RecordError,
    RecordUnavailable,
    RenewalResult,
    Reservation,
    open_record,
)

__all__ = [
    "DEFAULT_RESERVATION_SECONDS",
    "AlreadyFinal",
    "Attempt",
    "Claim",
    "ClaimResult",
    "DeliveryRecord",
    "IdempotencyConflict",
    "InvalidMailId",
    "LeaseRenewal",
    "MailNotFound",
    "MailRecord",
    "MailStatus",
    "Page",
    "RecordError",
    "RecordUnavailable",
    "RenewalResult",
    "Reservation",
    "open_record",
]
