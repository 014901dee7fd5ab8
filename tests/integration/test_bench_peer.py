"""The benchmark's peer (the simplest pipeline) and batch scenarios run in a tiny configuration.

Only the harness is checked: both ran on real processes (a fresh emulator each, the SMTP sink
process), every accepted mail arrived, both sides' services were measured as the same kinds of
process groups, and the headline's raw numbers are in the JSON. Numbers are not asserted.
"""

from __future__ import annotations

from pathlib import Path

from bench.plan import BATCH_SIZE, tiny
from bench.run import run_bench


def test_the_peer_and_a_batch_scenario_run_beside_mailpipe(tmp_path: Path) -> None:
    profile = tiny("peer-1k", mails=20, also=("pull-1k-batch-100",))

    result = run_bench(profile, baselines=False, work_dir=tmp_path)

    peer, batch = result["scenarios"]
    for scenario in (peer, batch):
        assert "error" not in scenario, scenario.get("traceback")
        throughput = scenario["throughput"]
        assert throughput["mails_delivered"] == throughput["mails_accepted"] > 0
        assert set(throughput["client"]["statuses"]) == {"202"}
        assert throughput["cpu_ms_per_mail"]["publisher"] >= 0
        # gunicorn's master and its worker; the subscriber one process: measured alike.
        assert scenario["processes"]["publisher"]["processes"] == 2
        assert scenario["processes"]["subscriber"]["processes"] == 1
    assert peer["label"].startswith("the simplest pipeline")
    assert batch["throughput"]["client"]["mails_per_request"] == BATCH_SIZE
    assert batch["throughput"]["mails_accepted"] % BATCH_SIZE == 0
    vs = result["summary"]["vs_peer"]
    assert vs["peer"]["runs"] == ["peer-1k"]
    assert vs["mailpipe_batch"]["runs"] == ["pull-1k-batch-100"]
    assert vs["peer"]["services_cpu_ms_per_mail"] is not None
    assert vs["batch_cpu_ratio"] is not None
