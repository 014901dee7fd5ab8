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

Sandbox (``send(sandbox=True)``): the same dialogue up to RCPT TO, then RSET (span ``smtp rset``)
instead of DATA: the receipt carries the relay's replies to MAIL and RCPT (``sandboxed``), the
connection goes back to the pool clean (closed if RSET fails). Refusals are handled as below.

Recipients: every RCPT refused → error (permanent if every refusal was 5xx); any 4xx → RSET and
a transient error, so the whole mail is retried and nobody receives it twice; some 5xx and the
others accepted → sent to the accepted ones, the refused listed in the :class:`SmtpReceipt`.

Errors: every step runs inside :func:`subscriber.smtp_translation.translate_errors`, the one
place where ``smtplib``/``ssl``/socket exceptions become the tree of :mod:`subscriber.errors`
(its docstring has the table). Connections, the pool and the time budget are in
:mod:`subscriber.smtp_pool`.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

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
from mailpipe.config import AddressStyle
from mailpipe.logs import redact_address
from subscriber.config import SmtpConfig
from subscriber.errors import (
    DeliveryError,
    SmtpConnectionError,
    SmtpPermanentReply,
    SmtpPoolTimeout,
    SmtpTransientReply,
    UndeliverableMail,
    parse_enhanced_status,
)
from subscriber.metrics import DeliveryMetrics
from subscriber.redaction import ReplyRedactor
from subscriber.smtp_pool import (
    Budget,
    BudgetedClient,
    Connection,
    ConnectionPool,
    ImplicitTlsClient,
)
from subscriber.smtp_translation import reply_text, translate_errors

# Reply codes (RFC 5321 § 4.2.3) this module acts on.
SERVICE_READY = 220
AUTH_SUCCESSFUL = 235
ACTION_OK = 250
USER_NOT_LOCAL_WILL_FORWARD = 251
SERVICE_CLOSING = 421

POOL_WAIT_STEP = "pool wait"  # the ``step`` of an SmtpPoolTimeout: before any SMTP command


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
    sandboxed: bool = False  # RSET after RCPT: the replies are MAIL's and RCPT's, nothing sent


@dataclass(frozen=True)
class _Tx:
    """One send's limits and redaction, passed to each of its steps."""

    budget: Budget
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
            enhanced = parse_enhanced_status(reply_text(message))
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
        metrics: DeliveryMetrics | None = None,
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
        self._pool = ConnectionPool(config.pool_size)

    # -- public API --------------------------------------------------------------------------

    def send(
        self,
        *,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        deadline: float | None = None,
        before_mail_from: Callable[[], None] | None = None,
        sandbox: bool = False,
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
            Budget(deadline, self._config.timeout),
            self._redact.for_envelope([mail_from, *recipients]),
        )
        self._wait_for_a_connection(tx.budget)
        try:
            conn: Connection | None = self._pool.take()
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
                    mail_reply = self._mail_from(conn, tx, mail_from, recipients, message)
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
                    mail_reply = self._mail_from(conn, tx, mail_from, recipients, message)
                accepted, refused = self._rcpt_to(conn, tx, recipients)
                if not sandbox:
                    try:
                        code, reply = self._data(conn, tx, message)
                    except DeliveryError as exc:
                        # What RCPT TO refused stays refused, whatever DATA answered afterwards.
                        exc.refused = {**refused, **exc.refused}
                        raise
            except BaseException as exc:
                if conn is not None:
                    self._after_failure(conn, tx, exc)
                raise
            if sandbox:
                # The relay's last word on the mail is its last RCPT reply; the text lists all.
                code, last = accepted[next(reversed(accepted))]
                replies = [f"MAIL FROM: {mail_reply}"] + [
                    f"RCPT TO {redact_address(rcpt, self._address_style)}: {code_} {text_}"
                    for rcpt, (code_, text_) in accepted.items()
                ]
                reply = f"{last} (sandbox: {'; '.join(replies)}; RSET, not sent)".encode()
            if not sandbox or self._reset(conn, tx):
                self._put_back(conn)
            else:
                self._close_quietly(conn)
        finally:
            self._pool.release()
        text = tx.redact(reply_text(reply))
        return SmtpReceipt(
            reply_code=code,
            enhanced_status=parse_enhanced_status(text),
            reply_message=text,
            server=self.server,
            accepted=tuple(accepted),
            refused=refused,
            connection_reused=reused,
            sandboxed=sandbox,
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

    def _wait_for_a_connection(self, budget: Budget) -> None:
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

    def _put_back(self, conn: Connection) -> None:
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

    def _open(self, tx: _Tx) -> Connection:
        config = self._config
        with self._step("connect", tx) as step:
            client: BudgetedClient
            if config.tls == "implicit":
                client = ImplicitTlsClient(
                    config.host,
                    config.port,
                    local_hostname=self._helo_name,
                    timeout=tx.budget.timeout(),
                    context=self._ssl_context,
                    budget=tx.budget,
                )
            else:
                client = BudgetedClient(
                    config.host,
                    config.port,
                    local_hostname=self._helo_name,
                    timeout=tx.budget.timeout(),
                    budget=tx.budget,
                )
            step.reply(*client.greeting)
        conn = Connection(client)
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

    def _ehlo(self, conn: Connection, tx: _Tx) -> None:
        with self._step("ehlo", tx) as step:
            code, reply = conn.client.ehlo()
            step.reply(code, reply)
            if code != ACTION_OK:
                raise smtplib.SMTPHeloError(code, reply)

    def _mail_from(
        self,
        conn: Connection,
        tx: _Tx,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
    ) -> str:
        """MAIL FROM; the relay's reply (``250 2.1.0 Sender OK``), redacted."""
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
            return f"{code} {tx.redact(reply_text(reply))}"

    def _rcpt_to(
        self, conn: Connection, tx: _Tx, recipients: Sequence[str]
    ) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, str]]]:
        """RCPT TO each recipient: ``(accepted, refused)``, each ``{recipient: (code, reply)}``."""
        accepted: dict[str, tuple[int, str]] = {}
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            described = redact_address(recipient, self._address_style)
            with self._step("rcpt to", tx, **{SMTP_RECIPIENT: described}) as step:
                code, reply = conn.client.rcpt(recipient)
                step.reply(code, reply)
                if code in (ACTION_OK, USER_NOT_LOCAL_WILL_FORWARD):
                    accepted[recipient] = (code, tx.redact(reply_text(reply)))
                elif 500 <= code < 600:
                    # Refused for good: the others may still get the mail (reported in the receipt).
                    text = tx.redact(reply_text(reply))
                    refused[recipient] = (code, text)
                    if step.span.is_recording():
                        step.span.set_status(Status(StatusCode.ERROR, f"{code} {text}"))
                else:
                    # 4xx (or nonsense): defer the whole mail, so a retry sends it to everyone once.
                    raise smtplib.SMTPResponseException(code, reply)
        if not accepted:
            code, text = next(iter(refused.values()))
            try:
                with translate_errors("rcpt to", server=self.server, redact=tx.redact):
                    raise smtplib.SMTPResponseException(
                        code, f"{text} (every recipient was refused)".encode()
                    )
            except DeliveryError as exc:
                exc.refused = refused  # each recipient's own reply (the suppression list's)
                raise
        return accepted, refused

    def _data(self, conn: Connection, tx: _Tx, message: bytes) -> tuple[int, bytes]:
        with self._step("data", tx) as step:
            code, reply = conn.client.data(message)
            step.reply(code, reply)
            if not 200 <= code < 300:
                raise smtplib.SMTPDataError(code, reply)
            return code, reply

    # -- after a transaction -----------------------------------------------------------------

    def _after_failure(self, conn: Connection, tx: _Tx, exc: BaseException) -> None:
        """RSET and keep the connection if it is healthy, else close it."""
        healthy = (
            isinstance(exc, (SmtpTransientReply, SmtpPermanentReply, UndeliverableMail))
            and exc.reply_code != SERVICE_CLOSING
            and conn.open
            and not tx.budget.out_of_time()
        )
        if healthy and self._reset(conn, tx):
            self._put_back(conn)
        else:
            self._close_quietly(conn)

    def _reset(self, conn: Connection, tx: _Tx) -> bool:
        """RSET: whether the relay answered 250 (the connection is clean for the next mail)."""
        try:
            with self._step("rset", tx) as step:
                code, reply = conn.client.rset()
                step.reply(code, reply)
                if code != ACTION_OK:
                    raise smtplib.SMTPResponseException(code, reply)
        except DeliveryError:
            return False
        return True

    def _quit(self, conn: Connection) -> None:
        try:
            with self._step("quit", None) as step:
                code, reply = conn.client.quit()
                step.reply(code, reply)
        except DeliveryError:
            pass  # the relay went away first; nothing is lost
        finally:
            self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.client.close()
