"""Configuration read once from the environment into frozen dataclasses: the shared parts of
``publisher/config.py`` and ``subscriber/config.py``. One :class:`EnvReader` collects every problem,
so a bad start reports every bad variable at once (the names: docs/configuration.md)::

    ConfigError
    └── (one exception carrying {VARIABLE: what is wrong with it, ...})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, cast, get_args

from mailpipe.topology import Topology

DEFAULT_PROJECT = "mailpipe-local"
DEFAULT_RECORD = "sqlite:///.mailpipe/record.sqlite3"

TraceMode = Literal["gcp", "otlp", "file", "none"]
AddressStyle = Literal["full", "domain", "hashed"]  # MAILPIPE_LOG_ADDRESSES, in logs and spans

_D = TypeVar("_D")
_N = TypeVar("_N", int, float)


class ConfigError(ValueError):
    """Environment variables are missing or invalid; ``problems``: {name: what to fix}."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(self.problems.items()))
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class EnvReader:
    """Reads typed values from an environment mapping, collecting every problem."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: dict[str, str] = {}

    def raw(self, name: str) -> str | None:
        return (self.environ.get(name) or "").strip() or None

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw(name)
        if value is None and required and default is None:
            self.problems[name] = "is required"
        return value or default or ""

    def _bounded(
        self, name: str, default: _D, convert: Callable[[str], _N], minimum: _N, maximum: _N
    ) -> _N | _D:
        value = self.raw(name)
        if value is None:
            return default
        try:
            result = convert(value)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            self.problems[name] = f"must be {kind}, got {value!r}"
            return default
        if not minimum <= result <= maximum:  # also refuses nan and inf
            self.problems[name] = f"must be between {minimum} and {maximum}, got {result}"
        return result

    def integer(self, name: str, default: _D, *, minimum: int, maximum: int) -> int | _D:
        return self._bounded(name, default, int, minimum, maximum)

    def number(self, name: str, default: _D, *, minimum: float, maximum: float) -> float | _D:
        return self._bounded(name, default, float, minimum, maximum)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            self.problems[name] = f"must be one of {', '.join(choices)}; got {value!r}"
            return default
        return value

    def path(self, name: str, *, must_exist: bool = False) -> Path | None:
        value = self.raw(name)
        if value is not None and must_exist and not Path(value).is_file():
            self.problems[name] = f"names a file that does not exist: {value}"
        return None if value is None else Path(value)

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
    def read(cls, env: EnvReader, service_name: str) -> TelemetryConfig:
        traces = cast(TraceMode, env.choice("MAILPIPE_TRACES", "none", get_args(TraceMode)))
        style = env.choice("MAILPIPE_LOG_ADDRESSES", "domain", get_args(AddressStyle))
        trace_file = env.path("MAILPIPE_TRACE_FILE")
        if traces == "file" and trace_file is None:
            env.problems["MAILPIPE_TRACE_FILE"] = "is required when MAILPIPE_TRACES=file"
        return cls(
            service_name=service_name,
            traces=traces,
            trace_file=trace_file,
            sample_ratio=env.number("MAILPIPE_TRACE_SAMPLE_RATIO", 1.0, minimum=0.0, maximum=1.0),
            otlp_endpoint=env.raw("OTEL_EXPORTER_OTLP_ENDPOINT"),
            metrics_port=env.integer("MAILPIPE_METRICS_PORT", None, minimum=1, maximum=65535),
            address_style=cast(AddressStyle, style),
        )


@dataclass(frozen=True)
class PubSubConfig:
    """Which project, topic and subscriptions this process talks to."""

    project: str
    topic: str
    subscription: str
    dead_letter_record_subscription: str = ""
    emulator_host: str | None = None

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def dead_letter_record_subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.dead_letter_record_subscription}"

    @classmethod
    def read(cls, env: EnvReader, topology: Topology) -> PubSubConfig:
        return cls(
            project=env.string("GOOGLE_CLOUD_PROJECT", DEFAULT_PROJECT),
            topic=env.string("MAILPIPE_TOPIC", topology.mail_topic.name),
            subscription=env.string("MAILPIPE_SUBSCRIPTION", topology.delivery_subscription.name),
            dead_letter_record_subscription=env.string(
                "MAILPIPE_DEAD_LETTER_RECORD_SUBSCRIPTION",
                topology.dead_letter_record_subscription.name,
            ),
            emulator_host=env.raw("PUBSUB_EMULATOR_HOST"),
        )


@dataclass(frozen=True)
class HttpConfig:
    """How gunicorn treats slow and idle clients (both services; see mailpipe.serving)."""

    read_timeout: float = 30.0  # from a request's first byte to its last
    keepalive_timeout: int = 5  # an idle kept-alive (or silent new) connection is closed after

    @classmethod
    def read(cls, env: EnvReader) -> HttpConfig:
        read_timeout = env.number("MAILPIPE_HTTP_READ_TIMEOUT", 30.0, minimum=0.5, maximum=3600.0)
        keepalive = env.integer("MAILPIPE_HTTP_KEEPALIVE_TIMEOUT", 5, minimum=1, maximum=3600)
        return cls(read_timeout=read_timeout, keepalive_timeout=keepalive)


def read_record(env: EnvReader) -> str:
    """``MAILPIPE_RECORD``: where the delivery record is kept."""
    record = env.string("MAILPIPE_RECORD", DEFAULT_RECORD)
    if not (record.startswith("sqlite:///") or record.startswith("firestore://")):
        env.problems["MAILPIPE_RECORD"] = (
            f"must be sqlite:///PATH or firestore://DATABASE, got {record!r}"
        )
    return record
