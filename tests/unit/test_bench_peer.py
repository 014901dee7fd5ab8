"""The benchmark's comparison with the peer (the simplest pipeline), on hand-made results, and the
CPU accounting both sides share (real processes and threads, no pipeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from rich.console import Console

from bench.load import LoadResult, MailTemplate
from bench.procstats import proc_info
from bench.report import print_tables, summarize


def scenario(name: str, rate: float, cpu_ms: float) -> dict[str, Any]:
    return {
        "name": name,
        "throughput": {
            "e2e_rate": rate,
            "accept_rate": rate,
            "drained": True,
            "cpu_ms_per_mail": {"publisher": cpu_ms / 2, "subscriber": cpu_ms / 2, "smtp": 9.0},
            "machine_cores": {"busy": 1.5, "idle": 0.5, "steal": 0.0},
        },
    }


def result(*scenarios: dict[str, Any]) -> dict[str, Any]:
    return {
        "profile": "hand-made",
        "started_at": "2026-11-30T08:00:00+00:00",
        "loadavg_end": [1.0, 1.0, 1.0],
        "machine": {
            "nproc": 2,
            "cpu_model": "x",
            "ram_gib": 1.0,
            "python": "3.11",
            "loadavg": [1.0],
        },
        "baselines": {},
        "scenarios": list(scenarios),
    }


def test_the_headline_compares_the_means_of_mailpipe_and_the_peer() -> None:
    found = result(
        scenario("pull-1k-trace-off", 200.0, cpu_ms=6.0),
        scenario("pull-1k-trace-1.0", 150.0, cpu_ms=7.0),
        scenario("peer-1k", 500.0, cpu_ms=2.0),
        scenario("peer-1k-2", 480.0, cpu_ms=2.2),
        scenario("pull-1k-trace-1.0-2", 170.0, cpu_ms=7.4),
        scenario("pull-1k-trace-off-2", 200.0, cpu_ms=6.2),
        scenario("pull-1k-batch-100", 600.0, cpu_ms=1.8),
    )
    summary = summarize(found)
    found["summary"] = summary

    vs = summary["vs_peer"]
    assert vs["peer"] == {
        "runs": ["peer-1k", "peer-1k-2"],
        "e2e_rate": 490.0,
        "services_cpu_ms_per_mail": 2.1,  # publisher + subscriber only: not the SMTP sink's 9 ms
    }
    assert vs["mailpipe"]["services_cpu_ms_per_mail"] == pytest.approx(7.2)
    assert vs["cpu_ratio"] == pytest.approx(7.2 / 2.1, abs=1e-3)
    assert vs["rate_ratio"] == pytest.approx(160 / 490, abs=1e-3)
    assert vs["batch_cpu_ratio"] == pytest.approx(1.8 / 2.1, abs=1e-3)
    assert summary["tracing_cpu_cost"] == pytest.approx(7.2 / 6.1 - 1, abs=1e-3)
    verdicts = {t["target"]: t["met"] for t in summary["targets"]}
    assert [met for target, met in verdicts.items() if "simplest" in target] == [False, False, True]

    console = Console(record=True, width=200)
    print_tables(found, console)
    text = console.export_text()
    assert "mailpipe vs the simplest pipeline" in text
    assert "3.43x" in text and "0.33x" in text  # CPU and rate ratios of mailpipe, tracing 100 %
    assert "Tracing at 100 % costs +18.0% CPU per mail" in text


def test_without_a_peer_run_there_is_no_verdict() -> None:
    summary = summarize(result(scenario("pull-1k-trace-1.0", 150.0, cpu_ms=7.0)))

    assert summary["vs_peer"]["cpu_ratio"] is None
    assert all(t["met"] is None for t in summary["targets"] if "simplest" in t["target"])


def test_a_batch_request_counts_each_of_its_mails() -> None:
    template = MailTemplate(64, run="t", per_request=3)
    body = json.loads(template.render(2, 1.5))
    assert [m["subject"] for m in body["messages"]] == ["bench t 6", "bench t 7", "bench t 8"]
    assert {m["headers"]["X-Bench-Sent"] for m in body["messages"]} == {"1.500000"}
    load = LoadResult(statuses={202: 4, 207: 1}, mails_per_request=3)
    assert load.accepted == 12


def _cpu(pid: int) -> float:
    info = proc_info(pid)
    assert info is not None
    return info.cpu_seconds


def test_cpu_of_threads_and_of_children_that_ended_is_counted() -> None:
    burn = "import time\nwhile time.process_time() < 0.5: pass"
    before = _cpu(os.getpid())
    subprocess.run([sys.executable, "-c", burn], check=True)  # ended and reaped meanwhile
    thread = threading.Thread(target=lambda: _burn_thread(0.3))
    thread.start()
    thread.join()

    assert _cpu(os.getpid()) - before >= 0.8 - 0.05  # clock-tick rounding


def _burn_thread(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass
