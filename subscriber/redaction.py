"""What the subscriber keeps of a relay's words: no credentials, addresses only as configured.

A relay's replies and the errors built from them are kept in the delivery record (and so in
``mailpipe status`` and the status API), in span attributes and events, in log lines and in the
push endpoint's answers. A relay may quote back what it was sent: the AUTH exchange (RFC 4954:
AUTH PLAIN sends base64 of ``authzid NUL user NUL password``, AUTH LOGIN base64 of the user name
and then of the password) or the envelope's addresses (``550 5.1.1 <bob@example.org>: no such
user``). :class:`ReplyRedactor` cleans every such text where it enters mailpipe (the sender,
:mod:`subscriber.smtp`, and its error translation, :mod:`subscriber.smtp_translation`), so
everything downstream only ever sees the clean text:

- the password and its exact AUTH forms (:func:`credential_forms`) become ``[REDACTED]``;
- any run of base64 that decodes, at any of the four alignments, to bytes holding the password
  or a piece of it (an echo with another authzid, cut short, or without its padding) is
  replaced whole;
- the envelope's addresses (in any letter case) and anything else that looks like an address
  are shown as ``MAILPIPE_LOG_ADDRESSES`` says (``full``, ``domain`` or ``hashed``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Iterable

from mailpipe.config import AddressStyle
from mailpipe.logs import REDACTED, redact_address, redact_addresses

# A run of base64 alphabet; short words of it are checked too (a short password's base64 is short).
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{4,}={0,2}")
# A piece of the password this long inside decoded base64 is treated as the password leaking
# (a relay may cut its echo short). Random base64 holding 6 given bytes: about 1 in 2**48.
_PIECE = 6


def _b64(raw: str) -> str:
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def credential_forms(username: str | None, password: str | None) -> list[str]:
    """The password as it can appear in text: itself and what SMTP AUTH sends for it.

    Base64 of the password alone (AUTH LOGIN's second answer) and of the AUTH PLAIN messages
    ``NUL user NUL password`` (what ``smtplib`` sends), ``user NUL user NUL password`` (an
    authzid) and ``user NUL password``, each with and without its ``=`` padding. Longest first, so
    a form containing another is replaced whole.
    """
    if not password:
        return []
    user = username or ""
    forms = {password}
    plain = (f"\0{user}\0{password}", f"{user}\0{user}\0{password}", f"{user}\0{password}")
    for raw in (password, *plain):
        encoded = _b64(raw)
        forms.add(encoded)
        forms.add(encoded.rstrip("="))
    return sorted(forms, key=len, reverse=True)


class ReplyRedactor:
    """Cleans text that came from (or quotes) the relay; see the module docstring.

    ``for_envelope`` gives a copy that also knows one mail's addresses, so they are caught even
    where the generic address pattern would miss them (quoted local parts, IP literals).
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        address_style: AddressStyle = "full",
    ) -> None:
        self.address_style: AddressStyle = address_style
        self._forms = credential_forms(username, password)
        secret = (password or "").encode("utf-8")
        size = min(len(secret), _PIECE)
        self._pieces = frozenset(
            secret[i : i + size] for i in range(len(secret) - size + 1) if size
        )
        self._known: tuple[str, ...] = ()
        self._known_pattern: re.Pattern[str] | None = None

    def for_envelope(self, addresses: Iterable[str]) -> ReplyRedactor:
        """This redactor, also replacing ``addresses`` as the address style says."""
        clone = copy.copy(self)
        known = {a.strip() for a in addresses if a and a.strip()}
        clone._known = tuple(sorted(known, key=len, reverse=True))
        clone._known_pattern = None  # compiled on first use: most replies quote no address
        return clone

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        if self._pieces:
            text = _BASE64_RUN.sub(self._base64_run, text)
        if self.address_style == "full" or "@" not in text:
            return text
        if self._known:
            if self._known_pattern is None:
                alternatives = "|".join(re.escape(a) for a in self._known)
                self._known_pattern = re.compile(alternatives, re.IGNORECASE)
            style = self.address_style
            text = self._known_pattern.sub(lambda m: redact_address(m.group(0), style), text)
        return redact_addresses(text, self.address_style)

    def _base64_run(self, match: re.Match[str]) -> str:
        run = match.group(0).rstrip("=")
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            if not chunk:
                break
            try:
                decoded = base64.b64decode(chunk, validate=True)
            except binascii.Error:  # pragma: no cover - the pattern only lets the alphabet in
                continue
            if any(piece in decoded for piece in self._pieces):
                return REDACTED
        return match.group(0)
