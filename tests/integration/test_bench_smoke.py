"""The benchmark harness runs end to end in a tiny configuration and writes the JSON it promises.

Only the harness is checked (it ran, every part reported, the keys are there); its numbers are
not, since timing assertions do not belong in the test suite (the benchmark itself lives in
bench/). Real parts: a fresh Pub/Sub emulator, the services as processes, the SMTP sink process.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main


def test_tiny_bench_run_writes_the_expected_json(tmp_path: Path) -> None:
    exit_code = main(["--tiny", "--profile", "--out", str(tmp_path)])

    assert exit_code == 0
    (path,) = tmp_path.glob("*-tiny.json")
    result = json.loads(path.read_text())
    assert {"machine", "versions", "baselines", "scenarios", "summary", "loadavg_end"} <= set(
        result
    )
    assert {"nproc", "cpu_model", "ram_gib", "python", "loadavg"} <= set(result["machine"])
    baselines = result["baselines"]
    assert {"smtp_new_connection", "smtp_reused_connection"} <= set(baselines)
    assert (
        baselines["smtp_reused_connection"]["received"]
        == baselines["smtp_reused_connection"]["mails"]
    )
    assert {"publish", "streaming_pull"} <= set(baselines["pubsub"])
    assert (
        baselines["pubsub"]["streaming_pull"]["messages"]
        == baselines["pubsub"]["publish"]["messages"]
    )

    (scenario,) = result["scenarios"]
    assert "error" not in scenario, scenario.get("traceback")
    throughput = scenario["throughput"]
    # Every accepted mail reached the SMTP server, carrying the client's send time.
    assert throughput["mails_accepted"] == 20
    assert throughput["mails_delivered"] == 20
    assert throughput["latency_closed_loop"]["count"] == 20
    assert throughput["e2e_rate"] > 0
    assert {"publisher", "subscriber", "emulator_java", "smtp"} <= set(scenario["processes"])
    assert all(p["peak_rss_mib"] > 0 for p in scenario["processes"].values())
    (point,) = scenario["latency"]
    assert point["fraction"] == 0.5
    assert point["mails_delivered"] == point["mails_accepted"] > 0
    assert {"p50_ms", "p95_ms", "p99_ms"} <= set(point)
    assert {"publisher_alone", "subscriber_alone"} <= set(scenario["stages"])
    assert scenario["stages"]["subscriber_alone"]["mails"] == 20
    assert [t["target"] for t in result["summary"]["targets"]]

    # The whole machine's CPU during the run: the benchmark itself kept it busy.
    machine_cores = scenario["throughput"]["machine_cores"]
    assert set(machine_cores) == {"busy", "idle", "steal"}
    assert machine_cores["busy"] > 0
    assert min(machine_cores.values()) >= 0

    # --profile: one more run (20 mails, ~1 s) under py-spy, its stacks next to the JSON.
    stamp = path.name.removesuffix("-tiny.json")
    profile = scenario["profile"]
    assert set(profile) == {"publisher", "subscriber"}, profile
    for service, found in profile.items():
        assert "error" not in found, found
        assert found["file"] == f"{stamp}-pull-1k-{service}.folded"
        assert (tmp_path / found["file"]).is_file()
        assert isinstance(found["samples"], int)
    # A few samples each at 100 Hz: either may draw none; both none means nothing was sampled.
    assert profile["publisher"]["samples"] + profile["subscriber"]["samples"] > 0
    assert scenario["profile_run"]["mails_delivered"] == 20
