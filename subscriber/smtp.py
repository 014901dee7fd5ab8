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
replaced transparently, once.

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
    SMTPServerDisconnected, OSError          → SmtpConnectionError

A 5xx during the session set-up (greeting, EHLO, STARTTLS, AUTH — including 535 "authentication
credentials invalid") says the relay refuses *this client*, not this mail: a wrong password or
an unauthorised IP. Bouncing would throw away every mail until an operator fixes the relay
settings, so these are transient: the mail is retried and, if the problem lasts, lands in the
dead-letter topic where it can be replayed.
"""

from __future__ import annotations

import base64
import contextlib
import smtplib
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from mailpipe.config import AddressLogging, SmtpConfig
from mailpipe.logs import redact_address, redact_addresses
from mailpipe.metrics import MailMetrics
from subscriber.errors import (
    DeliveryError,
    SmtpConnectionError,
    SmtpPermanentReply,
    SmtpTimeout,
    SmtpTlsError,
    SmtpTransientReply,
    TransientDeliveryError,
    UndeliverableMail,
    parse_enhanced_status,
)

AddressStyle = AddressLogging  # one format for logs and spans: mailpipe.logs.redact_address

# Reply codes (RFC 5321 § 4.2.3) this module acts on.
SERVICE_READY = 220
AUTH_SUCCESSFUL = 235
ACTION_OK = 250
USER_NOT_LOCAL_WILL_FORWARD = 251
SERVICE_CLOSING = 421

# Steps that set up the session rather than send this mail: a 5xx there is not about the mail.
SESSION_STEPS = frozenset({"connect", "ehlo", "starttls", "auth"})
_TLS_STEPS = frozenset({"connect", "starttls"})

ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_REPLY_CODE = "smtp.reply.code"
ATTR_ENHANCED_STATUS = "smtp.reply.enhanced_status"
ATTR_RECIPIENT = "smtp.recipient"
ATTR_CONNECTION_REUSED = "smtp.connection.reused"


def _text(reply: bytes | str | None) -> str:
    if reply is None:
        return ""
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


class _Redactor:
    """Removes secrets (and their base64 forms, as sent in AUTH) from text, and shows addresses
    only as configured (replies often quote the recipient)."""

    def __init__(self, secrets: Sequence[str], address_style: AddressLogging = "full") -> None:
        self._address_style = address_style
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms.add(secret)
                forms.add(base64.b64encode(secret.encode("utf-8")).decode("ascii"))
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "[redacted]")
        return redact_addresses(text, self._address_style)


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


@contextlib.contextmanager
def translate_errors(step: str, *, server: str, secrets: Sequence[str] = ()) -> Iterator[None]:
    """Translate ``smtplib``, ``ssl`` and socket errors raised in ``step`` into DeliveryErrors.

    The only place where lower-level exceptions become mailpipe's; the messages never contain
    ``secrets``.
    """
    redact = _Redactor(secrets)
    try:
        yield
    except DeliveryError:
        raise
    except Exception as exc:
        _scrub(exc, redact)  # the original stays chained (``from exc``): clean it too
        error = _translated(exc, step, server, redact)
        if error is None:
            raise  # not an SMTP, TLS or network error: a bug, let it show
        raise error from exc


def _scrub(exc: Exception, redact: _Redactor) -> None:
    """Remove secrets from an exception's own text, in place."""
    if isinstance(exc, smtplib.SMTPResponseException):
        exc.smtp_error = redact(_text(exc.smtp_error)).encode("utf-8")
        exc.args = (exc.smtp_code, exc.smtp_error, *exc.args[2:])
    else:
        exc.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)


def _translated(exc: Exception, step: str, server: str, redact: _Redactor) -> DeliveryError | None:
    code: int | None = None
    text: str | None = None
    detail = redact(str(exc))
    cls: type[DeliveryError]
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


class _PlainClient(smtplib.SMTP):
    """``smtplib.SMTP`` that keeps the greeting, so the connect span can show its reply code."""

    greeting: tuple[int, bytes] = (0, b"")

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting


class _ImplicitTlsClient(smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` that keeps the greeting."""

    greeting: tuple[int, bytes] = (0, b"")

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: Any = None
    ) -> tuple[int, bytes]:
        self.greeting = super().connect(host, port, source_address)
        return self.greeting


class _Connection:
    """One SMTP session to the relay, used by one transaction at a time."""

    def __init__(self, client: smtplib.SMTP) -> None:
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
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self.closed = False

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self._slots.acquire()
        try:
            yield
        finally:
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


class _Step:
    """The span of one SMTP step; records the reply."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.code: int | None = None  # for the step-duration metric

    def reply(self, code: int, message: bytes | str | None) -> None:
        self.code = int(code)
        if self.span.is_recording():
            self.span.set_attribute(ATTR_REPLY_CODE, int(code))
            enhanced = parse_enhanced_status(_text(message))
            if enhanced:
                self.span.set_attribute(ATTR_ENHANCED_STATUS, enhanced)


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
        self._secrets = [config.password] if config.password else []
        self._redact = _Redactor(self._secrets, address_style)
        self._pool = _Pool(config.pool_size)

    # -- public API --------------------------------------------------------------------------

    def send(self, *, mail_from: str, recipients: Sequence[str], message: bytes) -> SmtpReceipt:
        """Send one mail; raise :class:`~subscriber.errors.DeliveryError` if it was not accepted."""
        if not recipients:
            raise UndeliverableMail("the mail has no recipient", step="rcpt to", server=self.server)
        if self._pool.closed:
            raise RuntimeError("SmtpSender.send() called after close()")
        with self._pool.slot():
            conn: _Connection | None = self._pool.take()
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._open()
                self._mark_reused(reused)
                try:
                    self._mail_from(conn, mail_from, recipients, message)
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
                    conn = self._open()
                    self._mark_reused(False)
                    self._mail_from(conn, mail_from, recipients, message)
                accepted, refused = self._rcpt_to(conn, recipients)
                code, reply = self._data(conn, message)
            except BaseException as exc:
                if conn is not None:
                    self._after_failure(conn, exc)
                raise
            if not self._pool.give_back(conn):
                self._quit(conn)
        text = self._redact(_text(reply))
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

    # -- steps -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str, **attributes: str) -> Iterator[_Step]:
        with self._tracer.start_as_current_span(
            f"smtp {name}",
            kind=SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            recording = span.is_recording()
            if recording:
                span.set_attribute(ATTR_SERVER_ADDRESS, self._config.host)
                span.set_attribute(ATTR_SERVER_PORT, self._config.port)
                for key, value in attributes.items():
                    span.set_attribute(key, value)
            step = _Step(span)
            started = time.perf_counter()
            try:
                with translate_errors(name, server=self.server, secrets=self._secrets):
                    yield step
            except Exception as exc:
                if recording:
                    self._record_error(span, exc)
                if isinstance(exc, DeliveryError) and exc.reply_code is not None:
                    step.code = exc.reply_code
                raise
            finally:
                if self._metrics is not None:
                    # Inside the span, so the measurement's exemplar points at this step.
                    elapsed = time.perf_counter() - started
                    self._metrics.smtp_step(name, elapsed, reply_code=step.code)

    def _record_error(self, span: Span, exc: Exception) -> None:
        if isinstance(exc, DeliveryError) and exc.reply_code is not None:
            span.set_attribute(ATTR_REPLY_CODE, exc.reply_code)
            if exc.enhanced_status:
                span.set_attribute(ATTR_ENHANCED_STATUS, exc.enhanced_status)
        description = self._redact(str(exc))
        span.set_status(Status(StatusCode.ERROR, description))
        stack = "".join(traceback.format_exception(exc, chain=False))
        span.record_exception(
            exc,
            attributes={
                "exception.message": description,
                "exception.stacktrace": self._redact(stack),
            },
        )

    def _mark_reused(self, reused: bool) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(ATTR_CONNECTION_REUSED, reused)

    def _open(self) -> _Connection:
        config = self._config
        with self._step("connect") as step:
            client: smtplib.SMTP
            if config.tls == "implicit":
                client = _ImplicitTlsClient(
                    config.host,
                    config.port,
                    local_hostname=self._helo_name,
                    timeout=config.timeout,
                    context=self._ssl_context,
                )
            else:
                client = _PlainClient(
                    config.host, config.port, local_hostname=self._helo_name, timeout=config.timeout
                )
            step.reply(*client.greeting)
        conn = _Connection(client)
        try:
            self._ehlo(conn)
            if config.tls == "starttls":
                with self._step("starttls") as step:
                    if not client.has_extn("starttls"):
                        raise smtplib.SMTPNotSupportedError(
                            "the relay does not offer STARTTLS; refusing to continue in clear "
                            "(set MAILPIPE_SMTP_TLS=implicit for port 465, or none on purpose)"
                        )
                    step.reply(*client.starttls(context=self._ssl_context))
                self._ehlo(conn)
            if config.username is not None:
                with self._step("auth") as step:
                    step.reply(*client.login(config.username, config.password or ""))
        except BaseException:
            client.close()
            raise
        return conn

    def _ehlo(self, conn: _Connection) -> None:
        with self._step("ehlo") as step:
            code, reply = conn.client.ehlo()
            step.reply(code, reply)
            if code != ACTION_OK:
                raise smtplib.SMTPHeloError(code, reply)

    def _mail_from(
        self, conn: _Connection, mail_from: str, recipients: Sequence[str], message: bytes
    ) -> None:
        client = conn.client
        with self._step("mail from") as step:
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
        self, conn: _Connection, recipients: Sequence[str]
    ) -> tuple[list[str], dict[str, tuple[int, str]]]:
        accepted: list[str] = []
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            described = redact_address(recipient, self._address_style)
            with self._step("rcpt to", **{ATTR_RECIPIENT: described}) as step:
                code, reply = conn.client.rcpt(recipient)
                step.reply(code, reply)
                if code in (ACTION_OK, USER_NOT_LOCAL_WILL_FORWARD):
                    accepted.append(recipient)
                elif 500 <= code < 600:
                    # Refused for good: the others may still get the mail (reported in the receipt).
                    text = self._redact(_text(reply))
                    refused[recipient] = (code, text)
                    if step.span.is_recording():
                        step.span.set_status(Status(StatusCode.ERROR, f"{code} {text}"))
                else:
                    # 4xx (or nonsense): defer the whole mail, so a retry sends it to everyone once.
                    raise smtplib.SMTPResponseException(code, reply)
        if not accepted:
            code, text = next(iter(refused.values()))
            with translate_errors("rcpt to", server=self.server, secrets=self._secrets):
                raise smtplib.SMTPResponseException(
                    code, f"{text} (every recipient was refused)".encode()
                )
        return accepted, refused

    def _data(self, conn: _Connection, message: bytes) -> tuple[int, bytes]:
        with self._step("data") as step:
            code, reply = conn.client.data(message)
            step.reply(code, reply)
            if not 200 <= code < 300:
                raise smtplib.SMTPDataError(code, reply)
            return code, reply

    # -- after a transaction -----------------------------------------------------------------

    def _after_failure(self, conn: _Connection, exc: BaseException) -> None:
        """RSET and keep the connection if it is healthy, else close it."""
        healthy = (
            isinstance(exc, (SmtpTransientReply, SmtpPermanentReply, UndeliverableMail))
            and exc.reply_code != SERVICE_CLOSING
            and conn.open
        )
        if healthy:
            try:
                with self._step("rset") as step:
                    code, reply = conn.client.rset()
                    step.reply(code, reply)
                    if code != ACTION_OK:
                        raise smtplib.SMTPResponseException(code, reply)
            except DeliveryError:
                healthy = False
        if not healthy or not self._pool.give_back(conn):
            self._close_quietly(conn)

    def _quit(self, conn: _Connection) -> None:
        try:
            with self._step("quit") as step:
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
