"""ReplyRedactor: what a relay quotes back never keeps the password, in any AUTH form, nor an
address in a form MAILPIPE_LOG_ADDRESSES does not allow."""

from __future__ import annotations

import base64

import pytest

from mailpipe.logs import REDACTED, redact_address
from subscriber.redaction import ReplyRedactor, credential_forms
from tests.fixtures.redaction import password_leaks

USER = "relay-user@example.com"
PASSWORD = "Tr0ub4dor&3-horse-battery"


def b64(raw: str) -> str:
    return base64.b64encode(raw.encode()).decode()


def leaks(text: str) -> bool:
    """Whether ``text`` holds the password, or 6 characters of it inside base64 (any alignment)."""
    return bool(password_leaks(text, PASSWORD))


@pytest.fixture
def redact() -> ReplyRedactor:
    return ReplyRedactor(username=USER, password=PASSWORD, address_style="domain")


@pytest.mark.parametrize(
    "echo",
    [
        PASSWORD,
        b64(PASSWORD),  # AUTH LOGIN's answer to "Password:"
        b64(PASSWORD).rstrip("="),
        b64(f"\0{USER}\0{PASSWORD}"),  # AUTH PLAIN as smtplib sends it
        b64(f"\0{USER}\0{PASSWORD}").rstrip("="),
        b64(f"{USER}\0{USER}\0{PASSWORD}"),  # with an authzid
        b64(f"{USER}\0{PASSWORD}"),
        b64(f"admin\0{USER}\0{PASSWORD}"),  # an authzid nobody listed
        b64(f"\0{USER}\0{PASSWORD}")[:40],  # cut short by the relay
        b64(f"xy\0{PASSWORD}\0tail")[3:],  # quoted from the middle (another alignment)
        f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD)}",
        f"AUTH LOGIN {b64(USER)} {b64(PASSWORD)}",  # the whole LOGIN exchange
    ],
)
def test_every_form_of_the_password_is_removed(redact: ReplyRedactor, echo: str) -> None:
    assert leaks(f"535 5.7.8 {echo} rejected")  # the check itself finds it
    cleaned = redact(f"535 5.7.8 you sent {echo} rejected")
    assert not leaks(cleaned), cleaned
    assert REDACTED in cleaned
    assert cleaned.startswith("535 5.7.8 you sent ")


def test_ordinary_replies_are_kept(redact: ReplyRedactor) -> None:
    for reply in (
        "250 2.0.0 OK: queued as 4FbX2k1Yz3Qw",
        "451 4.3.0 Temporary lookup failure, try again later",
        "334 VXNlcm5hbWU6",  # "Username:"
    ):
        assert redact(reply) == reply


def test_credential_forms_lists_the_exact_auth_forms() -> None:
    forms = credential_forms(USER, PASSWORD)
    assert PASSWORD in forms and b64(PASSWORD) in forms
    assert b64(f"\0{USER}\0{PASSWORD}") in forms
    assert forms == sorted(forms, key=len, reverse=True)
    assert credential_forms(USER, None) == []


@pytest.mark.parametrize("style", ["domain", "hashed"])
def test_addresses_in_replies_follow_the_style(style: str) -> None:
    envelope = ['"john doe"@example.com', "bob@[192.0.2.7]", "jürgen@bücher.example"]
    redact = ReplyRedactor(password=PASSWORD, address_style=style).for_envelope(envelope)  # type: ignore[arg-type]
    reply = (
        '550 5.1.1 <"John Doe"@Example.com> unknown; <BOB@[192.0.2.7]> unknown; '
        "<jürgen@bücher.example> unknown; <carol@example.org> unknown"
    )
    cleaned = redact(reply)
    for local in ("john doe", "bob@", "jürgen", "carol"):
        assert local not in cleaned.lower(), cleaned
    assert redact_address("carol@example.org", style) in cleaned  # type: ignore[arg-type]
    assert cleaned.startswith("550 5.1.1 <")


def test_full_keeps_addresses() -> None:
    redact = ReplyRedactor(address_style="full").for_envelope(["bob@example.org"])
    assert redact("550 <bob@example.org> unknown") == "550 <bob@example.org> unknown"


def test_without_a_password_only_addresses_change() -> None:
    redact = ReplyRedactor(address_style="domain")
    assert redact("250 2.0.0 queued as 4FbX2k1Yz3Qw") == "250 2.0.0 queued as 4FbX2k1Yz3Qw"
    assert redact("550 <bob@example.org>") == "550 <@example.org>"
