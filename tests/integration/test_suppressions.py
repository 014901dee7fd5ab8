"""The suppression list on both record backends (SQLite file, Firestore emulator) and its HTTP
API served over loopback by the real publisher app: CRUD, hostile input, expiry, and the hashed
keys that keep no plain address (read back from the SQLite file and the Firestore documents)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from mailpipe.config import ConfigError, EnvReader
from mailpipe.logs import redact_secrets
from mailpipe.record import (
    DeliveryRecord,
    SuppressionList,
    SuppressionPolicy,
    SuppressionReason,
)
from mailpipe.record.firestore import FirestoreRecord
from mailpipe.record.sqlite import SqliteRecord
from mailpipe.record.store import utc_now
from publisher.app import create_app
from publisher.config import PublisherConfig
from publisher.suppressions import get_entry, list_entries, remove_entry
from subscriber.suppression import mailbox_gone
from tests.fixtures.http import serve_app

KEY = b"k" * 40
ADDRESS = "Ada.Lovelace@Example.ORG"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(params=["sqlite", "firestore"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[DeliveryRecord, Any]]:
    """A record and a way to read every stored suppression document raw."""
    clock = Clock()
    if request.param == "sqlite":
        path = tmp_path / "record.sqlite3"
        record: DeliveryRecord = SqliteRecord(path, clock=clock)

        def raw() -> str:
            with sqlite3.connect(path) as conn:
                return repr(conn.execute("SELECT * FROM suppressions").fetchall())
    else:
        request.getfixturevalue("firestore_emulator")
        project = request.getfixturevalue("pubsub_project")
        name = f"suppressions-{uuid.uuid4().hex[:8]}"
        record = FirestoreRecord(project=project, suppressions_collection=name, clock=clock)

        def raw() -> str:
            docs = record.store.client.collection(name).stream()  # type: ignore[attr-defined]
            return repr([(d.id, d.to_dict()) for d in docs])

    record.clock = clock  # type: ignore[attr-defined]
    yield record, raw
    record.close()


def test_hashed_keys_keep_no_address_and_expired_entries_are_ignored(
    backend: tuple[DeliveryRecord, Any],
) -> None:
    record, raw = backend
    clock = record.clock  # type: ignore[attr-defined]
    hashed = record.suppressions(SuppressionPolicy("hashed", KEY))
    entry = hashed.entry(ADDRESS, SuppressionReason.BOUNCE, reply_code=550, enhanced_status="5.1.1")
    later = clock.now + dt.timedelta(1)
    hashed.put(entry, hashed.entry("temp@example.org", SuppressionReason.MANUAL, expires_at=later))
    assert entry.address is None and entry.key.startswith("hmac-sha256:")
    stored = raw()
    assert "ada.lovelace" not in stored.lower() and "temp@" not in stored
    assert entry.key in stored and "example.org" in stored  # the domain is kept, as everywhere
    assert KEY.decode() not in redact_secrets(f"key={KEY.decode()}")  # nor is the key logged
    # Case-blind lookup, one batched read, only the suppressed come back.
    found = hashed.lookup(["ada.lovelace@example.org", "other@example.org", "temp@example.org"])
    assert set(found) == {"ada.lovelace@example.org", "temp@example.org"}
    assert found["ada.lovelace@example.org"].reply_code == 550
    clock.now += dt.timedelta(days=2)  # temp@ expired: ignored by every read
    assert set(hashed.lookup(["temp@example.org", ADDRESS])) == {ADDRESS}
    assert get_entry(hashed, "temp@example.org") is None
    assert [e.key for e in list_entries(hashed)[0]] == [entry.key]
    # Another key (or none) cannot find it: the key is what protects the address.
    other = record.suppressions(SuppressionPolicy("hashed", b"x" * 40))
    assert other.lookup([ADDRESS]) == {}
    assert remove_entry(hashed, entry.key) and get_entry(hashed, ADDRESS) is None


def test_full_mode_keeps_the_address_and_lists_by_filter_in_pages(
    backend: tuple[DeliveryRecord, Any],
) -> None:
    record, _ = backend
    clock = record.clock  # type: ignore[attr-defined]
    full = record.suppressions(SuppressionPolicy("full"))
    for i in range(5):
        clock.now += dt.timedelta(seconds=1)
        reason = SuppressionReason.BOUNCE if i % 2 else SuppressionReason.MANUAL
        full.put(full.entry(f"u{i}/x@d{i % 2}.example", reason))
    assert get_entry(full, "U1/X@d1.example").address == "u1/x@d1.example"  # type: ignore[union-attr]
    seen, token = [], None
    while True:
        page, token = list_entries(full, limit=2, page_token=token)
        seen += [e.address for e in page]
        if token is None:
            break
    assert seen == [f"u{i}/x@d{i % 2}.example" for i in range(5)]
    bounces, _ = list_entries(full, reason=SuppressionReason.BOUNCE)
    assert [e.address for e in bounces] == ["u1/x@d1.example", "u3/x@d1.example"]
    assert [e.address for e in list_entries(full, domain="D0.example")[0]] == [
        "u0/x@d0.example",
        "u2/x@d0.example",
        "u4/x@d0.example",
    ]


@pytest.mark.parametrize(
    ("code", "enhanced", "suppress"),
    [
        (550, "5.1.1", True),
        (550, "5.1.10", True),
        (550, "5.2.1", True),
        (553, "5.1.3", True),
        (552, "5.2.2", False),  # mailbox full: it empties
        (550, "5.7.1", False),  # policy: about the sender
        (554, "5.7.26", False),  # DMARC
        (550, None, False),  # no enhanced code: cannot tell
        (450, "4.1.1", False),  # transient
    ],
)
def test_which_refusals_suppress(code: int, enhanced: str | None, suppress: bool) -> None:
    assert mailbox_gone(code, enhanced) is suppress


def test_a_short_key_is_refused_by_name() -> None:
    env = EnvReader({"MAILPIPE_SUPPRESSION_KEY": "short"})
    SuppressionPolicy.read(env)
    with pytest.raises(ConfigError, match=r"MAILPIPE_SUPPRESSION_KEY.*at least 32 bytes"):
        env.finish()


# --- the HTTP API -------------------------------------------------------------------------------


class NoPublisher:
    def publish(self, mail: object) -> str:
        raise AssertionError("the suppression API publishes nothing")

    def close(self) -> None:
        pass


NO_PUBSUB = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:1"}


def api(record: DeliveryRecord, style: str, key: str | None) -> Any:
    env = {"MAILPIPE_LOG_ADDRESSES": style, **NO_PUBSUB}
    if key:
        env["MAILPIPE_SUPPRESSION_KEY"] = key
    config = PublisherConfig.from_env(env)
    app = create_app(
        config,
        publisher=NoPublisher(),  # type: ignore[arg-type]
        record=record,
        suppressions=record.suppressions(config.suppressions),
    )
    return serve_app(app)


@pytest.fixture
def sqlite_record(tmp_path: Path) -> Iterator[DeliveryRecord]:
    record = SqliteRecord(tmp_path / "record.sqlite3")
    yield record
    record.close()


def path(address: str) -> str:
    return "/v1/suppressions/" + quote(address, safe="@")


def test_api_crud_in_hashed_mode_never_echoes_the_address(
    sqlite_record: DeliveryRecord, tmp_path: Path
) -> None:
    with api(sqlite_record, "hashed", "s" * 48) as url, httpx.Client(base_url=url) as http:
        assert http.get(path(ADDRESS)).status_code == 404
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
        created = http.put(path(ADDRESS), json={"expires_at": expires})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["reason"] == "manual" and body["address"] is None
        assert body["domain"] == "example.org" and body["expires_at"].startswith(expires[:16])
        assert http.put(path(ADDRESS), json={"reason": "complaint"}).status_code == 200
        got = http.get(path(ADDRESS.lower()))
        assert got.json()["reason"] == "complaint"
        listed = http.get("/v1/suppressions", params={"reason": "complaint"}).json()
        assert [item["key"] for item in listed["items"]] == [body["key"]]
        for answer in (created, got):
            assert "lovelace" not in answer.text.lower()
        # The key the list shows removes the entry without the address.
        assert http.delete(path(body["key"])).status_code == 204
        assert http.delete(path(ADDRESS)).status_code == 404
    with sqlite3.connect(tmp_path / "record.sqlite3") as conn:
        assert "lovelace" not in repr(conn.execute("SELECT * FROM suppressions").fetchall())


class SlowReads:
    """The record's store with reads that take a while, as Firestore's do over the network: wide
    enough that concurrent requests overlap between a read and a write. Both reads are slowed, the
    batched one and a transaction's, so the test holds whichever the API decides 200/201 by."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_many(self, kind: Any, doc_ids: Any) -> Any:
        found = self._store.get_many(kind, doc_ids)
        time.sleep(0.2)  # the answer's way back
        return found

    def transact(self, operation: str, body: Any) -> Any:
        return self._store.transact(operation, lambda txn: body(SlowReads(txn)))

    def get(self, kind: Any, doc_id: Any) -> Any:  # a transaction's read
        found = self._store.get(kind, doc_id)
        time.sleep(0.2)
        return found


def test_concurrent_puts_of_one_address_answer_201_once(
    backend: tuple[DeliveryRecord, Any],
) -> None:
    record, _ = backend
    config = PublisherConfig.from_env({"MAILPIPE_LOG_ADDRESSES": "full", **NO_PUBSUB})
    store = SlowReads(record.store)
    suppressions = SuppressionList(store, config.suppressions, utc_now)
    app = create_app(
        config,
        publisher=NoPublisher(),  # type: ignore[arg-type]
        record=record,
        suppressions=suppressions,
    )
    start = threading.Barrier(4)

    def put(http: httpx.Client) -> int:
        start.wait(timeout=10)
        return http.put(path(ADDRESS), json={"reason": "complaint"}, timeout=30).status_code

    with serve_app(app) as url, httpx.Client(base_url=url) as http:
        with ThreadPoolExecutor(4) as pool:
            statuses = sorted(pool.map(put, [http] * 4))
        assert statuses == [200, 200, 200, 201]  # one added it; the others replaced it
        assert http.get(path(ADDRESS)).json()["reason"] == "complaint"


def test_a_wrong_method_or_path_does_not_echo_the_address(sqlite_record: DeliveryRecord) -> None:
    with api(sqlite_record, "hashed", "s" * 48) as url, httpx.Client(base_url=url) as http:
        wrong_method = http.post(path(ADDRESS), json={})
        wrong_path = http.get("/v1/suppression/" + quote(ADDRESS, safe="@"))  # a typo
    assert (wrong_method.status_code, wrong_path.status_code) == (405, 404)
    for answer in (wrong_method, wrong_path):
        assert answer.json()["error"]["message"], answer.text
        assert "lovelace" not in answer.text.lower(), answer.text


@pytest.mark.parametrize(
    ("address", "body", "field"),
    [
        ("not-an-address", {}, "address"),
        ("a@b@example.org", {}, "address"),
        ("=?utf-8?q?x?=@example.org", {}, "address"),
        ("line\nbreak@example.org", {}, "address"),  # no 404 repeating the path
        ("a/b/../c@example.org/", {}, "address"),
        ("ok@example.org", {"expires_at": "tomorrow"}, "expires_at"),
        ("ok@example.org", {"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ("ok@example.org", {"expires_at": 12}, "expires_at"),
        ("ok@example.org", {"reason": "bounce"}, "reason"),
        ("ok@example.org", {"reason": "manual", "address": "x"}, "address"),
        ("ok@example.org", ["manual"], None),
    ],
)
def test_api_refuses_bad_input_saying_what_to_fix(
    sqlite_record: DeliveryRecord, address: str, body: Any, field: str | None
) -> None:
    with api(sqlite_record, "full", None) as url, httpx.Client(base_url=url) as http:
        answer = http.put(path(address), json=body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["message"]
        if field:
            assert field in error["fields"]
        assert http.get("/v1/suppressions").json()["items"] == []  # nothing was stored


def test_api_query_errors_and_disabled_list(sqlite_record: DeliveryRecord) -> None:
    with api(sqlite_record, "full", None) as url, httpx.Client(base_url=url) as http:
        bad = http.get("/v1/suppressions", params={"limit": "0", "reason": "x"})
        assert bad.status_code == 400 and set(bad.json()["error"]["fields"]) == {"limit", "reason"}
        token = http.get("/v1/suppressions", params={"page_token": "forged"})
        assert token.status_code == 400 and "page_token" in token.json()["error"]["fields"]
    with api(sqlite_record, "domain", None) as url, httpx.Client(base_url=url) as http:
        off = http.get("/v1/suppressions")
        assert off.status_code == 503
        assert "MAILPIPE_SUPPRESSION_KEY" in off.json()["error"]["message"]


def test_an_address_with_a_slash_is_one_entry_in_full_mode(sqlite_record: DeliveryRecord) -> None:
    with api(sqlite_record, "full", None) as url, httpx.Client(base_url=url) as http:
        created = http.put(path("O/K@Example.org"), json={})
        assert created.status_code == 201 and created.json()["address"] == "o/k@example.org"
        assert http.get("/v1/suppressions/o/k@example.org").json()["key"] == "o%2Fk@example.org"
        assert http.delete(path("o/k@example.org")).status_code == 204


def test_without_a_key_the_api_says_the_list_is_off(sqlite_record: DeliveryRecord) -> None:
    # `hashed` keeps no address, so without MAILPIPE_SUPPRESSION_KEY there is no way to key one.
    with api(sqlite_record, "hashed", None) as url, httpx.Client(base_url=url) as http:
        listed = http.get("/v1/suppressions")
        put = http.put(path(ADDRESS), json={"reason": "manual"})
    for answer in (listed, put):
        error = answer.json()["error"]
        assert (answer.status_code, error["code"]) == (503, "suppressions_disabled"), answer.text
        assert "MAILPIPE_SUPPRESSION_KEY" in error["message"]
