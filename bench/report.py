"""The results: targets checked against the issue's numbers, a rich table, and Markdown for docs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.plan import BATCH_RUNS, PEER_RUNS, REFERENCE, TRACE_OFF_RUNS, TRACE_ON_RUNS

TARGET_RATE = 500.0  # mails/s end to end, 1 KiB, tracing at 100 %
TARGET_BASELINE_FRACTION = 0.5
TARGET_TRACING_COST = 0.10
TARGET_P99_MS = 1000.0
TARGET_PEER_CPU_RATIO = 1.5  # issue 18: mailpipe's CPU per mail at most 1.5x the peer's
TARGET_PEER_RATE_RATIO = 0.67  # ... and its throughput at least 0.67x the peer's
SERVICES = ("publisher", "subscriber")
PROFILE_TOP_INCLUSIVE = 12
STEAL_WORTH_NOTING = 0.05  # cores of steal time in a throughput run
PROFILE_TOP_SELF = 8


def _scenario(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    for scenario in result.get("scenarios", []):
        if scenario["name"] == name and "throughput" in scenario:
            return scenario  # type: ignore[no-any-return]
    return None


def _rate(result: dict[str, Any], name: str) -> float | None:
    scenario = _scenario(result, name)
    return scenario["throughput"]["e2e_rate"] if scenario else None


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that were measured (None: none was)."""
    known = [v for v in values if v]
    return round(sum(known) / len(known), 2) if known else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers and each target: value, goal and whether it was met (None: not run)."""
    baselines = result.get("baselines", {})
    ref_rate = _rate(result, REFERENCE)
    depends = {
        "pubsub_publish": baselines.get("pubsub", {}).get("publish", {}).get("rate"),
        "pubsub_streaming_pull": baselines.get("pubsub", {}).get("streaming_pull", {}).get("rate"),
        "smtp_reused_connection": baselines.get("smtp_reused_connection", {}).get("rate"),
    }
    known = {k: v for k, v in depends.items() if v}
    slowest = min(known.items(), key=lambda kv: kv[1]) if known else None
    on_rate = _mean([_rate(result, name) for name in TRACE_ON_RUNS])
    off = _mean([_rate(result, name) for name in TRACE_OFF_RUNS])
    tenth = _rate(result, "pull-1k-trace-0.1")
    reference = _scenario(result, REFERENCE)
    p99_half = None
    if reference:
        for point in reference.get("latency", []):
            if point["fraction"] == 0.5:
                p99_half = point["p99_ms"]

    def check(value: float | None, ok: bool | None) -> bool | None:
        return None if value is None else ok

    def cpu_per_mail(name: str, parts: tuple[str, ...] = SERVICES) -> float | None:
        scenario = _scenario(result, name)
        if not scenario:
            return None
        per_mail = scenario["throughput"]["cpu_ms_per_mail"]
        return round(sum(per_mail.get(part, 0.0) for part in parts), 2)

    ref_cpu = _mean([cpu_per_mail(name) for name in TRACE_ON_RUNS])
    off_cpu = _mean([cpu_per_mail(name) for name in TRACE_OFF_RUNS])
    vs_peer = _vs_peer(result, cpu_per_mail)
    cpu_ratio, rate_ratio = vs_peer["cpu_ratio"], vs_peer["rate_ratio"]
    batch_ratio = vs_peer["batch_cpu_ratio"]
    all_cpu = cpu_per_mail(REFERENCE, (*SERVICES, "emulator_java", "smtp", "client"))
    nproc = result.get("machine", {}).get("nproc") or 1
    fraction = ref_rate / slowest[1] if ref_rate and slowest else None
    cost = 1 - on_rate / off if on_rate and off else None
    cost_tenth = 1 - tenth / off if tenth and off else None
    return {
        "reference_scenario": REFERENCE,
        "e2e_rate": ref_rate,
        "slowest_dependency": {"name": slowest[0], "rate": slowest[1]} if slowest else None,
        "tracing_cost_full": round(cost, 3) if cost is not None else None,
        "tracing_cost_tenth": round(cost_tenth, 3) if cost_tenth is not None else None,
        "services_cpu_ms_per_mail": {"tracing_full": ref_cpu, "tracing_off": off_cpu},
        "tracing_cpu_cost": round(ref_cpu / off_cpu - 1, 3) if ref_cpu and off_cpu else None,
        "all_processes_cpu_ms_per_mail": all_cpu,
        "cpu_ceiling_mails_per_s": round(nproc * 1000 / all_cpu, 1) if all_cpu else None,
        "vs_peer": vs_peer,
        "targets": [
            {
                "target": f"CPU per mail (publisher + subscriber) ≤ {TARGET_PEER_CPU_RATIO:g}x "
                "the simplest pipeline's",
                "value": cpu_ratio,
                "met": check(cpu_ratio, (cpu_ratio or 0) <= TARGET_PEER_CPU_RATIO),
            },
            {
                "target": f"mails/s end to end ≥ {TARGET_PEER_RATE_RATIO:g}x the simplest "
                "pipeline's",
                "value": rate_ratio,
                "met": check(rate_ratio, (rate_ratio or 0) >= TARGET_PEER_RATE_RATIO),
            },
            {
                "target": "batch (100 mails a request): CPU per mail < the simplest pipeline's",
                "value": batch_ratio,
                "met": check(batch_ratio, (batch_ratio or 1) < 1),
            },
            {
                "target": f"≥ {TARGET_RATE:g} mails/s end to end (1 KiB, tracing 100 %)",
                "value": ref_rate,
                "met": check(ref_rate, (ref_rate or 0) >= TARGET_RATE),
            },
            {
                "target": "pipeline ≥ 50 % of the slowest raw baseline it depends on",
                "value": round(fraction, 3) if fraction is not None else None,
                "met": check(fraction, (fraction or 0) >= TARGET_BASELINE_FRACTION),
            },
            {
                "target": "tracing (100 %, batch export) costs ≤ 10 % throughput",
                "value": round(cost, 3) if cost is not None else None,
                "met": check(cost, (cost if cost is not None else 1) <= TARGET_TRACING_COST),
            },
            {
                "target": "  same, measured as publisher+subscriber CPU per mail (less noisy)",
                "value": round(ref_cpu / off_cpu - 1, 3) if ref_cpu and off_cpu else None,
                "met": check(off_cpu, bool(ref_cpu and off_cpu and ref_cpu / off_cpu - 1 <= 0.10)),
            },
            {
                "target": "p99 < 1 s at 50 % of max rate",
                "value": p99_half,
                "met": check(p99_half, (p99_half or 0) < TARGET_P99_MS),
            },
        ],
    }


def _vs_peer(result: dict[str, Any], cpu_per_mail: Any) -> dict[str, Any]:
    """mailpipe (tracing 100 %, tracing off, batch) against the peer: the raw means and ratios.

    Each side is the mean over its runs (``runs``: those that produced numbers); CPU is the
    publisher's and subscriber's process groups (children and threads included), per mail.
    """

    def side(names: tuple[str, ...]) -> dict[str, Any]:
        ran = [name for name in names if _scenario(result, name)]
        return {
            "runs": ran,
            "e2e_rate": _mean([_rate(result, name) for name in ran]),
            "services_cpu_ms_per_mail": _mean([cpu_per_mail(name) for name in ran]),
        }

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    peer = side(PEER_RUNS)
    sides = {
        "peer": peer,
        "mailpipe": side(TRACE_ON_RUNS),
        "mailpipe_tracing_off": side(TRACE_OFF_RUNS),
        "mailpipe_batch": side(BATCH_RUNS),
    }
    found: dict[str, Any] = dict(sides)
    for key, prefix in (
        ("mailpipe", ""),
        ("mailpipe_tracing_off", "off_"),
        ("mailpipe_batch", "batch_"),
    ):
        found[f"{prefix}rate_ratio"] = ratio(sides[key]["e2e_rate"], peer["e2e_rate"])
        found[f"{prefix}cpu_ratio"] = ratio(
            sides[key]["services_cpu_ms_per_mail"], peer["services_cpu_ms_per_mail"]
        )
    return found


HEADLINE_ROWS = (  # docs/benchmarks.md says what each is
    ("peer", "peer: the simplest pipeline"),
    ("mailpipe", "mailpipe, tracing 100 %"),
    ("mailpipe_tracing_off", "mailpipe, tracing off"),
    ("mailpipe_batch", "mailpipe, batch of 100, tracing 100 %"),
)


def _headline_rows(result: dict[str, Any]) -> list[list[str]]:
    vs = result.get("summary", {}).get("vs_peer") or {}
    rows = []
    for key, label in HEADLINE_ROWS:
        side = vs.get(key)
        if not side or not side["runs"]:
            continue
        prefix = {"peer": None, "mailpipe": "", "mailpipe_tracing_off": "off_"}.get(key, "batch_")
        rate_ratio = 1.0 if prefix is None else vs.get(f"{prefix}rate_ratio")
        cpu_ratio = 1.0 if prefix is None else vs.get(f"{prefix}cpu_ratio")
        rows.append(
            [
                label,
                str(len(side["runs"])),
                _fmt(side["e2e_rate"]),
                f"{rate_ratio:.2f}x" if rate_ratio is not None else "-",
                _fmt(side["services_cpu_ms_per_mail"], 2),
                f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "-",
            ]
        )
    return rows


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


PARTS = ("publisher", "subscriber", "emulator_java", "smtp", "client")


def _rows(result: dict[str, Any]) -> dict[str, list[list[str]]]:
    baselines = result.get("baselines", {})
    base_rows = []
    for key, label in (
        ("smtp_new_connection", "SMTP, smtplib, new connection per mail (1 KiB)"),
        ("smtp_reused_connection", "SMTP, smtplib, one reused connection (1 KiB)"),
        ("smtp_reused_connection_100k", "SMTP, smtplib, one reused connection (100 KiB)"),
    ):
        if key in baselines:
            b = baselines[key]
            base_rows.append(
                [label, _fmt(b["rate"]), _fmt(b["mails"]), f"smtp {b['server_cpu_cores']:.2f}"]
            )
    pubsub = baselines.get("pubsub", {})
    for key, label in (
        ("publish", "Pub/Sub emulator publish, bare client (1 KiB)"),
        ("streaming_pull", "Pub/Sub emulator streaming pull + ack (1 KiB)"),
    ):
        if key in pubsub:
            b = pubsub[key]
            base_rows.append(
                [label, _fmt(b["rate"]), _fmt(b["messages"]), f"java {b['java_cpu_cores']:.2f}"]
            )

    pipe_rows: list[list[str]] = []
    lat_rows: list[list[str]] = []
    stage_rows: list[list[str]] = []
    for s in result.get("scenarios", []):
        if "throughput" not in s:
            pipe_rows.append([s["name"], "failed", s.get("error", "")[:60], "", ""])
            continue
        t = s["throughput"]
        rss = s.get("processes", {})
        per_mail = t["cpu_ms_per_mail"]
        pipe_rows.append(
            [
                s["name"],
                _fmt(t["accept_rate"]),
                _fmt(t["e2e_rate"]) + ("" if t["drained"] else " (not drained)"),
                "/".join(f"{per_mail.get(k, 0):.1f}" for k in PARTS),
                "/".join(f"{rss.get(k, {}).get('peak_rss_mib', 0):.0f}" for k in PARTS[:4]),
            ]
        )
        stages = s.get("stages")
        if stages:
            pub, sub = stages["publisher_alone"], stages["subscriber_alone"]
            stage_rows.append(
                [
                    f"{s['name']}: publisher alone (subscriber stopped)",
                    _fmt(pub["accept_rate"]),
                    f"{pub['cpu_ms_per_mail']['publisher']:.1f} ms/mail, "
                    f"{pub['cpu_cores']['publisher']:.2f} cores",
                ]
            )
            stage_rows.append(
                [
                    f"{s['name']}: subscriber alone (draining the backlog)",
                    _fmt(sub["rate"]),
                    f"{sub['cpu_ms_per_mail']['subscriber']:.1f} ms/mail, "
                    f"{sub['cpu_cores']['subscriber']:.2f} cores",
                ]
            )
        for point in s.get("latency", []):
            lat_rows.append(
                [
                    s["name"],
                    f"{point['fraction']:.0%}",
                    _fmt(point["target_rate"]),
                    _fmt(point["achieved_rate"]),
                    _fmt(point["p50_ms"], 1),
                    _fmt(point["p95_ms"], 1),
                    _fmt(point["p99_ms"], 1),
                    _fmt(point["client_lag_p99_ms"], 1),
                ]
            )
    target_rows = []
    for target in result.get("summary", {}).get("targets", []):
        met = {True: "met", False: "MISSED", None: "not run"}[target["met"]]
        target_rows.append(
            [
                target["target"],
                _fmt(target["value"], 3)
                if isinstance(target["value"], float) and target["value"] < 10
                else _fmt(target["value"]),
                met,
            ]
        )
    return {
        "headline": _headline_rows(result),
        "baselines": base_rows,
        "pipeline": pipe_rows,
        "stages": stage_rows,
        "latency": lat_rows,
        "targets": target_rows,
    }


HEADERS = {
    "headline": [
        "pipeline (pull, 1 KiB mails)",
        "runs",
        "e2e mails/s",
        "x peer",
        "CPU ms/mail publisher+subscriber",
        "x peer",
    ],
    "baselines": ["raw baseline", "msg/s", "count", "server CPU (cores)"],
    "pipeline": [
        "scenario",
        "accepted/s",
        "e2e mails/s",
        "CPU ms/mail pub/sub/java/smtp/client",
        "peak RSS MiB pub/sub/java/smtp",
    ],
    "stages": ["one side at a time", "mails/s", "CPU"],
    "latency": [
        "scenario",
        "load",
        "target/s",
        "achieved/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "client lag p99 ms",
    ],
    "targets": ["target", "value", "result"],
}
TITLES = {
    "headline": "Headline: mailpipe vs the simplest pipeline (same run, emulator, sink and load)",
    "baselines": "Raw baselines",
    "pipeline": "Pipeline throughput (HTTP request → SMTP 250, closed loop, 32 in flight)",
    "stages": "Each side's own capacity (reference scenario)",
    "latency": "Latency request → SMTP 250 (open loop at a fixed rate)",
    "targets": "Targets",
}


def findings(result: dict[str, Any]) -> list[str]:
    summary = result.get("summary", {})
    lines = []
    cpu = summary.get("services_cpu_ms_per_mail") or {}
    if summary.get("tracing_cpu_cost") is not None:
        lines.append(
            f"Tracing at 100 % costs {summary['tracing_cpu_cost']:+.1%} CPU per mail "
            f"(publisher + subscriber {cpu['tracing_full']:.2f} ms with it, "
            f"{cpu['tracing_off']:.2f} ms without; target ≤ {TARGET_TRACING_COST:.0%})."
        )
    if summary.get("all_processes_cpu_ms_per_mail"):
        lines.append(
            f"CPU per mail, all processes of the reference scenario: "
            f"{summary['all_processes_cpu_ms_per_mail']:.1f} ms -> at most "
            f"{summary['cpu_ceiling_mails_per_s']:.0f} mails/s on "
            f"{result['machine']['nproc']} cores even if nothing else ran."
        )
    if summary.get("slowest_dependency"):
        dep = summary["slowest_dependency"]
        lines.append(
            f"Slowest raw baseline the pipeline depends on: {dep['name']} {dep['rate']:,.0f}/s."
        )
    stolen = [
        f"{s['name']} {s['throughput']['machine_cores']['steal']:.2f}"
        for s in result.get("scenarios", [])
        if s.get("throughput", {}).get("machine_cores", {}).get("steal", 0) >= STEAL_WORTH_NOTING
    ]
    if stolen:
        lines.append(
            "CPU taken by the hypervisor during the throughput run (cores; those runs had a "
            f"slower machine): {', '.join(stolen)}."
        )
    return lines


def profile_errors(scenario: dict[str, Any]) -> list[tuple[str, str]]:
    """``(service, why)`` for each profile a scenario asked for and did not get."""
    profile = scenario.get("profile") or {}
    if "error" in profile:
        return [("the services", str(profile["error"]))]
    return [(service, p["error"]) for service, p in profile.items() if "error" in p]


def _profile_tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows): per profiled service, top functions by inclusive and self share."""
    tables = []
    for s in result.get("scenarios", []):
        for service, p in (s.get("profile") or {}).items():
            if not isinstance(p, dict) or "samples" not in p:
                continue  # an error: listed after the tables, not as one
            where = f"Profile {s['name']} / {service} ({p['samples']:,} GIL samples)"
            for key, kind, top in (
                ("top_inclusive", "inclusive", PROFILE_TOP_INCLUSIVE),
                ("top_self", "self", PROFILE_TOP_SELF),
            ):
                rows = [[f"{share:.1%}", function] for share, function in p[key][:top]]
                # bench.profile leaves wrappers out of the inclusive list: say so where it shows.
                function = "function" if kind == "self" else "function (pass-throughs left out)"
                tables.append((f"{where}: top by {kind} share", [kind, function], rows))
    return tables


def print_tables(result: dict[str, Any], console: Console) -> None:
    m = result["machine"]
    console.print(
        f"[bold]mailpipe benchmark[/] ({result['profile']}) {result['started_at']} — "
        f"{m['nproc']} x {m['cpu_model']}, {m['ram_gib']} GiB, Python {m['python']}, "
        f"load average {m['loadavg'][0]:.2f} at start, {result['loadavg_end'][0]:.2f} at end"
    )
    for key, rows in _rows(result).items():
        if not rows:
            continue
        table = Table(title=TITLES[key], title_justify="left")
        for header in HEADERS[key]:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in findings(result):
        console.print(line)
    for title, headers, rows in _profile_tables(result):
        # As wide as its title: rich would wrap a title wider than the table's columns.
        table = Table(title=title, title_justify="left", min_width=len(title))
        table.add_column(headers[0], justify="right")
        table.add_column(headers[1])
        for share, function in rows:
            table.add_row(share, escape(function))  # a function name is text, not rich markup
        console.print(table)


def markdown(result: dict[str, Any]) -> str:
    """The same tables as Markdown (docs/benchmarks.md)."""
    m = result["machine"]
    lines = [
        f"Run: `{result['command']}` ({result['profile']} profile), {result['started_at']}, "
        f"{result['duration_s']:.0f} s.",
        f"Machine: {m['nproc']} vCPU ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python "
        f"{m['python']}, {m['platform']}; load average (1 min) {m['loadavg'][0]:.2f} at start, "
        f"{result['loadavg_end'][0]:.2f} at end (the benchmark's own processes count in it).",
        "",
    ]
    for key, rows in _rows(result).items():
        if not rows:
            continue
        lines += [f"**{TITLES[key]}**", ""]
        lines.append("| " + " | ".join(HEADERS[key]) + " |")
        lines.append("|" + "---|" * len(HEADERS[key]))
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
        lines.append("")
    lines += [f"- {line}" for line in findings(result)]
    for title, headers, rows in _profile_tables(result):
        # In backticks: "<module>" would otherwise be read as an HTML tag.
        lines += ["", f"**{title}**", "", "| " + " | ".join(headers) + " |", "|---:|---|"]
        lines += [f"| {share} | `{function.replace('|', '/')}` |" for share, function in rows]
    return "\n".join(lines)
