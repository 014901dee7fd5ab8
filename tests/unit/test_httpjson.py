"""The strict JSON reading both services apply to request bodies (mailpipe.httpjson.parse_json)."""

from __future__ import annotations

import json
import sys

import pytest

from mailpipe.httpjson import MAX_INTEGER_DIGITS, MAX_JSON_DEPTH, JsonBodyError, parse_json


def refused(raw: bytes) -> JsonBodyError:
    with pytest.raises(JsonBodyError) as caught:
        parse_json(raw)
    assert caught.value.message
    return caught.value


def test_ordinary_json_is_read() -> None:
    body = {"to": ["a@example.org"], "metadata": {"n": 12, "x": 1.5, "ok": True, "none": None}}
    assert parse_json(json.dumps(body).encode()) == body


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_nesting_deeper_than_the_limit_is_refused(depth: int) -> None:
    error = refused(b"[" * depth + b"]" * depth)
    assert error.code == "json_too_deep"
    assert str(MAX_JSON_DEPTH) in error.message


def test_nesting_up_to_the_limit_is_read() -> None:
    raw = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(raw) is not None


def test_an_integer_beyond_pythons_digit_limit_is_refused() -> None:
    digits = (sys.get_int_max_str_digits() or 4300) + 1
    error = refused(b'{"metadata": {"n": ' + b"9" * digits + b"}}")
    assert error.code == "invalid_json"
    assert f"{digits} digits" in error.message


def test_integers_longer_than_the_limit_are_refused_and_up_to_it_read() -> None:
    assert parse_json(b"-" + b"9" * MAX_INTEGER_DIGITS) == -int("9" * MAX_INTEGER_DIGITS)
    assert refused(b"9" * (MAX_INTEGER_DIGITS + 1)).code == "invalid_json"


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_numbers_that_are_not_finite_are_refused(number: bytes) -> None:
    assert refused(b'{"x": ' + number + b"}").code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (rb'{"subject": "\ud800"}', "subject"),
        (rb'{"to": ["ok@example.org", "a\udfff@example.org"]}', "to.1"),
        (rb'{"headers": {"\udc00": "x"}}', "headers"),
        (rb'"\ud800"', "body"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(raw: bytes, field: str) -> None:
    error = refused(raw)
    assert error.code == "invalid_encoding"
    assert field in error.fields
    assert "lone surrogate" in error.fields[field]


def test_a_surrogate_pair_is_ordinary_text() -> None:
    assert parse_json(rb'{"subject": "\ud83d\ude00"}') == {"subject": "\N{GRINNING FACE}"}


@pytest.mark.parametrize("raw", [b"\xff", b'{"a": "\xed\xa0\x80"}', b'"\xc3"'])
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    assert refused(raw).code == "invalid_encoding"


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b"\xef\xbb\xbf{}", b"[1,]"])
def test_malformed_json_is_refused(raw: bytes) -> None:
    assert refused(raw).code in ("invalid_json", "invalid_encoding")
