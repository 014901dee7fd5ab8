"""Send a mail to the SMTP relay: a pooled ``smtplib`` client, one CLIENT span per SMTP step.

:class:`SmtpSender` drives the SMTP dialogue step by step (connect, EHLO, STARTTLS, EHLO, AUTH,
MAIL FROM, RCPT TO per recipient, DATA, and RSET/QUIT when sent) so that each step is its own
span — ``smtp connect``, ``smtp ehlo``, … — a child of the caller's current span (the delivery
core's ``mail deliver``). Spans carry ``server.address``, ``server.port``, ``smtp.reply.code``,
``smtp.reply.enhanced_status`` and, on ``smtp rcpt to``, the recipient only as configured
(``full``, ``domain`` or ``hashed``). Never the password, never the body.

TLS is verified by default (``ssl.create_default_context(cafile=config.ca_file)``); ``starttls``
fails when the relay does not offer STARTTLS instead of continuing in clear; AUTH is only sent
over TLS unless ``tls="none"`` was configured explicitly (the config refuses that combination
unless ``MAILPIPE_SMTP_ALLOW_PLAINTEXT_AUTH`` is set).

Connections are pooled (at most ``config.pool_size``), one transaction at a time per
connection; a pooled connection that the relay closed while idle is detected at MAIL FROM and
replaced transparently, once. Waiting for a free connection is bounded: ``config.pool_wait``
(``MAILPIPE_SMTP_POOL_WAIT``), then :class:`~subscriber.errors.SmtpPoolTimeout` and nothing is sent.

Time: ``send(deadline=...)`` bounds the whole call (the delivery's ``MAILPIPE_DELIVERY_TIMEOUT``):
the pool wait takes at most what is left, and every socket operation of every step waits at most
``min(MAILPIPE_SMTP_TIMEOUT, time left)`` — set again before each read, so a relay trickling a
reply byte by byte cannot stretch a step past the deadline either. Past it, the step fails with
:class:`~subscriber.errors.DeliveryTimeout`.

``send(before_mail_from=...)`` is called once the connection is held and ready, just before MAIL
FROM; if it raises, the connection goes back to the pool untouched and no command of this mail
was sent (the delivery core checks its claim on the mail there).

Replies, refusals and error texts pass through :class:`subscriber.redaction.ReplyRedactor`
before they are kept anywhere: no password in any AUTH form, addresses only as configured.

Recipients: every RCPT refused → error (permanent if every refusal was 5xx); any 4xx → RSET and
a transient error, so the whole mail is retried and nobody receives it twice; some 5xx and the
others accepted → sent to the accepted ones, the refused listed in the :class:`SmtpReceipt`.

Errors are translated from ``smtplib``/``ssl``/socket in one place, :func:`translate_errors`,
into the tree of :mod:`subscriber.errors`::

    smtplib.SMTPResponseException 4xx       → SmtpTransientReply
    smtplib.SMTPResponseException 5xx       → SmtpPermanentReply (MAIL FROM, RCPT TO, DATA)
                                              SmtpTransientReply (connect, EHLO, STARTTLS, AUTH)
    any reply or SMTPNotSupportedError at STARTTLS → SmtpTlsError
    ssl.SSLError at connect/STARTTLS         → SmtpTlsError
    TimeoutError (also inside a disconnect)  → SmtpTimeout
                                               DeliveryTimeout when the send's deadline passed
    SMTPServerDisconnected, OSError          → SmtpConnectionError

A 5xx during the session set-up (greeting, EHLO, STARTTLS, AUTH — including 535 "authentication
credentials invalid") says the relay refuses *this client*, not this mail: a wrong password or
an unauthorised IP. Bouncing would throw away every mail until an operator fixes the relay
settings, so these are transient: the mail is retried and, if the problem lasts, lands in the
dead-letter topic where it can be replayed.
"""

from __future__ import annotations

import contextlib
import io
import smtplib
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from mailpipe.attributes import (
    SERVER_ADDRESS,
    SERVER_PORT,
    SMTP_CONNECTION_REUSED,
    SMTP_ENHANCED_STATUS,
    SMTP_RECIPIENT,
    SMTP_REPLY_CODE,
)
from mailpipe.config import AddressStyle, SmtpConfig
from mailpipe.logs import redact_address
from mailpipe.metrics import MailMetrics
from subscriber.errors import (
    DeliveryError,
    DeliveryTimeout,
    SmtpConnectionError,
    SmtpPermanentReply,
    SmtpPoolTimeout,
    SmtpTimeout,
    SmtpTlsError,
    SmtpTransientReply,
    TransientDeliveryError,
    UndeliverableMail,
    parse_enhanced_status,
)
from subscriber.redaction import ReplyRedactor

# Reply codes (RFC 5321 § 4.2.3) this module acts on.
SERVICE_READY = 220
AUTH_SUCCESSFUL = 235
ACTION_OK = 250
USER_NOT_LOCAL_WILL_FORWARD = 251
SERVICE_CLOSING = 421

# Steps that set up the session rather than send this mail: a 5xx there is not about the mail.
SESSION_STEPS = frozenset({"connect", "ehlo", "starttls", "auth"})
_TLS_STEPS = frozenset({"connect", "starttls"})

POOL_WAIT_STEP = "pool wait"  # the ``step`` of an SmtpPoolTimeout: before any SMTP command
# A socket timeout cut to the deadline fires at it; this much early still counts as "at it".
_DEADLINE_SLACK = 0.01


def _text(reply: bytes | str | None) -> str:
    if reply is None:
        return ""
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if ``exc`` or an exception it was raised from/during is a ``kind``."""
    seen: BaseException | None = exc
    for _ in range(10):  # smtplib chains at most one level; the bound guards against cycles
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reply_error(step: str, code: int) -> type[DeliveryError]:
    if step == "starttls":
        return SmtpTlsError  # e.g. 454 "TLS not available": never continue in clear
    if 400 <= code < 500:
        return SmtpTransientReply
    if 500 <= code < 600:
        return SmtpTransientReply if step in SESSION_STEPS else SmtpPermanentReply
    return TransientDeliveryError  # not a valid reply at this point: a protocol error, retry


class _OutOfTime(TimeoutError):
    """The send's deadline has passed: no further socket operation may start."""


@contextlib.contextmanager
def translate_errors(
    step: str,
    *,
    server: str,
    secrets: Sequence[str] = (),
    redact: Callable[[str], str] | None = None,
    out_of_time: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Translate ``smtplib``, ``ssl`` and socket errors raised in ``step`` into DeliveryErrors.

    The only place where lower-level exceptions become mailpipe's. The messages pass through
    ``redact`` (default: removing ``secrets`` and their AUTH forms); a timeout or lost
    connection when ``out_of_time()`` says the send's deadline has passed is a
    :class:`DeliveryTimeout`.
    """
    clean = redact or ReplyRedactor(password=secrets[0] if secrets else None)
    try:
        yield
    except DeliveryError:
        raise
    except Exception as exc:
        _scrub(exc, clean)  # the original stays chained (``from exc``): clean it too
        error = _translated(exc, step, server, clean, out_of_time)
        if error is None:
            raise  # not an SMTP, TLS or network error: a bug, let it show
        raise error from exc


def _scrub(exc: Exception, redact: Callable[[str], str]) -> None:
    """Remove secrets (and addresses, as configured) from an exception's own text, in place."""
    if isinstance(exc, smtplib.SMTPResponseException):
        exc.smtp_error = redact(_text(exc.smtp_error)).encode("utf-8")
        if isinstance(exc, smtplib.SMTPSenderRefused):  # it carries the sender's address
            exc.sender = redact(exc.sender)
            exc.args = (exc.smtp_code, exc.smtp_error, exc.sender)
        else:
            exc.args = (exc.smtp_code, exc.smtp_error, *exc.args[2:])
    else:
        exc.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)


def _translated(
    exc: Exception,
    step: str,
    server: str,
    redact: Callable[[str], str],
    out_of_time: Callable[[], bool] | None = None,
) -> DeliveryError | None:
    code: int | None = None
    text: str | None = None
    detail = redact(str(exc))
    cls: type[DeliveryError]
    # smtplib's own errors are OSErrors too: only a lost or silent connection can be the budget's.
    network = isinstance(exc, smtplib.SMTPServerDisconnected) or (
        isinstance(exc, OSError) and not isinstance(exc, smtplib.SMTPException)
    )
    if _caused_by(exc, _OutOfTime) or (network and out_of_time is not None and out_of_time()):
        message = (
            f"SMTP {step} with {server}: the delivery's time budget (MAILPIPE_DELIVERY_TIMEOUT) "
            "ran out before the relay answered"
        )
        return DeliveryTimeout(message, step=step, server=server)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        cls = SmtpTlsError if step == "starttls" else TransientDeliveryError
        message = f"SMTP {step} with {server} failed: {detail}"
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, text = exc.smtp_code, redact(_text(exc.smtp_error))
        cls = _reply_error(step, code)
        message = f"SMTP {step} with {server} failed: {code} {text}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib turns every socket error while reading a reply into this; look inside.
        if _caused_by(exc, TimeoutError):
            cls, message = SmtpTimeout, f"SMTP {step} with {server}: no reply in time"
        else:
            tls_failed = _caused_by(exc, ssl.SSLError) and step in _TLS_STEPS
            cls = SmtpTlsError if tls_failed else SmtpConnectionError
            message = f"SMTP {step} with {server}: connection lost ({detail})"
    elif isinstance(exc, smtplib.SMTPException):  # "No suitable authentication method found"
        cls, message = TransientDeliveryError, f"SMTP {step} with {server} failed: {detail}"
    elif isinstance(exc, ssl.SSLError):  # before OSError: SSLError is one
        if step in _TLS_STEPS or isinstance(exc, ssl.SSLCertVerificationError):
            cls, message = SmtpTlsError, f"TLS with {server} failed at {step}: {detail}"
        else:
            cls = SmtpConnectionError
            message = f"SMTP {step} with {server}: TLS connection lost ({detail})"
    elif isinstance(exc, TimeoutError):  # before OSError: socket.timeout is one
        cls, message = SmtpTimeout, f"SMTP {step} with {server}: no reply in time"
    elif isinstance(exc, OSError):  # refused, reset, unreachable, DNS failure
        cls, message = SmtpConnectionError, f"SMTP {step} with {server} failed: {detail}"
    else:
        return None
    return cls(message, step=step, reply_code=code, reply_message=text, server=server)


@dataclass(frozen=True)
class SmtpReceipt:
    """What the relay said to a mail it accepted (the reply to DATA)."""

    reply_code: int
    enhanced_status: str | None
    reply_message: str
    server: str
    accepted: tuple[str, ...]
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    connection_reused: bool = False


class _Budget:
    """The time one send may still take.

    ``deadline`` is a ``time.monotonic()`` value (None: no limit but the per-step one); every
    socket operation waits at most ``min(step_timeout, time left)``.
    """

    def __init__(self, deadline: float | None, step_timeout: float) -> None:
        self.deadline = deadline
        self.step_timeout = step_timeout

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self) -> float:
        """The timeout for the next socket operation; :class:`_OutOfTime` when none is left."""
        left = self.left()
        if left is None:
            return self.step_timeout
        if left <= 0:
            raise _OutOfTime("the delivery's time budget is used up")
        return min(self.step_timeout, left)

    def out_of_time(self) -> bool:
        left = self.left()
        return left is not None and left <= _DEADLINE_SLACK


class _BudgetedReader(socket.SocketIO):
    """Reads replies, setting the socket's timeout from its client's budget before every read.

    smtplib applies one socket timeout per read; a relay sending a reply a byte at a time (a
    tarpit) would restart it on every byte. Re-arming it to the time left before each read keeps
    every step within the send's deadline.
    """

    def __init__(self, sock: socket.socket, owner: _Client) -> None:
        super().__init__(sock, "rb")
        self._socket = sock
        self._owner = owner

    def readinto(self, b: Any) -> int | None:
        budget = self._owner.budget
        if budget is not None:
            self._socket.settimeout(budget.timeout())
        return super().readinto(b)


class _Client(smtplib.SMTP):
    """``smtplib.SMTP`` whose every write and read is bounded by the current send's budget.

    It also keeps the greeting, so the connect span can show its reply code.
    """

    budget: _Budget | None = None
    greeting: tuple[int, bytes] = (0, b"")

    def __init__(self, *args: Any, budget: _Budget | None = None, **kwargs: Any) -> None:
        self.budget = budget  # before smtplib connects and reads the greeting
        super().__init__(*args, **kwargs)

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting

    def send(self, s: Any) -> None:
        if self.budget is not None and self.sock is not None:
            self.sock.settimeout(self.budget.timeout())
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            # Also after STARTTLS, which drops the reader of the plain socket.
            self.file = io.BufferedReader(_BudgetedReader(self.sock, self))
        return super().getreply()


class _ImplicitTlsClient(_Client, smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` (TLS from the first byte) with the budget of :class:`_Client`."""


class _Connection:
    """One SMTP session to the relay, used by one transaction at a time."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    @property
    def open(self) -> bool:
        return self.client.sock is not None


class _Pool:
    """At most ``size`` connections: a slot is held while a connection is in use or being opened.

    A connection is either idle (in ``_idle``) or held by the thread owning a slot, and a new
    one is only opened when no idle one is left, so there are never more than ``size``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self.closed = False

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds; False if none became free."""
        return self._slots.acquire(timeout=max(timeout, 0.0))

    def release(self) -> None:
        self._slots.release()

    def take(self) -> _Connection | None:
        with self._lock:
            # Most recently used first: it is the least likely to have been closed while idle.
            return self._idle.pop() if self._idle else None

    def give_back(self, conn: _Connection) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._idle.append(conn)
            return True

    def drain(self) -> list[_Connection]:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            return idle


@dataclass(frozen=True)
class _Tx:
    """One send's limits and redaction, passed to each of its steps."""

    budget: _Budget
    redact: ReplyRedactor


class _Step:
    """The span of one SMTP step; records the reply."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.code: int | None = None  # for the step-duration metric

    def reply(self, code: int, message: bytes | str | None) -> None:
        self.code = int(code)
        if self.span.is_recording():
            self.span.set_attribute(SMTP_REPLY_CODE, int(code))
            enhanced = parse_enhanced_status(_text(message))
            if enhanced:
                self.span.set_attribute(SMTP_ENHANCED_STATUS, enhanced)


class SmtpSender:
    """Sends mails to one relay over pooled connections. Thread-safe; use as a context manager."""

    def __init__(
        self,
        config: SmtpConfig,
        *,
        tracer: Tracer | None = None,
        ssl_context: ssl.SSLContext | None = None,
        address_style: AddressStyle = "domain",
        metrics: MailMetrics | None = None,
    ) -> None:
        self._config = config
        self._tracer = tracer or trace.get_tracer(__name__)
        self._metrics = metrics
        self._address_style = address_style
        self._ssl_context = ssl_context
        if ssl_context is None and config.tls != "none":
            # Verified by default: the system's CAs, or only MAILPIPE_SMTP_CA_FILE when set.
            cafile = str(config.ca_file) if config.ca_file else None
            self._ssl_context = ssl.create_default_context(cafile=cafile)
        self._helo_name = config.helo_name or socket.gethostname() or "localhost"
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.server = f"{host}:{config.port}"
        self._redact = ReplyRedactor(
            username=config.username, password=config.password, address_style=address_style
        )
        self._pool = _Pool(config.pool_size)

    # -- public API --------------------------------------------------------------------------

    def send(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        deadline: float | None = None,
        before_mail_from: Callable[[], None] | None = None,
    ) -> SmtpReceipt:
        """Send one mail; raise :class:`~subscriber.errors.DeliveryError` if it was not accepted.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole call, the wait for a pooled
        connection included. ``before_mail_from`` runs with the connection held, just before
        MAIL FROM; whatever it raises is raised from here, with nothing of this mail sent.
        """
        if not recipients:
            raise UndeliverableMail("the mail has no recipient", step="rcpt to", server=self.server)
        if self._pool.closed:
            raise RuntimeError("SmtpSender.send() called after close()")
        tx = _Tx(
            _Budget(deadline, self._config.timeout),
            self._redact.for_envelope([mail_from, *recipients]),
        )
        self._wait_for_a_connection(tx.budget)
        try:
            conn: _Connection | None = self._pool.take()
            reused = conn is not None
            if conn is None:
                conn = self._open(tx)
            conn.client.budget = tx.budget
            self._mark_reused(reused)
            if before_mail_from is not None:
                try:
                    before_mail_from()
                except BaseException:
                    self._put_back(conn)  # no command of this mail was sent on it
                    raise
            try:
                try:
                    self._mail_from(conn, tx, mail_from, recipients, message)
                except (SmtpConnectionError, SmtpTransientReply) as err:
                    stale = (
                        isinstance(err, SmtpConnectionError) or err.reply_code == SERVICE_CLOSING
                    )
                    if not (reused and stale):
                        raise
                    # The relay closed the pooled connection while it was idle: not a delivery
                    # failure. Replace it, once.
                    self._close_quietly(conn)
                    conn, reused = None, False
                    conn = self._open(tx)
                    conn.client.budget = tx.budget
                    self._mark_reused(False)
                    self._mail_from(conn, tx, mail_from, recipients, message)
                accepted, refused = self._rcpt_to(conn, tx, recipients)
                code, reply = self._data(conn, tx, message)
            except BaseException as exc:
                if conn is not None:
                    self._after_failure(conn, tx, exc)
                raise
            self._put_back(conn)
        finally:
            self._pool.release()
        text = tx.redact(_text(reply))
        return SmtpReceipt(
            reply_code=code,
            enhanced_status=parse_enhanced_status(text),
            reply_message=text,
            server=self.server,
            accepted=tuple(accepted),
            refused=refused,
            connection_reused=reused,
        )

    def close(self) -> None:
        """QUIT every pooled connection; connections in use are closed when they come back."""
        for conn in self._pool.drain():
            self._quit(conn)

    def __enter__(self) -> SmtpSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the pool ----------------------------------------------------------------------------

    def _wait_for_a_connection(self, budget: _Budget) -> None:
        """Hold a pool slot within MAILPIPE_SMTP_POOL_WAIT and the budget, else SmtpPoolTimeout."""
        wait = self._config.pool_wait
        left = budget.left()
        by_budget = left is not None and left < wait
        if by_budget:
            wait = max(left or 0.0, 0.0)
        if self._pool.acquire(wait):
            return
        limit = (
            f"the {wait:.2f} s left of the delivery's time budget (MAILPIPE_DELIVERY_TIMEOUT)"
            if by_budget
            else f"MAILPIPE_SMTP_POOL_WAIT ({self._config.pool_wait:g} s)"
        )
        raise SmtpPoolTimeout(
            f"no SMTP connection to {self.server} became free within {limit}: all "
            f"{self._pool.size} pooled connections (MAILPIPE_SMTP_POOL_SIZE) were busy; "
            "nothing was sent, the mail is retried",
            step=POOL_WAIT_STEP,
            server=self.server,
        )

    def _put_back(self, conn: _Connection) -> None:
        """Return a healthy connection to the pool (or QUIT it if the sender is closing)."""
        conn.client.budget = None
        if conn.client.sock is not None:
            with contextlib.suppress(OSError):
                conn.client.sock.settimeout(self._config.timeout)
        if not self._pool.give_back(conn):
            self._quit(conn)

    # -- steps -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str, tx: _Tx | None, **attributes: str) -> Iterator[_Step]:
        redact = tx.redact if tx is not None else self._redact
        with self._tracer.start_as_current_span(
            f"smtp {name}",
            kind=SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            recording = span.is_recording()
            if recording:
                span.set_attribute(SERVER_ADDRESS, self._config.host)
                span.set_attribute(SERVER_PORT, self._config.port)
                for key, value in attributes.items():
                    span.set_attribute(key, value)
            step = _Step(span)
            started = time.perf_counter()
            try:
                with translate_errors(
                    name,
                    server=self.server,
                    redact=redact,
                    out_of_time=tx.budget.out_of_time if tx is not None else None,
                ):
                    if tx is not None:
                        tx.budget.timeout()  # no time left: do not start the step
                    yield step
            except Exception as exc:
                if recording:
                    self._record_error(span, exc, redact)
                if isinstance(exc, DeliveryError) and exc.reply_code is not None:
                    step.code = exc.reply_code
                raise
            finally:
                if self._metrics is not None:
                    # Inside the span, so the measurement's exemplar points at this step.
                    elapsed = time.perf_counter() - started
                    self._metrics.smtp_step(name, elapsed, reply_code=step.code)

    def _record_error(self, span: Span, exc: Exception, redact: Callable[[str], str]) -> None:
        if isinstance(exc, DeliveryError) and exc.reply_code is not None:
            span.set_attribute(SMTP_REPLY_CODE, exc.reply_code)
            if exc.enhanced_status:
                span.set_attribute(SMTP_ENHANCED_STATUS, exc.enhanced_status)
        description = redact(str(exc))
        span.set_status(Status(StatusCode.ERROR, description))
        stack = "".join(traceback.format_exception(exc, chain=False))
        span.record_exception(
            exc,
            attributes={
                "exception.message": description,
                "exception.stacktrace": redact(stack),
            },
        )

    def _mark_reused(self, reused: bool) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(SMTP_CONNECTION_REUSED, reused)

    def _open(self, tx: _Tx) -> _Connection:
        config = self._config
        with self._step("connect", tx) as step:
            client: _Client
            if config.tls == "implicit":
                client = _ImplicitTlsClient(
                    config.host,
                    config.port,
                    local_hostname=self._helo_name,
                    timeout=tx.budget.timeout(),
                    context=self._ssl_context,
                    budget=tx.budget,
                )
            else:
                client = _Client(
                    config.host,
                    config.port,
                    local_hostname=self._helo_name,
                    timeout=tx.budget.timeout(),
                    budget=tx.budget,
                )
            step.reply(*client.greeting)
        conn = _Connection(client)
        try:
            self._ehlo(conn, tx)
            if config.tls == "starttls":
                with self._step("starttls", tx) as step:
                    if not client.has_extn("starttls"):
                        raise smtplib.SMTPNotSupportedError(
                            "the relay does not offer STARTTLS; refusing to continue in clear "
                            "(set MAILPIPE_SMTP_TLS=implicit for port 465, or none on purpose)"
                        )
                    step.reply(*client.starttls(context=self._ssl_context))
                self._ehlo(conn, tx)
            if config.username is not None:
                with self._step("auth", tx) as step:
                    step.reply(*client.login(config.username, config.password or ""))
        except BaseException:
            client.close()
            raise
        return conn

    def _ehlo(self, conn: _Connection, tx: _Tx) -> None:
        with self._step("ehlo", tx) as step:
            code, reply = conn.client.ehlo()
            step.reply(code, reply)
            if code != ACTION_OK:
                raise smtplib.SMTPHeloError(code, reply)

    def _mail_from(
        self,
        conn: _Connection,
        tx: _Tx,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
    ) -> None:
        client = conn.client
        with self._step("mail from", tx) as step:
            options: list[str] = []
            # RFC 6531/6532: a non-ASCII envelope address, or UTF-8 in a header (a non-ASCII
            # local part in From, To, Cc or Reply-To), needs a relay that offers SMTPUTF8.
            end_of_headers = message.find(b"\r\n\r\n")
            headers = message[:end_of_headers] if end_of_headers >= 0 else message
            envelope_ascii = mail_from.isascii() and all(r.isascii() for r in recipients)
            if not (envelope_ascii and headers.isascii()):
                if not client.has_extn("smtputf8"):
                    raise UndeliverableMail(
                        "the mail has an internationalised address (envelope or header) but the "
                        "relay does not support SMTPUTF8",
                        step="mail from",
                        server=self.server,
                    )
                options.append("SMTPUTF8")
            if not message.isascii() and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if client.has_extn("size"):
                options.append(f"SIZE={len(message)}")
            code, reply = client.mail(mail_from, options)
            step.reply(code, reply)
            if code != ACTION_OK:
                raise smtplib.SMTPSenderRefused(code, reply, mail_from)

    def _rcpt_to(
        self, conn: _Connection, tx: _Tx, recipients: Sequence[str]
    ) -> tuple[list[str], dict[str, tuple[int, str]]]:
        accepted: list[str] = []
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            described = redact_address(recipient, self._address_style)
            with self._step("rcpt to", tx, **{SMTP_RECIPIENT: described}) as step:
                code, reply = conn.client.rcpt(recipient)
                step.reply(code, reply)
                if code in (ACTION_OK, USER_NOT_LOCAL_WILL_FORWARD):
                    accepted.append(recipient)
                elif 500 <= code < 600:
                    # Refused for good: the others may still get the mail (reported in the receipt).
                    text = tx.redact(_text(reply))
                    refused[recipient] = (code, text)
                    if step.span.is_recording():
                        step.span.set_status(Status(StatusCode.ERROR, f"{code} {text}"))
                else:
                    # 4xx (or nonsense): defer the whole mail, so a retry sends it to everyone once.
                    raise smtplib.SMTPResponseException(code, reply)
        if not accepted:
            code, text = next(iter(refused.values()))
            with translate_errors("rcpt to", server=self.server, redact=tx.redact):
                raise smtplib.SMTPResponseException(
                    code, f"{text} (every recipient was refused)".encode()
                )
        return accepted, refused

    def _data(self, conn: _Connection, tx: _Tx, message: bytes) -> tuple[int, bytes]:
        with self._step("data", tx) as step:
            code, reply = conn.client.data(message)
            step.reply(code, reply)
            if not 200 <= code < 300:
                raise smtplib.SMTPDataError(code, reply)
            return code, reply

    # -- after a transaction -----------------------------------------------------------------

    def _after_failure(self, conn: _Connection, tx: _Tx, exc: BaseException) -> None:
        """RSET and keep the connection if it is healthy, else close it."""
        healthy = (
            isinstance(exc, (SmtpTransientReply, SmtpPermanentReply, UndeliverableMail))
            and exc.reply_code != SERVICE_CLOSING
            and conn.open
            and not tx.budget.out_of_time()
        )
        if healthy:
            try:
                with self._step("rset", tx) as step:
                    code, reply = conn.client.rset()
                    step.reply(code, reply)
                    if code != ACTION_OK:
                        raise smtplib.SMTPResponseException(code, reply)
            except DeliveryError:
                healthy = False
        if healthy:
            self._put_back(conn)
        else:
            self._close_quietly(conn)

    def _quit(self, conn: _Connection) -> None:
        try:
            with self._step("quit", None) as step:
                code, reply = conn.client.quit()
                step.reply(code, reply)
        except DeliveryError:
            pass  # the relay went away first; nothing is lost
        finally:
            self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn: _Connection) -> None:
        with contextlib.suppress(OSError):
            conn.client.close()
