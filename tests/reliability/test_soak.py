"""A bounded soak: mails at a steady rate through the whole stack, memory and connections flat.

``MAILPIPE_SOAK_SECONDS`` sets the length (default 60 s in CI; run 600 by hand for the 10-minute
soak) and ``MAILPIPE_SOAK_RATE`` the mails per second (default 10). Once a second the test samples,
from ``/proc`` (no psutil), the resident memory (``VmRSS``) and the open file descriptors and
sockets of the publisher's gunicorn worker and of the pull worker, plus the SMTP server's open
connections.

"Flat" compares the mean of the last quarter of the samples with the first quarter's:

- memory may grow by at most 16 MiB + 15 %: the first minute still fills caches that plateau
  (gRPC channel buffers, SQLite's page cache, the OpenTelemetry batch queue, Python's allocator
  arenas), which is not a leak; a leak of the size that matters — a few KiB per mail, i.e. tens
  of MiB per 10,000 mails — breaks the bound in the 10-minute run;
- descriptors and sockets may grow by at most 8: a few gRPC sub-channels and pooled SMTP
  connections open and close as load varies; a leak of one per mail would be hundreds;
- SMTP connections stay within the pool (``MAILPIPE_SMTP_POOL_SIZE``, default 4).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import pytest

from emulator import RunningEmulator, delete_topology
from emulator.pipeline import run_local_pipeline
from tests.reliability.harness import (
    PostResult,
    StampedSmtpServer,
    children,
    describe_windows,
    mail,
    open_fds,
    post,
    print_counts,
    record_window_ms,
    reliability_topology,
    rss_kib,
    tally,
    tcp_connections,
    wait_settled,
)

SOAK_SECONDS = float(os.environ.get("MAILPIPE_SOAK_SECONDS", "60"))
SOAK_RATE = float(os.environ.get("MAILPIPE_SOAK_RATE", "10"))
RSS_MARGIN_KIB = 16 * 1024
RSS_MARGIN_RATIO = 0.15
FD_MARGIN = 8
POOL_SIZE = 4


def quarter_means(samples: list[float]) -> tuple[float, float]:
    quarter = max(1, len(samples) // 4)
    return statistics.fmean(samples[:quarter]), statistics.fmean(samples[-quarter:])


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS) + 240)
def test_soak_steady_rate_memory_and_connections_stay_flat(
    tmp_path: Path, pubsub_emulator: RunningEmulator, pubsub_project: str
) -> None:
    topology = reliability_topology()
    smtp = StampedSmtpServer().start()
    results: list[PostResult] = []
    samples: dict[str, list[float]] = {}
    try:
        with run_local_pipeline(
            state_dir=tmp_path / "state",
            project=pubsub_project,
            topology=topology,
            smtp_server=smtp,
            extra_env={"MAILPIPE_SMTP_POOL_SIZE": str(POOL_SIZE)},
        ) as pipeline:
            [publisher_worker] = children(pipeline.publisher.process.pid)  # gunicorn's worker
            subscriber = pipeline.subscriber.process.pid
            total = int(SOAK_SECONDS * SOAK_RATE)
            start = time.monotonic()

            def load() -> None:
                for i in range(total):
                    time.sleep(max(0.0, start + i / SOAK_RATE - time.monotonic()))
                    results.append(post(pipeline.publisher_url, mail(f"soak-{i}")))

            loader = threading.Thread(target=load, name="soak-load")
            loader.start()
            while loader.is_alive() and time.monotonic() - start < SOAK_SECONDS + 60:
                for name, pid in (("publisher", publisher_worker), ("subscriber", subscriber)):
                    rss, fds, socks = rss_kib(pid), open_fds(pid), tcp_connections(pid)
                    assert rss is not None and fds is not None, f"{name} ({pid}) is gone"
                    samples.setdefault(f"{name}_rss_kib", []).append(rss)
                    samples.setdefault(f"{name}_fds", []).append(fds)
                    samples.setdefault(f"{name}_sockets", []).append(socks or 0)
                samples.setdefault("smtp_connections", []).append(smtp.open_connections)
                time.sleep(1.0)
            loader.join(timeout=60)
            assert not loader.is_alive()
            accepted = [r.mail_id for r in results if r.status == 202 and r.mail_id]
            records = wait_settled(pipeline.state_dir / "record.sqlite3", accepted, timeout=90)
            receipts = smtp.receipts()
            max_smtp = smtp.max_open_connections
    finally:
        smtp.stop()
        delete_topology(topology, project=pubsub_project, emulator_host=pubsub_emulator.host)

    counts = tally(accepted, receipts, records, not_accepted=total - len(accepted))
    windows = [
        w
        for mail_id, stamps in receipts.items()
        if (w := record_window_ms(records.get(mail_id), stamps[-1])) is not None
    ]
    flat = {name: quarter_means(values) for name, values in samples.items()}
    counts.notes.update(
        seconds=SOAK_SECONDS,
        rate=SOAK_RATE,
        samples=len(samples["smtp_connections"]),
        max_smtp_connections=max_smtp,
        **{f"{name}_q1_q4": f"{a:.0f}->{b:.0f}" for name, (a, b) in flat.items()},
        **describe_windows(windows),
    )
    print_counts("soak", counts)

    assert counts.not_accepted == 0
    assert counts.lost == 0 and counts.duplicated == 0
    assert counts.delivered == total
    assert len(samples["smtp_connections"]) >= 8, "too few samples to judge"
    for name, (first, last) in flat.items():
        if name.endswith("_rss_kib"):
            assert last <= first * (1 + RSS_MARGIN_RATIO) + RSS_MARGIN_KIB, (name, first, last)
        elif name != "smtp_connections":
            assert last <= first + FD_MARGIN, (name, first, last)
    assert max_smtp <= POOL_SIZE
