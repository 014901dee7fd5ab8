"""The benchmark report's arithmetic on hand-made results (no pipeline is run)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import findings, summarize


def scenario(name: str, rate: float, cpu_ms: float = 10.0, steal: float = 0.0) -> dict[str, Any]:
    return {
        "name": name,
        "throughput": {
            "e2e_rate": rate,
            "cpu_ms_per_mail": {"publisher": cpu_ms / 2, "subscriber": cpu_ms / 2},
            "machine_cores": {"busy": 1.5, "idle": 0.5 - steal, "steal": steal},
        },
    }


def result(*scenarios: dict[str, Any]) -> dict[str, Any]:
    return {"machine": {"nproc": 2}, "baselines": {}, "scenarios": list(scenarios)}


def test_tracing_cost_compares_the_means_of_the_abba_runs() -> None:
    summary = summarize(
        result(
            scenario("pull-1k", 500.0),  # the reference is not one of the tracing runs
            scenario("pull-1k-trace-off", 100.0, cpu_ms=10.0),
            scenario("pull-1k-trace-1.0", 90.0, cpu_ms=11.0),
            scenario("pull-1k-trace-1.0-2", 80.0, cpu_ms=12.0),
            scenario("pull-1k-trace-off-2", 100.0, cpu_ms=10.0),
        )
    )

    assert summary["tracing_cost_full"] == pytest.approx(0.15)  # 1 - 85 / 100
    assert summary["tracing_cpu_cost"] == pytest.approx(0.15)  # 11.5 / 10 - 1
    target = next(t for t in summary["targets"] if t["target"].startswith("tracing"))
    assert target["met"] is False


def test_one_pair_is_enough_and_no_pair_is_no_verdict() -> None:
    one_pair = summarize(
        result(scenario("pull-1k-trace-off", 100.0), scenario("pull-1k-trace-1.0", 95.0))
    )
    assert one_pair["tracing_cost_full"] == pytest.approx(0.05)

    none = summarize(result(scenario("pull-1k", 80.0)))
    assert none["tracing_cost_full"] is None
    target = next(t for t in none["targets"] if t["target"].startswith("tracing"))
    assert target["met"] is None


def test_runs_on_a_machine_with_cpu_stolen_are_named() -> None:
    found = result(scenario("pull-1k", 80.0, steal=0.01), scenario("push-1k", 60.0, steal=0.25))
    found["summary"] = summarize(found)

    [line] = [line for line in findings(found) if "hypervisor" in line]
    assert "push-1k 0.25" in line
    assert "pull-1k" not in line
