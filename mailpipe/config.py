"""Configuration: read once from the environment into frozen dataclasses.

Every service builds its config with ``XConfig.from_env(os.environ)`` at start-up and passes it to
its factory. Reading fails fast and reports **every** bad variable at once::

    ConfigError
    └── (one exception carrying {VARIABLE: what is wrong with it, ...})

Names are an interface (deploy configs set them): see docs/configuration.md.

The subscriber's time limits must nest, or a delivery could outlive its claim on the mail and a
redelivered copy be sent too (config fails fast otherwise)::

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

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast

from mailpipe.mail import ascii_domain
from mailpipe.topology import Topology, load_topology

DEFAULT_PROJECT = "mailpipe-local"
DEFAULT_DELIVERY_TIMEOUT = 60.0  # seconds; never more than half the lease (see the module doc)
DEFAULT_POOL_WAIT = 10.0  # seconds; never more than half the delivery timeout

SmtpTls = Literal["starttls", "implicit", "none"]
PushAuth = Literal["cloud-run", "signature"]
TraceMode = Literal["gcp", "otlp", "file", "none"]
AddressStyle = Literal["full", "domain", "hashed"]  # MAILPIPE_LOG_ADDRESSES, in logs and spans

_T = TypeVar("_T")


class ConfigError(ValueError):
    """One or more environment variables are missing or invalid.

    ``problems`` maps each variable name to a sentence saying what to fix.
    """

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(self.problems.items()))
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class _EnvReader:
    """Reads typed values from an environment mapping, collecting every problem."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: dict[str, str] = {}

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(name)
        if value is None:
            if required and default is None:
                self.problems[name] = "is required"
            return default or ""
        return value

    def _convert(self, name: str, default: _T, convert: Callable[[str], _T], kind: str) -> _T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return convert(value)
        except ValueError:
            self.problems[name] = f"must be {kind}, got {value!r}"
            return default

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        result = self._convert(name, default, int, "an integer")
        if name not in self.problems and not minimum <= result <= maximum:
            self.problems[name] = f"must be between {minimum} and {maximum}, got {result}"
        return result

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        result = self._convert(name, default, float, "a number")
        if name not in self.problems and not (
            math.isfinite(result) and minimum <= result <= maximum
        ):
            self.problems[name] = f"must be between {minimum} and {maximum}, got {result}"
        return result

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            self.problems[name] = f"must be one of {', '.join(choices)}; got {value!r}"
            return default
        return value

    def path(self, name: str, *, must_exist: bool = False) -> Path | None:
        value = self.raw(name)
        if value is None:
            return None
        path = Path(value)
        if must_exist and not path.is_file():
            self.problems[name] = f"names a file that does not exist: {value}"
        return path

    def finish(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


@dataclass(frozen=True)
class TelemetryConfig:
    """Where traces and metrics go (``MAILPIPE_TRACES`` and friends)."""

    service_name: str
    traces: TraceMode = "none"
    trace_file: Path | None = None
    sample_ratio: float = 1.0
    otlp_endpoint: str | None = None
    metrics_port: int | None = None
    address_style: AddressStyle = "domain"

    @classmethod
    def read(cls, env: _EnvReader, service_name: str) -> TelemetryConfig:
        traces = cast(
            TraceMode, env.choice("MAILPIPE_TRACES", "none", ("gcp", "otlp", "file", "none"))
        )
        trace_file = env.path("MAILPIPE_TRACE_FILE")
        if traces == "file" and trace_file is None:
            env.problems["MAILPIPE_TRACE_FILE"] = "is required when MAILPIPE_TRACES=file"
        metrics_port_text = env.raw("MAILPIPE_METRICS_PORT")
        metrics_port = (
            env.integer("MAILPIPE_METRICS_PORT", 0, minimum=1, maximum=65535)
            if metrics_port_text
            else None
        )
        return cls(
            service_name=service_name,
            traces=traces,
            trace_file=trace_file,
            sample_ratio=env.number("MAILPIPE_TRACE_SAMPLE_RATIO", 1.0, minimum=0.0, maximum=1.0),
            otlp_endpoint=env.raw("OTEL_EXPORTER_OTLP_ENDPOINT"),
            metrics_port=metrics_port,
            address_style=cast(
                AddressStyle,
                env.choice("MAILPIPE_LOG_ADDRESSES", "domain", ("full", "domain", "hashed")),
            ),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], service_name: str) -> TelemetryConfig:
        env = _EnvReader(environ)
        config = cls.read(env, service_name)
        env.finish()
        return config


@dataclass(frozen=True)
class PubSubConfig:
    """Which project, topic and subscriptions this process talks to."""

    project: str
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str
    dead_letter_record_subscription: str = ""
    emulator_host: str | None = None

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def dead_letter_subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.dead_letter_subscription}"

    @property
    def dead_letter_record_subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.dead_letter_record_subscription}"

    @classmethod
    def read(cls, env: _EnvReader, topology: Topology) -> PubSubConfig:
        return cls(
            project=env.string("GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT),
            topic=env.string("MAILPIPE_TOPIC", topology.mail_topic.name),
            subscription=env.string("MAILPIPE_SUBSCRIPTION", topology.delivery_subscription.name),
            dead_letter_topic=env.string(
                "MAILPIPE_DEAD_LETTER_TOPIC", topology.dead_letter_topic.name
            ),
            dead_letter_subscription=env.string(
                "MAILPIPE_DEAD_LETTER_SUBSCRIPTION", topology.dead_letter_subscription.name
            ),
            dead_letter_record_subscription=env.string(
                "MAILPIPE_DEAD_LETTER_RECORD_SUBSCRIPTION",
                topology.dead_letter_record_subscription.name,
            ),
            emulator_host=env.raw("PUBSUB_EMULATOR_HOST"),
        )


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
    def read(cls, env: _EnvReader, *, default_pool_wait: float = DEFAULT_POOL_WAIT) -> SmtpConfig:
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


@dataclass(frozen=True)
class HttpConfig:
    """How gunicorn treats slow and idle clients (both services; see mailpipe.serving)."""

    read_timeout: float = 30.0  # from a request's first byte to its last
    keepalive_timeout: int = 5  # an idle kept-alive (or silent new) connection is closed after

    @classmethod
    def read(cls, env: _EnvReader) -> HttpConfig:
        return cls(
            read_timeout=env.number(
                "MAILPIPE_HTTP_READ_TIMEOUT", 30.0, minimum=0.5, maximum=3600.0
            ),
            keepalive_timeout=env.integer(
                "MAILPIPE_HTTP_KEEPALIVE_TIMEOUT", 5, minimum=1, maximum=3600
            ),
        )


def _read_record(env: _EnvReader, default: str) -> str:
    record = env.string("MAILPIPE_RECORD", default)
    if not (record.startswith("sqlite:///") or record.startswith("firestore://")):
        env.problems["MAILPIPE_RECORD"] = (
            f"must be sqlite:///PATH or firestore://DATABASE, got {record!r}"
        )
    return record


DEFAULT_RECORD = "sqlite:///.mailpipe/record.sqlite3"


def default_delivery_timeout(lease_seconds: float) -> float:
    """``MAILPIPE_DELIVERY_TIMEOUT``'s default: 60 s, or half the lease when that is shorter."""
    return min(DEFAULT_DELIVERY_TIMEOUT, lease_seconds / 2)


def default_pool_wait(delivery_timeout: float) -> float:
    """``MAILPIPE_SMTP_POOL_WAIT``'s default: 10 s, or half the delivery timeout if shorter."""
    return min(DEFAULT_POOL_WAIT, delivery_timeout / 2)


def _check_time_limits(
    env: _EnvReader, pool_wait: float, delivery_timeout: float, lease: float
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


def _read_sender_domains(env: _EnvReader) -> frozenset[str] | None:
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


@dataclass(frozen=True)
class PublisherConfig:
    """Everything the publisher service needs."""

    pubsub: PubSubConfig
    telemetry: TelemetryConfig
    record: str = DEFAULT_RECORD
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

    def sender_allowed(self, domain: str) -> bool:
        """Whether a From address at ``domain`` may be sent (a valid domain, any form)."""
        if self.allowed_sender_domains is None:
            return True
        return ascii_domain(domain) in self.allowed_sender_domains

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], topology: Topology | None = None
    ) -> PublisherConfig:
        env = _EnvReader(environ)
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
            record=_read_record(env, DEFAULT_RECORD),
            host=env.string("MAILPIPE_HTTP_HOST", "127.0.0.1"),
            port=env.integer("PORT", 8080, minimum=1, maximum=65535),
            publish_timeout=publish_timeout,
            idempotency_reservation_seconds=reservation,
            reconcile_grace_seconds=env.number(
                "MAILPIPE_RECONCILE_GRACE_SECONDS", 900.0, minimum=0.0, maximum=604_800.0
            ),
            http=HttpConfig.read(env),
            allowed_sender_domains=_read_sender_domains(env),
        )
        env.finish()
        return config


@dataclass(frozen=True)
class SubscriberConfig:
    """Everything the subscriber service (push endpoint or pull worker) needs."""

    pubsub: PubSubConfig
    smtp: SmtpConfig
    telemetry: TelemetryConfig
    record: str = DEFAULT_RECORD
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
        env = _EnvReader(environ)
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
        config = cls(
            pubsub=pubsub,
            smtp=smtp,
            telemetry=TelemetryConfig.read(env, "mailpipe-subscriber"),
            record=_read_record(env, DEFAULT_RECORD),
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
        )
        env.finish()
        return config
