"""The demo follows ``mailpipe events tail --json``'s output incrementally (emulator/demo.py):
each look reads only what was appended since the last one, never the whole file again. The file
is written here the way the tail writes it (appended lines, its own messages between events)."""

from __future__ import annotations

import json
from pathlib import Path

from emulator.demo import FollowedEvents


def event_line(mail_id: str, kind: str, attempt: int, at: str) -> bytes:
    event = {"mail_id": mail_id, "type": kind, "attempt": attempt, "occurred_at": at}
    return (json.dumps({"event": event}) + "\n").encode()


def test_each_look_reads_only_what_was_appended(tmp_path: Path) -> None:
    path = tmp_path / "events-tail.log"
    path.write_bytes(
        b"tailing projects/p/subscriptions/s\n"
        + event_line("m-1", "deferred", 1, "2026-11-30T10:00:01+00:00")
        + event_line("m-2", "accepted", 0, "2026-11-30T10:00:00+00:00")
        + event_line("m-1", "accepted", 0, "2026-11-30T10:00:00+00:00")
    )
    events = FollowedEvents(path)

    assert events.types("m-1") == ["accepted", "deferred"]  # in the order they happened
    assert events.offset == path.stat().st_size
    # What was read is not read again: a change to it goes unseen (a re-read would see "bounced").
    path.write_bytes(path.read_bytes().replace(b'"deferred"', b'"bounced" '))
    with path.open("ab") as log:
        log.write(event_line("m-1", "delivered", 2, "2026-11-30T10:00:02+00:00"))
        partial = event_line("m-1", "replayed", 3, "2026-11-30T10:00:03+00:00")
        log.write(partial[:20])  # the tail is still writing this line

    assert events.types("m-1") == ["accepted", "deferred", "delivered"]
    assert events.offset == path.stat().st_size - 20
    with path.open("ab") as log:
        log.write(partial[20:])
    assert events.types("m-1") == ["accepted", "deferred", "delivered", "replayed"]
    assert events.types("m-2") == ["accepted"] and events.types("m-3") == []
    assert events.offset == path.stat().st_size
    assert len(events.lines) == 5  # the event lines as printed, for events.jsonl
