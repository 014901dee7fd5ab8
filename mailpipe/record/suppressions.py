"""The suppression list: recipients the subscriber leaves out (docs/suppressions.md).

One document per recipient (kind ``suppressions``), its id the recipient's *key*: where
``MAILPIPE_LOG_ADDRESSES=full`` the lower-cased address (``%`` and ``/`` percent-escaped, which
document ids cannot hold); otherwise ``hmac-sha256:`` + HMAC-SHA256 of it under
``MAILPIPE_SUPPRESSION_KEY``, and the address is not stored. A plain hash of an address can be
reversed by hashing guessed addresses; a keyed one only by whoever holds the key. An entry past
its ``expires_at`` is ignored on every read (Firestore's TTL policy deletes it later).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from mailpipe.config import AddressStyle, EnvReader
from mailpipe.logs import register_secret
from mailpipe.record.store import SUPPRESSIONS, Clock, Store, Transaction, decode, encode

KEY_PREFIX = "hmac-sha256:"
MIN_KEY_BYTES = 32  # RFC 2104 § 3: not shorter than the hash's output


class SuppressionReason(enum.StrEnum):
    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


@dataclass(frozen=True)
class Suppression:
    """One suppressed recipient; ``address`` only where full addresses may be kept."""

    key: str
    reason: SuppressionReason
    created_at: dt.datetime
    domain: str
    address: str | None = None
    reply_code: int | None = None
    enhanced_status: str | None = None
    reply: str | None = None  # as MAILPIPE_LOG_ADDRESSES allows (the sender redacted it)
    mail_id: str | None = None  # the mail whose refusal added it
    expires_at: dt.datetime | None = None

    def active(self, now: dt.datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class SuppressionPolicy:
    """How recipients are keyed: ``MAILPIPE_LOG_ADDRESSES`` and ``MAILPIPE_SUPPRESSION_KEY``."""

    style: AddressStyle = "domain"
    key: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        """Full addresses may be kept, or there is a key to hash them with."""
        return self.style == "full" or self.key is not None

    @property
    def disabled_reason(self) -> str:
        return (
            f"the suppression list is off: MAILPIPE_LOG_ADDRESSES={self.style} keeps no full "
            "address, so it needs MAILPIPE_SUPPRESSION_KEY (an HMAC key of at least "
            f"{MIN_KEY_BYTES} bytes, from Secret Manager) to key recipients by"
        )

    def key_of(self, address: str) -> str:
        """The document id of ``address`` (a validated addr-spec)."""
        text = address.strip().lower()
        if self.style == "full":
            return text.replace("%", "%25").replace("/", "%2F")
        if self.key is None:
            raise ValueError(self.disabled_reason)
        return KEY_PREFIX + hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    @classmethod
    def read(cls, env: EnvReader) -> SuppressionPolicy:
        style = env.choice("MAILPIPE_LOG_ADDRESSES", "domain", ("full", "domain", "hashed"))
        raw = env.raw("MAILPIPE_SUPPRESSION_KEY")
        if raw is not None and len(raw.encode()) < MIN_KEY_BYTES:
            env.problems["MAILPIPE_SUPPRESSION_KEY"] = (
                f"must be at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -base64 48`); "
                f"got {len(raw.encode())}"
            )
        return cls(cast(AddressStyle, style), raw.encode() if raw else None)


class SuppressionList:
    """The suppression list over a record's store (:meth:`DeliveryRecord.suppressions`): what
    the subscriber needs; the API's listing and removal are in publisher/suppressions.py."""

    def __init__(self, store: Store, policy: SuppressionPolicy, clock: Clock) -> None:
        self.store, self.policy, self.clock = store, policy, clock
        register_secret((policy.key or b"").decode())  # the key never shows in a log line

    def entry(
        self,
        address: str,
        reason: SuppressionReason,
        *,
        reply_code: int | None = None,
        enhanced_status: str | None = None,
        reply: str | None = None,
        mail_id: str | None = None,
        expires_at: dt.datetime | None = None,
    ) -> Suppression:
        """The entry of ``address`` (a validated addr-spec), keyed and shown as the policy says."""
        shown = address.strip().lower() if self.policy.style == "full" else None
        domain = address.rpartition("@")[2].lower()
        key, now = self.policy.key_of(address), self.clock()
        details = (reply_code, enhanced_status, reply, mail_id, expires_at)
        return Suppression(key, reason, now, domain, shown, *details)

    def put(self, *entries: Suppression) -> None:
        """Add ``entries`` (from :meth:`entry`), or replace theirs, all in one transaction."""

        def body(txn: Transaction) -> None:
            for entry in entries:
                txn.put(SUPPRESSIONS, entry.key, encode(entry), None, False)

        self.store.transact("suppress", body)

    def lookup(self, addresses: Iterable[str]) -> dict[str, Suppression]:
        """The suppressed ones of ``addresses`` (one batched read), by address."""
        keys = {address: self.policy.key_of(address) for address in addresses}
        found = self.store.get_many(SUPPRESSIONS, sorted(set(keys.values()))) if keys else {}
        now, entries = self.clock(), {key: decode(Suppression, doc) for key, doc in found.items()}
        active = {key for key, entry in entries.items() if entry.active(now)}
        return {address: entries[key] for address, key in keys.items() if key in active}
