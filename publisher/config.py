"""The publisher's configuration, read with the shared parts (``mailpipe/config.py``).

One reader collects the shared and the publisher's own problems, so a bad start reports every bad
variable at once (:class:`~mailpipe.config.ConfigError`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from email_validator import EmailNotValidError, validate_email

from mailpipe.config import EnvReader, HttpConfig, PubSubConfig, TelemetryConfig, read_record
from mailpipe.topology import Topology, load_topology


def ascii_domain(domain: str) -> str:
    """``bücher.de`` → ``xn--bcher-kva.de`` (lower-case); raises ValueError for a bad domain."""
    try:
        checked = validate_email(f"postmaster@{domain}", check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{domain!r} is not a valid domain: {exc}") from exc
    return checked.ascii_domain


def _read_sender_domains(env: EnvReader) -> frozenset[str] | None:
    """``MAILPIPE_ALLOWED_SENDER_DOMAINS``: ASCII (IDNA) domains, or None (unset: any sender)."""
    name = "MAILPIPE_ALLOWED_SENDER_DOMAINS"
    raw = env.raw(name)
    if raw is None:
        return None
    domains: set[str] = set()
    bad: list[str] = []
    for item in raw.split(","):
        try:
            domains.add(ascii_domain(item.strip()))
        except ValueError:
            bad.append(repr(item.strip()))
    if bad:
        env.problems[name] = (
            "must be domains separated by commas, such as example.com,mail.example.org (each "
            f"domain exactly, no wildcards); not a domain: {', '.join(bad)}"
        )
    return frozenset(domains)


SANDBOX_EVERY_CALLER = "*"
_CALLER = re.compile(r"^(sub:[\x21-\x7e]{1,255}|[^@\s,:]{1,64}@[^@\s,]{1,253})$")


def _read_sandbox_callers(env: EnvReader) -> frozenset[str]:
    """``MAILPIPE_SANDBOX_CALLERS``: the callers whose mail is always sandboxed, as
    publisher/caller.py names them (an email, lower case, or ``sub:ID``); ``*``: every caller."""
    name = "MAILPIPE_SANDBOX_CALLERS"
    items = [item.strip() for item in (env.raw(name) or "").split(",") if item.strip()]
    callers = frozenset(i if i.startswith("sub:") else i.lower() for i in items)
    bad = [repr(c) for c in sorted(callers) if c != SANDBOX_EVERY_CALLER and not _CALLER.match(c)]
    if bad:
        env.problems[name] = (
            "must be caller identities separated by commas: service account emails "
            "(ci@PROJECT.iam.gserviceaccount.com), sub:SUBJECT_ID, or * for every caller; "
            f"not one: {', '.join(bad)}"
        )
    return callers


@dataclass(frozen=True)
class PublisherConfig:
    """Everything the publisher service needs."""

    pubsub: PubSubConfig
    telemetry: TelemetryConfig
    record: str  # MAILPIPE_RECORD, default: mailpipe.config.DEFAULT_RECORD
    host: str = "127.0.0.1"
    port: int = 8080
    publish_timeout: float = 30.0
    # How long an idempotency key's reservation holds it while its publish is in progress; a
    # reservation older than this was left by a crash and is released (longer than the publish
    # timeout, so a publish still running never loses its key).
    idempotency_reservation_seconds: float = 300.0
    # How long past its lease a `sending` record may stay before reconcile calls it stalled: more
    # than Pub/Sub's longest retry backoff (600 s), so a redelivery on its way claims it first.
    reconcile_grace_seconds: float = 900.0
    http: HttpConfig = field(default_factory=HttpConfig)
    # The domains a mail's From may use (ASCII form); None: any (MAILPIPE_ALLOWED_SENDER_DOMAINS).
    allowed_sender_domains: frozenset[str] | None = None
    # Callers whose every mail is sandboxed (MAILPIPE_SANDBOX_CALLERS); "*": every caller.
    sandbox_callers: frozenset[str] = frozenset()

    def sandboxed_caller(self, caller: str | None) -> bool:
        """Whether ``caller`` (None: unidentified, as in local mode) must sandbox its mail."""
        return SANDBOX_EVERY_CALLER in self.sandbox_callers or caller in self.sandbox_callers

    def sender_allowed(self, domain: str) -> bool:
        """Whether a From address at ``domain`` may be sent (a valid domain, any form)."""
        if self.allowed_sender_domains is None:
            return True
        return ascii_domain(domain) in self.allowed_sender_domains

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], topology: Topology | None = None
    ) -> PublisherConfig:
        env = EnvReader(environ)
        topology = topology or load_topology()
        publish_timeout = env.number("MAILPIPE_PUBLISH_TIMEOUT", 30.0, minimum=0.1, maximum=600.0)
        reservation = env.number(
            "MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS", 300.0, minimum=1.0, maximum=86_400.0
        )
        if "MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS" not in env.problems and not (
            reservation > publish_timeout
        ):
            env.problems["MAILPIPE_IDEMPOTENCY_RESERVATION_SECONDS"] = (
                f"must be longer than MAILPIPE_PUBLISH_TIMEOUT ({publish_timeout:g} s), or a "
                f"publish still in progress could lose its key; got {reservation:g}"
            )
        config = cls(
            pubsub=PubSubConfig.read(env, topology),
            telemetry=TelemetryConfig.read(env, "mailpipe-publisher"),
            record=read_record(env),
            host=env.string("MAILPIPE_HTTP_HOST", "127.0.0.1"),
            port=env.integer("PORT", 8080, minimum=1, maximum=65535),
            publish_timeout=publish_timeout,
            idempotency_reservation_seconds=reservation,
            reconcile_grace_seconds=env.number(
                "MAILPIPE_RECONCILE_GRACE_SECONDS", 900.0, minimum=0.0, maximum=604_800.0
            ),
            http=HttpConfig.read(env),
            allowed_sender_domains=_read_sender_domains(env),
            sandbox_callers=_read_sandbox_callers(env),
        )
        env.finish()
        return config
