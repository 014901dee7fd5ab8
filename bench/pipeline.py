"""One pipeline scenario: the real services as processes, loaded over HTTP, timed at the SMTP sink.

The stack is :func:`emulator.pipeline.run_local_pipeline` (a fresh Pub/Sub emulator, ``python -m
publisher`` under gunicorn, ``python -m subscriber pull|push``) delivering to the benchmark's
own SMTP process (:mod:`bench.smtp_sink`), so the SMTP server's CPU is apart from the
services'. Extra pull workers are started with :func:`emulator.pipeline.start_service` on the same
subscription. A ``stack="peer"`` scenario runs the simplest pipeline a user would write instead
(:mod:`bench.peer`) in the same way: its own fresh emulator, the same sink, the same load; a
``batch`` scenario sends that many mails per request to ``POST /v1/messages:batch``.

Per scenario: warm-up (not measured) → closed-loop throughput run (``mails`` requests,
``concurrency`` in flight; e2e rate = delivered / (last SMTP 250 - first request start)) →
open-loop latency runs at fractions of that rate → peak RSS of every process → with ``--profile``,
one more closed-loop run under py-spy (:mod:`bench.profile`), last so it disturbs no number.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.load import LoadResult, MailTemplate, closed_loop, open_loop
from bench.peer import PeerPipeline, run_peer_pipeline
from bench.procstats import GroupSample, machine_cpu, sample_group, sample_pid
from bench.profile import record, worker_pids
from bench.smtp_sink import SmtpSink
from emulator.pipeline import (
    PULL_READY_MARKER,
    LocalPipeline,
    ServiceProcess,
    run_local_pipeline,
    start_service,
)
from emulator.smtp import LocalSmtpServer

Update = Callable[[str, int, int], None]  # (label, completed, total)
PROFILE_SECONDS = 20.0  # the profile run's mails are capped to about this long at the measured rate


@dataclass(frozen=True)
class Scenario:
    """One pipeline configuration and how hard to push it."""

    name: str
    group: str
    mode: Literal["pull", "push"] = "pull"
    body_bytes: int = 1024
    traces: Literal["file", "none"] = "file"
    sample_ratio: float = 1.0
    pool_size: int = 4
    subscribers: int = 1
    mails: int = 2000
    warmup: int = 300
    concurrency: int = 32
    latency_fractions: tuple[float, ...] = ()
    latency_seconds: float = 8.0
    max_seconds: float = 90.0
    client: Literal["raw", "httpx"] = "raw"
    stages: bool = False  # also measure the publisher alone and the subscriber alone
    stack: Literal["mailpipe", "peer"] = "mailpipe"  # peer: the simplest pipeline (bench.peer)
    batch: int = 1  # mails per request; > 1: POST /v1/messages:batch

    @property
    def path(self) -> str:
        return "/v1/messages:batch" if self.batch > 1 else "/v1/messages"

    def env(self) -> dict[str, str]:
        return {
            "MAILPIPE_TRACES": self.traces,
            "MAILPIPE_TRACE_SAMPLE_RATIO": str(self.sample_ratio),
            "MAILPIPE_SMTP_POOL_SIZE": str(self.pool_size),
            "MAILPIPE_SMTP_TIMEOUT": "30",
        }

    @property
    def planned_mails(self) -> int:
        return self.warmup + self.mails

    @property
    def label(self) -> str:
        size = f"{self.body_bytes // 1024} KiB"
        if self.stack == "peer":
            return f"the simplest pipeline (peer): pull {size}, no record, no tracing"
        tracing = "off" if self.traces == "none" else f"{self.sample_ratio:g}"
        workers = f"{self.subscribers}x" if self.subscribers > 1 else ""
        batch = f", {self.batch} mails per request" if self.batch > 1 else ""
        return f"{workers}{self.mode} {size}, tracing {tracing}, pool {self.pool_size}{batch}"


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | None]:
    def ms(value: float | None) -> float | None:
        return round(value * 1000, 2) if value is not None else None

    return {
        "count": len(latencies_s),
        "p50_ms": ms(percentile(latencies_s, 50)),
        "p95_ms": ms(percentile(latencies_s, 95)),
        "p99_ms": ms(percentile(latencies_s, 99)),
        "max_ms": ms(max(latencies_s, default=None)) if latencies_s else None,
    }


class _Processes:
    """The scenario's processes, measured by name."""

    def __init__(
        self, pipe: LocalPipeline | PeerPipeline, extra: list[ServiceProcess], sink: SmtpSink
    ) -> None:
        self.pipe, self.extra, self.sink = pipe, extra, sink

    def samples(self) -> dict[str, GroupSample]:
        emulator_pid = self.pipe.emulators.pubsub.pid
        subscribers = [self.pipe.subscriber, *self.extra]
        result = {
            "publisher": sample_group(self.pipe.publisher.process.pid),
            "subscriber": GroupSample(
                tuple(m for s in subscribers for m in sample_group(s.process.pid).members)
            ),
            "emulator_java": sample_group(emulator_pid, only="java")
            if emulator_pid
            else GroupSample(()),
            "smtp": sample_pid(self.sink.pid),
        }
        return result

    def workers(self) -> dict[str, int]:
        """The Python processes doing the services' work, by name: the publisher's gunicorn
        worker (not its master), each subscriber (its worker in push mode)."""
        found = {}
        for service in (self.pipe.publisher, self.pipe.subscriber, *self.extra):
            pids = worker_pids(service.process.pid)
            for number, pid in enumerate(pids, 1):
                found[service.name if len(pids) == 1 else f"{service.name}-worker-{number}"] = pid
        return found


def _cpu(samples: dict[str, GroupSample]) -> dict[str, float]:
    return {name: sample.cpu_seconds for name, sample in samples.items()}


def _cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {
        name: round((after[name] - before.get(name, 0.0)) / seconds, 3) if seconds > 0 else 0.0
        for name in after
    }


def _per_mail(before: dict[str, float], after: dict[str, float], mails: int) -> dict[str, float]:
    return {
        name: round((after[name] - before.get(name, 0.0)) * 1000 / mails, 2) if mails else 0.0
        for name in after
    }


@dataclass
class _Run:
    load: LoadResult
    records: list[tuple[float, float | None, int]]
    window_seconds: float
    cpu_cores: dict[str, float]
    cpu_ms_per_mail: dict[str, float]
    drained: bool
    machine_cores: dict[str, float]  # the whole machine: busy, idle, steal


class ScenarioRunner:
    """Runs a :class:`Scenario` and returns its JSON-ready result."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        work_dir: Path,
        update: Update | None = None,
        profile_dir: Path | None = None,
        profile_prefix: str = "",
    ) -> None:
        """``profile_dir``: also profile the services (``<profile_prefix><scenario>-<service>
        .folded`` files there); None: no profile run."""
        self.s = scenario
        self.work_dir = work_dir
        self.update = update or (lambda label, done, total: None)
        self.profile_dir = profile_dir
        self.profile_prefix = profile_prefix
        self._expected = 0

    def run(self) -> dict[str, Any]:
        s = self.s
        result: dict[str, Any] = {
            "name": s.name,
            "group": s.group,
            "label": s.label,
            "config": asdict(s),
            "loadavg_start": list(os.getloadavg()),
        }
        with ExitStack() as stack:
            self.update(f"{s.name}: starting", 0, s.planned_mails)
            sink = stack.enter_context(SmtpSink.start())
            pipe = stack.enter_context(self._pipeline(sink))
            extra = list(self._extra_subscribers(pipe, stack))
            processes = _Processes(pipe, extra, sink)
            url = f"{pipe.publisher_url}{s.path}"
            template = MailTemplate(s.body_bytes, run=s.name, per_request=s.batch)

            self._closed(url, template, s.warmup, processes, label="warm-up")
            sink.take()

            run = self._closed(url, template, s.mails, processes, label="throughput")
            result["throughput"] = self._throughput(run)
            if s.stages:
                result["stages"] = self._stages(url, template, processes)
            rate = result["throughput"]["e2e_rate"] or 0.0
            result["latency"] = []
            for fraction in s.latency_fractions:
                if rate <= 0:
                    break
                run = self._open(url, template, fraction * rate, processes)
                result["latency"].append(self._latency(run, fraction, fraction * rate))
            samples = processes.samples()
            result["processes"] = {
                name: {
                    "peak_rss_mib": round(sample.peak_rss_mib, 1),
                    "peak_rss_sum_mib": round(sample.peak_rss_sum_mib, 1),
                    "processes": len(sample.members),
                }
                for name, sample in samples.items()
            }
            if self.profile_dir is not None:
                result["profile"], result["profile_run"] = self._profile(
                    url, template, processes, rate, self.profile_dir
                )
        result["loadavg_end"] = list(os.getloadavg())
        return result

    # -- set-up ---------------------------------------------------------------------------

    def _pipeline(self, sink: SmtpSink) -> Any:
        if self.s.stack == "peer":
            if self.s.mode != "pull" or self.s.batch > 1:
                raise ValueError("the peer is a pull pipeline of single-mail requests")
            return run_peer_pipeline(state_dir=self.work_dir / self.s.name, smtp_port=sink.port)
        # run_local_pipeline only reads the given server's port and leaves it alone: a stand-in
        # pointing at the sink process (never started here) keeps the SMTP CPU in that process.
        return run_local_pipeline(
            state_dir=self.work_dir / self.s.name,
            subscriber_mode=self.s.mode,
            smtp_server=LocalSmtpServer(port=sink.port),
            extra_env=self.s.env(),
            reuse_env=False,
        )

    def _extra_subscribers(
        self, pipe: LocalPipeline | PeerPipeline, stack: ExitStack
    ) -> Iterator[ServiceProcess]:
        if self.s.subscribers > 1 and (self.s.mode != "pull" or self.s.stack != "mailpipe"):
            raise ValueError("several subscriber workers are a mailpipe pull-mode scenario")
        started = []
        for number in range(2, self.s.subscribers + 1):
            service = start_service(
                f"subscriber-{number}",
                ["subscriber", "pull"],
                env=pipe.service_env,
                log_dir=pipe.state_dir / "logs",
                ready_marker=PULL_READY_MARKER,
            )
            stack.callback(service.stop)
            started.append(service)
        for service in started:
            service.wait_healthy(timeout=60)
            yield service

    # -- runs -----------------------------------------------------------------------------

    def _requests(self, mails: int) -> int:
        """Requests that carry ``mails`` (a batch scenario's last request may carry more)."""
        return max(1, math.ceil(mails / self.s.batch))

    def _drain_timeout(self, mails: int) -> float:
        return 30.0 + mails / 20  # a pipeline slower than 20 mails/s is broken, not slow

    def _measure(
        self,
        processes: _Processes,
        label: str,
        start_load: Callable[[Callable[[], None]], LoadResult],
    ) -> _Run:
        sink = processes.sink
        first = self._expected
        sent = 0

        def on_done() -> None:
            nonlocal sent
            sent += 1
            if sent % 25 == 0:
                self.update(f"{self.s.name}: {label} (sending)", first + sent, 0)

        cpu_before = _cpu(processes.samples())
        machine_before = machine_cpu()
        wall = time.monotonic()
        load = start_load(on_done)
        self._expected += load.accepted
        count = sink.wait_for(
            self._expected,
            timeout=self._drain_timeout(load.accepted),
            on_progress=lambda n: self.update(f"{self.s.name}: {label} (delivering)", n, 0),
        )
        window = time.monotonic() - wall
        machine_cores = machine_cpu().cores_since(machine_before, window)
        cpu_after = _cpu(processes.samples())
        return _Run(
            load=load,
            records=sink.take(),
            window_seconds=window,
            cpu_cores=_cores(cpu_before, cpu_after, window),
            cpu_ms_per_mail={
                **_per_mail(cpu_before, cpu_after, load.accepted),
                "client": round(load.client_cpu_seconds * 1000 / max(load.accepted, 1), 2),
            },
            drained=count >= self._expected,
            machine_cores=machine_cores,
        )

    def _closed(
        self,
        url: str,
        template: MailTemplate,
        count: int,
        processes: _Processes,
        *,
        label: str,
        max_seconds: float | None = None,
    ) -> _Run:
        return self._measure(
            processes,
            label,
            lambda on_done: closed_loop(
                url,
                template,
                count=self._requests(count),
                concurrency=self.s.concurrency,
                max_seconds=self.s.max_seconds if max_seconds is None else max_seconds,
                first_index=self._expected // self.s.batch,
                client=self.s.client,
                on_done=on_done,
            ),
        )

    def _open(self, url: str, template: MailTemplate, rate: float, processes: _Processes) -> _Run:
        return self._measure(
            processes,
            f"latency at {rate:.0f}/s",
            lambda on_done: open_loop(
                url,
                template,
                rate=rate / self.s.batch,
                seconds=self.s.latency_seconds,
                first_index=self._expected // self.s.batch,
                client=self.s.client,
                on_done=on_done,
            ),
        )

    def _profile(
        self,
        url: str,
        template: MailTemplate,
        processes: _Processes,
        rate: float,
        directory: Path,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """One more closed-loop run with py-spy on every service worker: (profile, the run).

        As many mails as the throughput run, fewer if they would take more than
        ``PROFILE_SECONDS`` at its ``rate``. py-spy's own failures come back as errors in the
        profile; so does a failure of this run (the scenario's numbers are already taken).
        """
        s = self.s
        count = min(s.mails, max(1, int(rate * PROFILE_SECONDS))) if rate > 0 else s.mails
        send_seconds = min(s.max_seconds, PROFILE_SECONDS)
        try:
            with record(
                processes.workers(),
                directory,
                prefix=f"{self.profile_prefix}{s.name}-",
                # The run's own bound; py-spy is stopped when the run ends, normally well before.
                max_seconds=send_seconds + self._drain_timeout(count) + 5,
            ) as recording:
                run = self._closed(
                    url, template, count, processes, label="profile", max_seconds=send_seconds
                )
        except Exception as exc:
            return {"error": f"the profile run failed: {type(exc).__name__}: {exc}"}, None
        return recording.to_json(), {
            "mails_accepted": run.load.accepted,
            "mails_delivered": len(run.records),
            "drained": run.drained,
            "window_seconds": round(run.window_seconds, 3),
        }

    def _stages(self, url: str, template: MailTemplate, processes: _Processes) -> dict[str, Any]:
        """Each side's own capacity: publish with the subscribers stopped, then let them drain.

        SIGSTOP/SIGCONT on the subscribers' process groups: nothing is lost (the messages wait
        on the subscription), and each side runs without the other competing for the CPU.
        """
        subscribers = [processes.pipe.subscriber, *processes.extra]
        for service in subscribers:
            service.signal(signal.SIGSTOP)
        try:
            before = _cpu(processes.samples())
            load = closed_loop(
                url,
                template,
                count=self._requests(self.s.mails),
                concurrency=self.s.concurrency,
                max_seconds=self.s.max_seconds,
                first_index=self._expected // self.s.batch,
                client=self.s.client,
            )
            published = _cpu(processes.samples())
        finally:
            for service in subscribers:
                service.signal(signal.SIGCONT)
        self._expected += load.accepted
        wall = time.monotonic()
        count = processes.sink.wait_for(
            self._expected,
            timeout=self._drain_timeout(load.accepted),
            on_progress=lambda n: self.update(f"{self.s.name}: subscriber alone", n, 0),
        )
        drain_seconds = time.monotonic() - wall
        drained = _cpu(processes.samples())
        processes.sink.take()
        delivered = load.accepted - (self._expected - count)
        return {
            "publisher_alone": {
                **load.to_json(),
                "cpu_cores": _cores(before, published, load.wall_seconds),
                "cpu_ms_per_mail": _per_mail(before, published, load.accepted),
            },
            "subscriber_alone": {
                "mails": delivered,
                "seconds": round(drain_seconds, 3),
                "rate": round(delivered / drain_seconds, 1) if drain_seconds > 0 else None,
                "cpu_cores": _cores(published, drained, drain_seconds),
                "cpu_ms_per_mail": _per_mail(published, drained, delivered),
            },
        }

    # -- results --------------------------------------------------------------------------

    @staticmethod
    def _latencies(run: _Run) -> list[float]:
        return [received - sent for received, sent, _ in run.records if sent is not None]

    def _throughput(self, run: _Run) -> dict[str, Any]:
        first_start = min(run.load.started, default=0.0)
        last_received = max((r for r, _, _ in run.records), default=0.0)
        delivered = len(run.records)
        e2e_seconds = last_received - first_start if run.records else 0.0
        return {
            "mails_accepted": run.load.accepted,
            "mails_delivered": delivered,
            "drained": run.drained,
            "e2e_seconds": round(e2e_seconds, 4),
            "e2e_rate": round(delivered / e2e_seconds, 1) if e2e_seconds > 0 else None,
            "accept_rate": run.load.to_json()["accept_rate"],
            "latency_closed_loop": latency_summary(self._latencies(run)),
            "client": run.load.to_json(),
            "cpu_cores": run.cpu_cores,
            "cpu_ms_per_mail": run.cpu_ms_per_mail,
            "machine_cores": run.machine_cores,
            "window_seconds": round(run.window_seconds, 3),
        }

    def _latency(self, run: _Run, fraction: float, rate: float) -> dict[str, Any]:
        lags = run.load.lags
        delivered = len(run.records)
        span = max(r for r, _, _ in run.records) - min(run.load.started) if run.records else 0.0
        return {
            "fraction": fraction,
            "target_rate": round(rate, 1),
            "achieved_rate": round(delivered / span, 1) if span > 0 else None,
            "mails_accepted": run.load.accepted,
            "mails_delivered": delivered,
            "drained": run.drained,
            **latency_summary(self._latencies(run)),
            "client_lag_p99_ms": round((percentile(lags, 99) or 0.0) * 1000, 2),
            "client": run.load.to_json(),
            "cpu_cores": run.cpu_cores,
            "machine_cores": run.machine_cores,
        }
