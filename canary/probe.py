"""The canary: send a probe mail through the publisher, read it back from a real mailbox over IMAP.

A pipeline can answer 202 and even get a 250 from the relay while mail still does not reach
inboxes. :class:`Canary` measures what a user feels:

1. **Poll session** (in the canary's own trace, root span ``canary probe``): connect (``imaps``,
   ``starttls`` or ``none``), log in and select the mailbox *before* sending, so an unreachable
   server, a TLS failure, a refused login or a missing mailbox never leave a stray probe behind.
2. **Send** (``canary send``, CLIENT): ``POST /v1/messages`` to the configured mailbox address.
3. **Wait** (``canary wait``): ``NOOP`` + ``UID SEARCH HEADER Message-ID <mail_id@domain>`` every
   ``poll_interval`` until the probe is visible or ``deadline`` passes; meanwhile the delivery
   record (``GET /v1/messages/ID``) is read so a bounce ends the wait early and a timeout reports
   the record's last status. Once found, the probe's headers are fetched and the session logs out.
4. **Read** (``canary read``, a CHILD of the context in the probe's ``traceparent`` header, i.e. of
   the subscriber's ``mail deliver`` span): a second session does what a mail client does —
   connect, login, select, search, fetch the whole mail — then deletes the probe (``store``
   ``\\Deleted`` + ``expunge``) and logs out. So the mail's own trace reads
   ``POST /v1/messages → <topic> create → mail deliver → smtp … → canary read → imap …``. The
   ``canary probe`` span gets a link to that context, and ``canary read`` a link back.

Every IMAP command is a CLIENT span ``imap <step>`` (``server.address``, ``server.port``,
``imap.step``, ``mailpipe.canary.phase`` = ``poll`` | ``read``) and one sample of
``mailpipe.canary.imap.step.duration``. Never the password, never the mail's body.

Metrics (instruments of this module; names are an interface, alerts query them)::

    mailpipe.canary.runs                counter    one per run, attribute mailpipe.canary.outcome
    mailpipe.canary.time_to_inbox       histogram  s, probe request sent → visible in the mailbox
    mailpipe.canary.imap.step.duration  histogram  s, attributes imap.step, mailpipe.canary.phase,
                                                   error.type (only when the step failed)

``time_to_inbox`` and the ``read`` step samples are recorded in the mail's trace context, so an
OTLP backend shows exemplars pointing at the mail's trace.

Outcomes (:class:`Outcome`) and their exit codes (the CLI returns them)::

    ok                 0   the probe was seen in the mailbox, read and deleted
    publish_failed    10   the publisher could not be reached or did not answer 202
    imap_unavailable  11   the IMAP server could not be reached (refused, unreachable, timed out)
    tls_failed        12   TLS handshake or certificate check failed, or STARTTLS not offered
    login_refused     13   the IMAP server refused the credentials
    mailbox_missing   14   SELECT of the mailbox failed (it does not exist)
    not_delivered     15   the deadline passed (or the record says bounced) without the probe
                           arriving; the message has the record's last status and error
    imap_error        16   any other IMAP failure: unexpected answer, connection lost mid-session

Errors (IMAP, socket and TLS exceptions are translated in one place, :func:`_translate`)::

    CanaryError                 .outcome, .exit_code
    ├── PublishFailed           the publisher's API failed (client.ApiError)
    ├── ImapUnavailable
    ├── ImapTlsFailed
    ├── ImapLoginRefused
    ├── MailboxMissing
    ├── ProbeNotDelivered       .record_status, .last_error
    └── ImapProtocolError
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email
import enum
import imaplib
import ipaddress
import re
import secrets
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, cast

import requests
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from client import (
    DEFAULT_URL,
    Accepted,
    ApiError,
    PublisherApi,
    google_id_token_auth,
    no_auth,
)
from mailpipe.attributes import (
    MAIL_TRACEPARENT_HEADER,
    SERVER_ADDRESS,
    SERVER_PORT,
    SPAN_MAIL_ID,
    context_from_traceparent,
)
from mailpipe.config import TelemetryConfig, _EnvReader
from mailpipe.telemetry import METER_NAME, Telemetry

ImapTls = Literal["imaps", "starttls", "none"]
Phase = Literal["poll", "read"]

DEFAULT_PORTS: dict[str, int] = {"imaps": 993, "starttls": 143, "none": 143}
CANARY_HEADER = "X-Mailpipe-Canary"

# Attribute keys.
ATTR_OUTCOME = "mailpipe.canary.outcome"
ATTR_PHASE = "mailpipe.canary.phase"
ATTR_IMAP_STEP = "imap.step"
ATTR_ERROR_TYPE = "error.type"

IMAP_STEPS = frozenset(
    {"connect", "starttls", "login", "select", "noop", "search", "fetch", "store", "expunge"}
    | {"logout"}
)
STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
TIME_TO_INBOX_BUCKETS = (
    0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip

_MAX_SERVER_TEXT = 200


class Outcome(enum.StrEnum):
    OK = "ok"
    PUBLISH_FAILED = "publish_failed"
    IMAP_UNAVAILABLE = "imap_unavailable"
    TLS_FAILED = "tls_failed"
    LOGIN_REFUSED = "login_refused"
    MAILBOX_MISSING = "mailbox_missing"
    NOT_DELIVERED = "not_delivered"
    IMAP_ERROR = "imap_error"

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    Outcome.OK: 0,
    Outcome.PUBLISH_FAILED: 10,
    Outcome.IMAP_UNAVAILABLE: 11,
    Outcome.TLS_FAILED: 12,
    Outcome.LOGIN_REFUSED: 13,
    Outcome.MAILBOX_MISSING: 14,
    Outcome.NOT_DELIVERED: 15,
    Outcome.IMAP_ERROR: 16,
}


# --- errors --------------------------------------------------------------------------------------


class CanaryError(Exception):
    """A canary run failed; ``outcome`` says how (and gives the exit code)."""

    outcome: Outcome = Outcome.IMAP_ERROR

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code


class PublishFailed(CanaryError):
    outcome = Outcome.PUBLISH_FAILED


class ImapUnavailable(CanaryError):
    outcome = Outcome.IMAP_UNAVAILABLE


class ImapTlsFailed(CanaryError):
    outcome = Outcome.TLS_FAILED


class ImapLoginRefused(CanaryError):
    outcome = Outcome.LOGIN_REFUSED


class MailboxMissing(CanaryError):
    outcome = Outcome.MAILBOX_MISSING


class ImapProtocolError(CanaryError):
    outcome = Outcome.IMAP_ERROR


class ProbeNotDelivered(CanaryError):
    outcome = Outcome.NOT_DELIVERED

    def __init__(self, message: str, *, record_status: str | None, last_error: str | None) -> None:
        super().__init__(message)
        self.record_status = record_status
        self.last_error = last_error


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryConfig:
    """Everything a canary run needs. The password never appears in ``repr``."""

    imap_host: str
    imap_user: str
    imap_password: str = field(repr=False)
    to: str
    publisher_url: str = DEFAULT_URL
    sender: str = ""  # "" = the mailbox's own address
    imap_port: int = 993
    imap_tls: ImapTls = "imaps"
    imap_ca_file: Path | None = None
    mailbox: str = "INBOX"
    deadline: float = 300.0
    poll_interval: float = 2.0
    imap_timeout: float = 30.0
    message_id_domain: str = "mailpipe.local"
    publisher_auth: Literal["none", "google"] = "none"
    telemetry: TelemetryConfig = field(
        default_factory=lambda: TelemetryConfig(service_name="mailpipe-canary")
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> CanaryConfig:
        """Read ``MAILPIPE_CANARY_*`` (and ``MAILPIPE_URL``, ``MAILPIPE_MESSAGE_ID_DOMAIN``,
        the telemetry variables); raise :class:`~mailpipe.config.ConfigError` listing every
        problem."""
        env = _EnvReader(environ)
        tls = cast(
            ImapTls,
            env.choice("MAILPIPE_CANARY_IMAP_TLS", "imaps", ("imaps", "starttls", "none")),
        )
        host = env.string("MAILPIPE_CANARY_IMAP_HOST", required=True)
        user = env.string("MAILPIPE_CANARY_IMAP_USER", required=True)
        password = env.raw("MAILPIPE_CANARY_IMAP_PASSWORD")
        if password is None:
            missing = "is required (on GCP it comes from Secret Manager)"
            env.problems["MAILPIPE_CANARY_IMAP_PASSWORD"] = missing
        to = env.raw("MAILPIPE_CANARY_TO") or (user if "@" in user else "")
        if not to:
            env.problems["MAILPIPE_CANARY_TO"] = (
                "is required: the address of the mailbox the canary reads (it defaults to "
                "MAILPIPE_CANARY_IMAP_USER only when that is an address)"
            )
        if tls == "none" and host and not _is_loopback(host):
            env.problems["MAILPIPE_CANARY_IMAP_TLS"] = (
                f"is 'none' for {host}: the IMAP password would cross the network in clear; "
                "use imaps or starttls (none is only allowed for a loopback server)"
            )
        domain = env.string("MAILPIPE_MESSAGE_ID_DOMAIN", "mailpipe.local")
        publisher_url = env.string("MAILPIPE_URL", DEFAULT_URL).rstrip("/")
        if not re.match(r"^https?://[^\s/]+", publisher_url):
            env.problems["MAILPIPE_URL"] = f"must be an http(s) URL, got {publisher_url!r}"
        poll_interval = env.number(
            "MAILPIPE_CANARY_POLL_INTERVAL", 2.0, minimum=0.05, maximum=300.0
        )
        config = cls(
            imap_host=host,
            imap_user=user,
            imap_password=password or "",
            to=to,
            publisher_url=publisher_url,
            sender=env.raw("MAILPIPE_CANARY_FROM") or to,  # to itself by default
            imap_port=env.integer(
                "MAILPIPE_CANARY_IMAP_PORT", DEFAULT_PORTS[tls], minimum=1, maximum=65535
            ),
            imap_tls=tls,
            imap_ca_file=env.path("MAILPIPE_CANARY_IMAP_CA_FILE", must_exist=True),
            mailbox=env.string("MAILPIPE_CANARY_MAILBOX", "INBOX"),
            deadline=env.number("MAILPIPE_CANARY_DEADLINE", 300.0, minimum=1.0, maximum=86400.0),
            poll_interval=poll_interval,
            imap_timeout=env.number(
                "MAILPIPE_CANARY_IMAP_TIMEOUT", 30.0, minimum=0.1, maximum=600.0
            ),
            message_id_domain=domain,
            publisher_auth=cast(
                Literal["none", "google"],
                env.choice("MAILPIPE_CANARY_PUBLISHER_AUTH", "none", ("none", "google")),
            ),
            telemetry=TelemetryConfig.read(env, "mailpipe-canary"),
        )
        env.finish()
        return config


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- metrics -------------------------------------------------------------------------------------


class CanaryMetrics:
    """The canary's instruments, on the meter :func:`mailpipe.telemetry.setup_telemetry` built."""

    def __init__(self, meter: Meter) -> None:
        self._runs = meter.create_counter(
            "mailpipe.canary.runs",
            unit="{run}",
            description="Canary runs, by outcome (attribute mailpipe.canary.outcome).",
        )
        self._time_to_inbox = meter.create_histogram(
            "mailpipe.canary.time_to_inbox",
            unit="s",
            description="Time from sending the probe mail to seeing it in the mailbox over IMAP.",
            explicit_bucket_boundaries_advisory=TIME_TO_INBOX_BUCKETS,
        )
        self._step = meter.create_histogram(
            "mailpipe.canary.imap.step.duration",
            unit="s",
            description="Duration of one IMAP command of the canary (attribute imap.step).",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS,
        )

    def run(self, outcome: Outcome) -> None:
        self._runs.add(1, {ATTR_OUTCOME: str(outcome)})

    def time_to_inbox(self, seconds: float, context: Context | None = None) -> None:
        self._time_to_inbox.record(max(0.0, seconds), context=context)

    def imap_step(
        self, step: str, phase: Phase, seconds: float, *, error_type: str | None = None
    ) -> None:
        attributes = {ATTR_IMAP_STEP: step if step in IMAP_STEPS else "other", ATTR_PHASE: phase}
        if error_type is not None:
            attributes[ATTR_ERROR_TYPE] = error_type
        self._step.record(max(0.0, seconds), attributes)


# --- the publisher -------------------------------------------------------------------------------


def _read_record(publisher: PublisherApi, mail_id: str) -> dict[str, Any] | None:
    """The delivery record, or None when it cannot be read: the mailbox decides, the record
    only explains."""
    try:
        return publisher.record(mail_id)
    except ApiError:
        return None


# --- IMAP ----------------------------------------------------------------------------------------


def _clip(text: object) -> str:
    """Server text for a message: one line, bounded (no header/log injection)."""
    if isinstance(text, list | tuple):
        text = b" ".join(t if isinstance(t, bytes) else str(t).encode() for t in text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = re.sub(r"[\r\n\t]+", " ", str(text)).strip()
    return line[:_MAX_SERVER_TEXT] + ("…" if len(line) > _MAX_SERVER_TEXT else "")


@contextlib.contextmanager
def _translate(step: str, server: str) -> Iterator[None]:
    """The one place where imaplib, ssl and socket errors become :class:`CanaryError`."""
    try:
        yield
    except CanaryError:
        raise
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise ImapTlsFailed(f"TLS with {server} failed at {step}: {_clip(exc)}") from exc
    except imaplib.IMAP4.abort as exc:
        raise ImapProtocolError(
            f"the IMAP connection to {server} broke at {step}: {_clip(exc)}"
        ) from exc
    except imaplib.IMAP4.error as exc:
        if step == "login":
            raise ImapLoginRefused(
                f"{server} refused the login of the canary's user: {_clip(exc)}"
            ) from exc
        if step == "starttls":
            raise ImapTlsFailed(f"STARTTLS with {server} failed: {_clip(exc)}") from exc
        raise ImapProtocolError(f"IMAP {step} on {server} failed: {_clip(exc)}") from exc
    except TimeoutError as exc:
        if step == "connect":
            raise ImapUnavailable(f"connecting to {server} timed out") from exc
        raise ImapProtocolError(f"{server} did not answer {step} in time") from exc
    except OSError as exc:
        if step == "connect":
            reason = exc.strerror or type(exc).__name__
            raise ImapUnavailable(f"cannot connect to the IMAP server {server}: {reason}") from exc
        raise ImapProtocolError(
            f"the IMAP connection to {server} failed at {step}: {exc.strerror or exc}"
        ) from exc


ImapConnect = Callable[["CanaryConfig", ssl.SSLContext | None, float], imaplib.IMAP4]


def connect_imap(config: CanaryConfig, context: ssl.SSLContext | None, timeout: float) -> Any:
    """An imaplib connection in ``config.imap_tls`` mode (``starttls`` is a separate step)."""
    if config.imap_tls == "imaps":
        return imaplib.IMAP4_SSL(
            config.imap_host, config.imap_port, ssl_context=context, timeout=timeout
        )
    return imaplib.IMAP4(config.imap_host, config.imap_port, timeout=timeout)


def _quote(mailbox: str) -> str:
    """An IMAP quoted string (mailbox names may contain spaces)."""
    if any(c in mailbox for c in "\r\n\0"):
        raise ValueError("a mailbox name cannot contain CR, LF or NUL")
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class _StepTiming:
    phase: Phase
    step: str
    seconds: float
    ok: bool


class ImapSession:
    """One IMAP connection whose every command is a step: a CLIENT span + a histogram sample."""

    def __init__(
        self,
        config: CanaryConfig,
        *,
        phase: Phase,
        tracer: Tracer,
        metrics: CanaryMetrics,
        timings: list[_StepTiming],
        connect: ImapConnect = connect_imap,
    ) -> None:
        self._config = config
        self._phase = phase
        self._tracer = tracer
        self._metrics = metrics
        self._timings = timings
        self._connect = connect
        self._conn: Any = None
        self.server = f"{config.imap_host}:{config.imap_port}"

    # -- steps ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, step: str) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            f"imap {step}",
            kind=SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if span.is_recording():
                span.set_attribute(SERVER_ADDRESS, self._config.imap_host)
                span.set_attribute(SERVER_PORT, self._config.imap_port)
                span.set_attribute(ATTR_IMAP_STEP, step)
                span.set_attribute(ATTR_PHASE, self._phase)
            started = time.perf_counter()
            error: CanaryError | None = None
            try:
                with _translate(step, self.server):
                    yield span
            except CanaryError as exc:
                error = exc
                if span.is_recording():
                    span.set_attribute(ATTR_ERROR_TYPE, str(exc.outcome))
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            finally:
                seconds = time.perf_counter() - started
                self._timings.append(_StepTiming(self._phase, step, seconds, error is None))
                self._metrics.imap_step(
                    step,
                    self._phase,
                    seconds,
                    error_type=str(error.outcome) if error is not None else None,
                )

    def _check(self, step: str, typ: str, data: Any) -> Any:
        if typ != "OK":
            raise imaplib.IMAP4.error(f"{step} answered {typ}: {_clip(data)}")
        return data

    def open(self) -> None:
        """connect (+ starttls), login, select."""
        config = self._config
        context = None
        if config.imap_tls != "none":
            context = ssl.create_default_context(
                cafile=str(config.imap_ca_file) if config.imap_ca_file else None
            )
        with self._step("connect"):
            self._conn = self._connect(config, context, config.imap_timeout)
        if config.imap_tls == "starttls":
            with self._step("starttls"):
                if "STARTTLS" not in self._conn.capabilities:
                    raise ImapTlsFailed(f"{self.server} does not offer STARTTLS")
                self._check("starttls", *self._conn.starttls(ssl_context=context))
        with self._step("login"):
            self._check("login", *self._conn.login(config.imap_user, config.imap_password))
        with self._step("select") as span:
            typ, data = self._conn.select(_quote(config.mailbox))
            if typ != "OK":
                raise MailboxMissing(
                    f"cannot select mailbox {config.mailbox!r} on {self.server}: {_clip(data)}"
                )
            if span.is_recording():
                span.set_attribute("imap.mailbox.exists", int(data[0] or 0))

    def noop(self) -> None:
        """Let the server report mail that arrived since the last command."""
        with self._step("noop"):
            self._check("noop", *self._conn.noop())

    def search_message_id(self, message_id: str) -> list[bytes]:
        """UIDs of the mails whose Message-ID header contains ``message_id``."""
        with self._step("search") as span:
            data = self._check(
                "search", *self._conn.uid("SEARCH", None, "HEADER", "Message-ID", message_id)
            )
            uids = (data[0] or b"").split() if data else []
            if span.is_recording():
                span.set_attribute("imap.search.matches", len(uids))
            return cast(list[bytes], uids)

    def fetch(self, uid: bytes, *, headers_only: bool) -> EmailMessage:
        """The mail (or only its headers) without setting ``\\Seen``."""
        what = "BODY.PEEK[HEADER]" if headers_only else "BODY.PEEK[]"
        with self._step("fetch") as span:
            data = self._check("fetch", *self._conn.uid("FETCH", uid, f"({what})"))
            raw = next((part[1] for part in data if isinstance(part, tuple)), None)
            if raw is None:
                raise ImapProtocolError(f"FETCH of UID {uid.decode()} returned no message")
            if span.is_recording():
                span.set_attribute("imap.fetch.bytes", len(raw))
            message: EmailMessage = email.message_from_bytes(raw, policy=policy.default)
            return message

    def delete(self, uid: bytes) -> None:
        with self._step("store"):
            self._check("store", *self._conn.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)"))
        with self._step("expunge"):
            if "UIDPLUS" in self._conn.capabilities:
                self._check("expunge", *self._conn.uid("EXPUNGE", uid))
            else:
                self._check("expunge", *self._conn.expunge())

    def logout(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with self._step("logout"):
            conn.logout()

    def abandon(self) -> None:
        """Close the socket without a LOGOUT (after an error); never raises."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.shutdown()


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryResult:
    """What one canary run found. Times are seconds after the probe request was sent."""

    outcome: Outcome
    message: str
    mail_id: str | None = None
    trace_id: str | None = None  # the probe mail's trace (publisher's request)
    canary_trace_id: str | None = None  # the canary's own trace (``canary probe``)
    accepted_after: float | None = None  # the publisher's 202
    delivered_after: float | None = None  # the relay's 250 (record's delivered_at)
    visible_after: float | None = None  # seen in the mailbox = time to inbox
    record_status: str | None = None
    steps: tuple[_StepTiming, ...] = ()

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def to_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {
            "outcome": str(self.outcome),
            "exit_code": self.exit_code,
            "message": self.message,
            "mail_id": self.mail_id,
            "trace_id": self.trace_id,
            "canary_trace_id": self.canary_trace_id,
            "accepted_after_s": rounded(self.accepted_after),
            "delivered_after_s": rounded(self.delivered_after),
            "visible_after_s": rounded(self.visible_after),
            "record_status": self.record_status,
            "imap_steps": [
                {"phase": s.phase, "step": s.step, "seconds": rounded(s.seconds), "ok": s.ok}
                for s in self.steps
            ],
        }


@dataclass
class _Found:
    uid: bytes
    mail_context: Context | None
    visible_after: float


class Canary:
    """Runs probes. Collaborators are injected; :meth:`run` never raises a :class:`CanaryError`."""

    def __init__(
        self,
        config: CanaryConfig,
        *,
        publisher: PublisherApi,
        tracer: Tracer,
        metrics: CanaryMetrics,
        connect: ImapConnect = connect_imap,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = config
        self._publisher = publisher
        self._tracer = tracer
        self._metrics = metrics
        self._connect = connect
        self._sleep = sleep

    def probe_mail(self, token: str) -> dict[str, Any]:
        """The probe's request body (no secrets; a token so each run's subject is unique)."""
        return {
            "from": self._config.sender or self._config.to,
            "to": [self._config.to],
            "subject": f"mailpipe canary {token}",
            "text": (
                "This is a mailpipe canary probe. It measures the time from the API request to "
                "this mailbox and deletes itself once seen.\n"
            ),
            "headers": {CANARY_HEADER: token},
            "metadata": {"canary": True},
        }

    def run(self) -> CanaryResult:
        timings: list[_StepTiming] = []
        state: dict[str, Any] = {}
        with self._tracer.start_as_current_span("canary probe") as root:
            canary_trace_id = trace.format_trace_id(root.get_span_context().trace_id)
            try:
                result = self._run(root, timings, state)
            except CanaryError as exc:
                result = CanaryResult(
                    outcome=exc.outcome,
                    message=str(exc),
                    record_status=getattr(exc, "record_status", None),
                    **state,
                )
                root.set_status(Status(StatusCode.ERROR, str(exc)))
            root.set_attribute(ATTR_OUTCOME, str(result.outcome))
            if result.mail_id:
                root.set_attribute(SPAN_MAIL_ID, result.mail_id)
        self._metrics.run(result.outcome)
        return _with(result, canary_trace_id=canary_trace_id, steps=tuple(timings))

    def _run(self, root: Span, timings: list[_StepTiming], state: dict[str, Any]) -> CanaryResult:
        config = self._config
        poll = ImapSession(
            config,
            phase="poll",
            tracer=self._tracer,
            metrics=self._metrics,
            timings=timings,
            connect=self._connect,
        )
        try:
            poll.open()  # before sending: an IMAP problem must not leave a stray probe behind
            sent_wall = time.time()
            sent = time.monotonic()
            accepted = self._send()
            state.update(mail_id=accepted.mail_id, trace_id=accepted.trace_id)
            state["accepted_after"] = time.monotonic() - sent
            message_id = f"<{accepted.mail_id}@{config.message_id_domain}>"
            found = self._wait(poll, accepted.mail_id, message_id, sent)
            state["visible_after"] = found.visible_after
            poll.logout()
        except CanaryError:
            poll.abandon()
            raise
        if found.mail_context is not None:
            root.add_link(trace.get_current_span(found.mail_context).get_span_context())
        self._metrics.time_to_inbox(found.visible_after, context=found.mail_context)

        record = _read_record(self._publisher, accepted.mail_id) or {}
        delivered_after = _seconds_after(record.get("delivered_at"), sent_wall)
        state.update(delivered_after=delivered_after)
        self._read(root, message_id, found, timings)
        return CanaryResult(
            outcome=Outcome.OK,
            message=(
                f"probe {accepted.mail_id} visible in {config.mailbox} after "
                f"{found.visible_after:.2f} s"
            ),
            record_status=record.get("status"),
            **state,
        )

    def _send(self) -> Accepted:
        token = secrets.token_hex(8)
        with self._tracer.start_as_current_span("canary send", kind=SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attribute("http.request.method", "POST")
                span.set_attribute("url.full", f"{self._publisher.url}/v1/messages")
            try:
                accepted = self._publisher.send(self.probe_mail(token))
            except ApiError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise PublishFailed(str(exc)) from exc
            if span.is_recording():
                span.set_attribute(SPAN_MAIL_ID, accepted.mail_id)
            return accepted

    def _wait(self, poll: ImapSession, mail_id: str, message_id: str, sent: float) -> _Found:
        config = self._config
        deadline = sent + config.deadline
        record: dict[str, Any] | None = None
        with self._tracer.start_as_current_span("canary wait") as span:
            if span.is_recording():
                span.set_attribute(SPAN_MAIL_ID, mail_id)
            while True:
                poll.noop()
                uids = poll.search_message_id(message_id)
                for uid in uids:
                    headers = poll.fetch(uid, headers_only=True)
                    if str(headers.get("Message-ID", "")).strip() == message_id:
                        visible_after = time.monotonic() - sent
                        # The `mail deliver` span, from the mail's header.
                        traceparent = headers.get(MAIL_TRACEPARENT_HEADER)
                        context = context_from_traceparent(traceparent and str(traceparent))
                        if span.is_recording():
                            span.set_attribute("mailpipe.canary.time_to_inbox", visible_after)
                            if context is not None:
                                span.add_link(trace.get_current_span(context).get_span_context())
                        return _Found(uid, context, visible_after)
                record = _read_record(self._publisher, mail_id) or record
                status = (record or {}).get("status")
                now = time.monotonic()
                if status == "bounced" or now >= deadline:
                    raise _not_delivered(mail_id, record, config, bounced=status == "bounced")
                self._sleep(min(config.poll_interval, max(0.0, deadline - now)))

    def _read(self, root: Span, message_id: str, found: _Found, timings: list[_StepTiming]) -> None:
        """What a user's client does, recorded in the mail's own trace; then delete the probe."""
        links = [Link(root.get_span_context())]
        with self._tracer.start_as_current_span(
            "canary read", context=found.mail_context, links=links
        ) as span:
            # The step samples are recorded inside this span: their exemplars point at the mail.
            session = ImapSession(
                self._config,
                phase="read",
                tracer=self._tracer,
                metrics=self._metrics,
                timings=timings,
                connect=self._connect,
            )
            try:
                session.open()
                uids = session.search_message_id(message_id)
                if found.uid not in uids:
                    raise ImapProtocolError(
                        f"the probe {message_id} was seen by the poll session but not found again"
                    )
                session.fetch(found.uid, headers_only=False)
                session.delete(found.uid)
                session.logout()
            except CanaryError as exc:
                session.abandon()
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise


def _with(result: CanaryResult, **changes: Any) -> CanaryResult:
    return dataclasses.replace(result, **changes)


def _seconds_after(iso: str | None, wall_start: float) -> float | None:
    if not iso:
        return None
    try:
        at = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.timestamp() - wall_start


def _not_delivered(
    mail_id: str, record: dict[str, Any] | None, config: CanaryConfig, *, bounced: bool
) -> ProbeNotDelivered:
    if record is None:
        detail = "its delivery record could not be read"
        status = None
        last_error = None
    else:
        status = record.get("status")
        last_error = record.get("last_error")
        attempts = record.get("attempts") or []
        detail = f"last delivery record status: {status}"
        if attempts:
            last = attempts[-1]
            reply = " ".join(
                str(x) for x in (last.get("reply_code"), last.get("enhanced_status")) if x
            )
            if reply:
                detail += f", reply {reply}"
            if last.get("failed_step"):
                detail += f" at {last['failed_step']}"
            detail += f" (attempt {last.get('number')})"
        if last_error:
            detail += f": {_clip(last_error)}"
    why = "was bounced" if bounced else f"did not reach {config.mailbox} in {config.deadline:g} s"
    return ProbeNotDelivered(
        f"probe {mail_id} {why}; {detail}", record_status=status, last_error=last_error
    )


def build_canary(
    config: CanaryConfig,
    telemetry: Telemetry,
    *,
    session: requests.Session | None = None,
    connect: ImapConnect = connect_imap,
) -> Canary:
    """A :class:`Canary` for ``config``, reporting through ``telemetry``'s providers."""
    auth = (
        google_id_token_auth(config.publisher_url) if config.publisher_auth == "google" else no_auth
    )
    publisher = PublisherApi(
        config.publisher_url,
        session=session or requests.Session(),
        auth=auth,
        timeout=config.imap_timeout,
    )
    return Canary(
        config,
        publisher=publisher,
        tracer=telemetry.tracer("mailpipe.canary"),
        metrics=CanaryMetrics(telemetry.meter_provider.get_meter(METER_NAME)),
        connect=connect,
    )
