"""Hypothesis strategies for the hostile-input classes of issue 16, shared by the fuzz tests.

JSON *text* is generated, not Python values: an integer past Python's int/str digit limit, a
``NaN`` or a lone-surrogate escape cannot come out of ``json.dumps`` reliably, and they are
exactly what a hostile client sends.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
from typing import Any

from hypothesis import strategies as st

from mailpipe.httpjson import MAX_INTEGER_DIGITS, MAX_JSON_DEPTH

PLACEHOLDER = "@@hostile@@"
INT_DIGIT_LIMIT = sys.get_int_max_str_digits() or 4300

lone_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# A string holding at least one lone surrogate somewhere (never a valid pair: one surrogate).
text_with_lone_surrogate = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=6),
    lone_surrogates,
    st.text(max_size=6),
)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# Each is JSON text the services must refuse with 400, whatever field it sits in.
hostile_json_leaf = st.one_of(
    st.integers(MAX_JSON_DEPTH + 1, 20_000).map(_nested),
    st.integers(INT_DIGIT_LIMIT + 1, 3 * INT_DIGIT_LIMIT).map(lambda n: "9" * n),
    st.integers(MAX_INTEGER_DIGITS + 1, INT_DIGIT_LIMIT).map(lambda n: "-" + "1" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-2.5e999"]),
    text_with_lone_surrogate.map(lambda s: json.dumps(s, ensure_ascii=True)),
)
HOSTILE_CODES = {"json_too_deep", "invalid_json", "invalid_encoding"}


def with_hostile_leaf(template: Any, leaf_paths: list[tuple[Any, ...]]) -> st.SearchStrategy[bytes]:
    """``template`` as JSON text with one of ``leaf_paths`` replaced by a hostile leaf (or its
    key, for a path ending in ``"<key>"``, by a key holding a lone surrogate)."""

    def build(path: tuple[Any, ...], leaf: str, key: str) -> bytes:
        document = json.loads(json.dumps(template))
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        if path[-1] == "<key>":
            parent[key] = 1
            return json.dumps(document, ensure_ascii=True).encode()
        parent[path[-1]] = PLACEHOLDER
        return json.dumps(document).replace(f'"{PLACEHOLDER}"', leaf, 1).encode()

    return st.builds(
        build, st.sampled_from(leaf_paths), hostile_json_leaf, text_with_lone_surrogate
    )


# Every offset a timestamp can carry (fromisoformat refuses 24:00 and beyond).
offsets = st.none() | st.timedeltas(
    min_value=-dt.timedelta(hours=23, minutes=59), max_value=dt.timedelta(hours=23, minutes=59)
).map(dt.timezone)
any_time = st.builds(
    lambda moment, offset: moment.replace(tzinfo=offset),
    st.datetimes(min_value=dt.datetime.min, max_value=dt.datetime.max),
    offsets,
)
edge_times = st.sampled_from(
    [
        "0001-01-01T00:00:00+01:00",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-01:00",
        "9999-12-31T23:59:59.999999-23:59",
    ]
)


def page_token(payload: Any) -> str:
    """A page token of the API's shape (base64url of JSON) around any payload."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


forged_page_tokens = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=60).map(page_token),
    st.builds(
        lambda moment, mail_id: page_token([moment, mail_id]),
        any_time.map(dt.datetime.isoformat) | edge_times | st.text(max_size=10),
        st.text(max_size=20) | text_with_lone_surrogate | st.sampled_from(["a/b", "..", "__x__"]),
    ),
    hostile_json_leaf.map(lambda leaf: page_token(f'["2026-01-01T00:00:00", {leaf}]'.encode())),
)
