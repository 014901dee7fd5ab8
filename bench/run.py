"""Run a profile: raw baselines, then each pipeline scenario; collect one JSON-ready result."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.baselines import pubsub_baselines, smtp_baseline
from bench.pipeline import ScenarioRunner
from bench.plan import Profile
from bench.procstats import machine
from bench.report import summarize
from bench.smtp_sink import SmtpSink

Update = Callable[[str, int, int], None]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "mailpipe",
        "google-cloud-pubsub",
        "grpcio",
        "gunicorn",
        "flask",
        "aiosmtpd",
        "opentelemetry-sdk",
        "httpx",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def new_stamp() -> str:
    """The UTC time that names a run's files: ``<stamp>-<profile>.json`` and its profiles."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def run_bench(
    profile: Profile,
    *,
    command: str = "python -m bench",
    only: set[str] | None = None,
    baselines: bool = True,
    work_dir: Path | None = None,
    update: Update | None = None,
    profile_dir: Path | None = None,
    stamp: str | None = None,
) -> dict[str, Any]:
    """Run ``profile`` and return the result (its JSON keys: docs/benchmarks.md).

    Only with ``profile_dir`` is anything written: each scenario's py-spy stacks, as
    ``<stamp>-<scenario>-<service>.folded`` there (see :mod:`bench.profile`).
    """
    update = update or (lambda label, done, total: None)
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "profile": profile.name,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": _versions(),
        "baselines": {},
        "scenarios": [],
    }
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as tmp:
        work = work_dir or Path(tmp)
        if baselines:
            result["baselines"] = _baselines(profile, work, update)
        for scenario in profile.scenarios:
            if only and scenario.name not in only:
                continue
            try:
                runner = ScenarioRunner(
                    scenario,
                    work_dir=work,
                    update=update,
                    profile_dir=profile_dir,
                    profile_prefix=f"{stamp or new_stamp()}-",
                )
                result["scenarios"].append(runner.run())
            except Exception as exc:  # one broken scenario must not lose the others' numbers
                result["scenarios"].append(
                    {
                        "name": scenario.name,
                        "group": scenario.group,
                        "label": scenario.label,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=5),
                    }
                )
    result["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["summary"] = summarize(result)
    return result


def _baselines(profile: Profile, work: Path, update: Update) -> dict[str, Any]:
    found: dict[str, Any] = {}
    with SmtpSink.start() as sink:
        for key, count, reuse, size in (
            ("smtp_new_connection", profile.smtp_new_connection_mails, False, 1024),
            ("smtp_reused_connection", profile.smtp_mails, True, 1024),
            ("smtp_reused_connection_100k", profile.smtp_mails // 4, True, 100 * 1024),
        ):
            found[key] = smtp_baseline(
                sink,
                count=count,
                reuse=reuse,
                body_bytes=size,
                progress=lambda n, key=key, count=count: update(f"baseline {key}", n, count),
            )
    total = profile.pubsub_messages * 2
    found["pubsub"] = pubsub_baselines(
        count=profile.pubsub_messages,
        log_dir=work / "baseline-logs",
        progress=lambda n: update("baseline pubsub publish + streaming pull", n, total),
    )
    return found


def write_result(
    result: dict[str, Any], directory: Path = RESULTS_DIR, stamp: str | None = None
) -> Path:
    """Write ``<stamp>-<profile>.json`` (``stamp``: now unless given) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp or new_stamp()}-{result['profile']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
