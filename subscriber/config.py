"""The subscriber's configuration (push endpoint or pull worker), read with the shared parts.

The shared parts and the reader are in ``mailpipe/config.py``; one reader collects every problem,
so a bad start reports every bad variable at once (:class:`~mailpipe.config.ConfigError`).

The time limits must nest, or a delivery could outlive its claim on the mail and a redelivered
copy be sent too (config fails fast otherwise)::

    MAILPIPE_SMTP_POOL_WAIT  <  MAILPIPE_DELIVERY_TIMEOUT  <  MAILPIPE_DELIVERY_LEASE_SECONDS
    (wait for a pooled         (the whole delivery: pool      (the claim's lease; by default the
     SMTP connection)           wait + every SMTP step)        delivery subscription's ack deadline)

Defaults: the lease is the ack deadline (120 s in topology.json), the delivery timeout 60 s (half
the lease when that is shorter) and the pool wait 10 s (half the delivery timeout when that is
shorter). The lease's margin over the delivery timeout is the time the record write after the
relay's reply may take. On Cloud Run the request timeout goes between the last two (Terraform
checks it): delivery timeout < request timeout ≤ ack deadline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from mailpipe.config import EnvReader, HttpConfig, PubSubConfig, TelemetryConfig, read_record
from mailpipe.record.suppressions import SuppressionPolicy
from mailpipe.topology import Topology, load_topology
from subscriber.retry_schedule import (
    DEFAULT_RETRY_SCHEDULE,
    RETRY_SCHEDULE_VARIABLE,
    RetrySchedule,
    RetryScheduleError,
)

DEFAULT_DELIVERY_TIMEOUT = 60.0  # seconds; never more than half the lease (see the module doc)
DEFAULT_POOL_WAIT = 10.0  # seconds; never more than half the delivery timeout

SmtpTls = Literal["starttls", "implicit", "none"]
PushAuth = Literal["cloud-run", "signature"]


@dataclass(frozen=True)
class SmtpConfig:
    """The relay the subscriber delivers to. The password never appears in ``repr``."""

    host: str = "127.0.0.1"
    port: int = 587
    tls: SmtpTls = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = 30.0
    pool_size: int = 4
    message_id_domain: str = "mailpipe.local"
    helo_name: str | None = None
    pool_wait: float = DEFAULT_POOL_WAIT  # seconds a send waits for a free pooled connection

    @classmethod
    def read(cls, env: EnvReader, *, default_pool_wait: float = DEFAULT_POOL_WAIT) -> SmtpConfig:
        tls = cast(
            SmtpTls, env.choice("MAILPIPE_SMTP_TLS", "starttls", ("starttls", "implicit", "none"))
        )
        username = env.raw("MAILPIPE_SMTP_USERNAME")
        password = env.raw("MAILPIPE_SMTP_PASSWORD")
        if (username is None) != (password is None):
            env.problems["MAILPIPE_SMTP_USERNAME"] = (
                "MAILPIPE_SMTP_USERNAME and MAILPIPE_SMTP_PASSWORD must be set together"
            )
        if (
            username is not None
            and tls == "none"
            and not env.raw("MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH")
        ):
            env.problems["MAILPIPE_SMTP_TLS"] = (
                "is 'none' but SMTP AUTH is configured: the password would cross the network in "
                "clear; use starttls or implicit (or set MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH=1 "
                "on loopback)"
            )
        default_port = {"starttls": 587, "implicit": 465, "none": 25}[tls]
        return cls(
            host=env.string("MAILPIPE_SMTP_HOST", "127.0.0.1"),
            port=env.integer("MAILPIPE_SMTP_PORT", default_port, minimum=1, maximum=65535),
            tls=tls,
            username=username,
            password=password,
            ca_file=env.path("MAILPIPE_SMTP_CA_FILE", must_exist=True),
            timeout=env.number("MAILPIPE_SMTP_TIMEOUT", 30.0, minimum=0.1, maximum=600.0),
            pool_size=env.integer("MAILPIPE_SMTP_POOL_SIZE", 4, minimum=1, maximum=256),
            message_id_domain=env.string("MAILPIPE_MESSAGE_ID_DOMAIN", "mailpipe.local"),
            helo_name=env.raw("MAILPIPE_SMTP_HELO_NAME"),
            pool_wait=env.number(
                "MAILPIPE_SMTP_POOL_WAIT", default_pool_wait, minimum=0.0, maximum=600.0
            ),
        )


def default_delivery_timeout(lease_seconds: float) -> float:
    """``MAILPIPE_DELIVERY_TIMEOUT``'s default: 60 s, or half the lease when that is shorter."""
    return min(DEFAULT_DELIVERY_TIMEOUT, lease_seconds / 2)


def default_pool_wait(delivery_timeout: float) -> float:
    """``MAILPIPE_SMTP_POOL_WAIT``'s default: 10 s, or half the delivery timeout if shorter."""
    return min(DEFAULT_POOL_WAIT, delivery_timeout / 2)


def _check_time_limits(
    env: EnvReader, pool_wait: float, delivery_timeout: float, lease: float
) -> None:
    """pool wait < delivery timeout < lease (see the module docstring), else a problem each."""
    if "MAILPIPE_DELIVERY_TIMEOUT" not in env.problems and not delivery_timeout < lease:
        env.problems["MAILPIPE_DELIVERY_TIMEOUT"] = (
            f"must be shorter than the delivery lease ({lease:g} s: "
            "MAILPIPE_DELIVERY_LEASE_SECONDS, by default the delivery subscription's ack "
            f"deadline), got {delivery_timeout:g}: a delivery still running when its lease ends "
            "can be sent a second time by a redelivered copy"
        )
    if "MAILPIPE_SMTP_POOL_WAIT" not in env.problems and not pool_wait < delivery_timeout:
        env.problems["MAILPIPE_SMTP_POOL_WAIT"] = (
            f"must be shorter than MAILPIPE_DELIVERY_TIMEOUT ({delivery_timeout:g} s), got "
            f"{pool_wait:g}: the wait for a pooled SMTP connection is part of the delivery's "
            "time budget, and time must be left to send"
        )


@dataclass(frozen=True)
class SubscriberConfig:
    """Everything the subscriber service (push endpoint or pull worker) needs."""

    pubsub: PubSubConfig
    smtp: SmtpConfig
    telemetry: TelemetryConfig
    record: str  # MAILPIPE_RECORD, default: mailpipe.config.DEFAULT_RECORD
    push_audience: str | None = None
    push_service_account: str | None = None
    # Who verifies the push token's signature: Cloud Run IAM in front ("cloud-run") or the app.
    push_auth: PushAuth = "signature"
    host: str = "127.0.0.1"
    port: int = 8080
    pull_max_messages: int = 100
    delivery_lease_seconds: float = 120.0
    http: HttpConfig = field(default_factory=HttpConfig)
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    # How the suppression list keys recipients (MAILPIPE_SUPPRESSION_KEY).
    suppressions: SuppressionPolicy = field(default_factory=SuppressionPolicy)
    retry_schedule: RetrySchedule = field(
        default_factory=lambda: RetrySchedule.parse(DEFAULT_RETRY_SCHEDULE)
    )

    @property
    def local_mode(self) -> bool:
        """True when talking to the Pub/Sub emulator, which never sends an OIDC token."""
        return self.pubsub.emulator_host is not None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], topology: Topology | None = None, *, push: bool = False
    ) -> SubscriberConfig:
        """``push=True`` for the push endpoint: outside local mode it then requires the push
        token's audience and service account."""
        env = EnvReader(environ)
        topology = topology or load_topology()
        pubsub = PubSubConfig.read(env, topology)
        push_audience = env.raw("MAILPIPE_PUSH_AUDIENCE")
        # How long a delivery's claim keeps others away: the ack deadline, after which
        # Pub/Sub may hand the message to another delivery anyway.
        lease = env.number(
            "MAILPIPE_DELIVERY_LEASE_SECONDS",
            float(topology.delivery_subscription.ack_deadline_seconds),
            minimum=1.0,
            maximum=600.0,
        )
        delivery_timeout = env.number(
            "MAILPIPE_DELIVERY_TIMEOUT",
            default_delivery_timeout(lease),
            minimum=0.1,
            maximum=600.0,
        )
        smtp = SmtpConfig.read(env, default_pool_wait=default_pool_wait(delivery_timeout))
        _check_time_limits(env, smtp.pool_wait, delivery_timeout, lease)
        push_auth = cast(
            PushAuth, env.choice("MAILPIPE_PUSH_AUTH", "signature", ("cloud-run", "signature"))
        )
        if push and pubsub.emulator_host is None:
            # Only the emulator sends pushes without a token; anywhere else the endpoint must know
            # which token to let in.
            for name in ("MAILPIPE_PUSH_AUDIENCE", "MAILPIPE_PUSH_SERVICE_ACCOUNT"):
                if env.raw(name) is None:
                    env.problems[name] = (
                        "is required for the push endpoint outside local mode "
                        "(PUBSUB_EMULATOR_HOST unset): the push subscription's OIDC token is "
                        "checked against it"
                    )
        try:
            schedule = RetrySchedule.parse(
                env.string(RETRY_SCHEDULE_VARIABLE, DEFAULT_RETRY_SCHEDULE)
            )
        except RetryScheduleError as exc:
            env.problems[RETRY_SCHEDULE_VARIABLE] = str(exc)
            schedule = RetrySchedule.parse(DEFAULT_RETRY_SCHEDULE)
        config = cls(
            retry_schedule=schedule,
            pubsub=pubsub,
            smtp=smtp,
            telemetry=TelemetryConfig.read(env, "mailpipe-subscriber"),
            record=read_record(env),
            push_audience=push_audience,
            push_service_account=env.raw("MAILPIPE_PUSH_SERVICE_ACCOUNT"),
            push_auth=push_auth,
            host=env.string("MAILPIPE_HTTP_HOST", "127.0.0.1"),
            port=env.integer("PORT", 8080, minimum=1, maximum=65535),
            pull_max_messages=env.integer(
                "MAILPIPE_PULL_MAX_MESSAGES", 100, minimum=1, maximum=10_000
            ),
            delivery_lease_seconds=lease,
            delivery_timeout=delivery_timeout,
            http=HttpConfig.read(env),
            suppressions=SuppressionPolicy.read(env),
        )
        env.finish()
        return config
