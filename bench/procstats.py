"""What a process (group) costs: peak RSS and CPU seconds, read from ``/proc`` (Linux only).

Peak RSS is the kernel's high-water mark ``VmHWM`` of each live process; CPU is
``utime + stime + cutime + cstime`` (clock ticks) from ``/proc/PID/stat``: every thread of the
process, live or ended, and every child it has reaped — so a child that ends between two samples
still counts (its parent's ``cutime`` takes over what the child's own line showed). A service
started by :func:`emulator.pipeline.start_service` leads its own process group (gunicorn's master
and its worker, the emulator's supervising shell and java), so groups are measured as a whole.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    name: str
    peak_rss_kib: int
    rss_kib: int
    cpu_seconds: float


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def proc_info(pid: int) -> ProcInfo | None:
    """One process's peak RSS, current RSS and CPU seconds; None once it is gone."""
    stat = _read(PROC / str(pid) / "stat")
    status = _read(PROC / str(pid) / "status")
    if stat is None or status is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    cpu = sum(int(value) for value in fields[11:15]) / _TICKS  # utime, stime, cutime, cstime
    values: dict[str, int] = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    cmdline = (_read(PROC / str(pid) / "cmdline") or "").replace("\0", " ").strip()
    name = cmdline.split(" ")[0].rsplit("/", 1)[-1] if cmdline else str(pid)
    return ProcInfo(pid, name, values.get("VmHWM", 0), values.get("VmRSS", 0), cpu)


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        if stat is None:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return sorted(pids)


@dataclass(frozen=True)
class GroupSample:
    """A process group at one moment: its members and their sum/max."""

    members: tuple[ProcInfo, ...]

    @property
    def cpu_seconds(self) -> float:
        return sum(m.cpu_seconds for m in self.members)

    @property
    def peak_rss_mib(self) -> float:
        """The largest member's peak RSS (the worker; a gunicorn master is small)."""
        return max((m.peak_rss_kib for m in self.members), default=0) / 1024

    @property
    def peak_rss_sum_mib(self) -> float:
        """Sum of the members' peaks: an upper bound of the group's peak."""
        return sum(m.peak_rss_kib for m in self.members) / 1024


def sample_group(pgid: int, *, only: str | None = None) -> GroupSample:
    """Measure group ``pgid``; ``only`` keeps members whose program name contains it (java)."""
    infos = [info for pid in group_pids(pgid) if (info := proc_info(pid)) is not None]
    if only is not None:
        infos = [info for info in infos if only in info.name]
    return GroupSample(tuple(infos))


def sample_pid(pid: int) -> GroupSample:
    info = proc_info(pid)
    return GroupSample((info,) if info else ())


@dataclass(frozen=True)
class MachineCpu:
    """The whole machine's CPU time so far, all cores, in seconds (``/proc/stat``'s cpu line)."""

    busy: float
    idle: float  # idle and waiting for I/O
    steal: float  # taken by the hypervisor for other guests: this machine was slower meanwhile

    def cores_since(self, earlier: MachineCpu, seconds: float) -> dict[str, float]:
        """Average cores busy, idle and stolen between ``earlier`` and this sample."""
        if seconds <= 0:
            return {"busy": 0.0, "idle": 0.0, "steal": 0.0}
        return {
            "busy": round((self.busy - earlier.busy) / seconds, 3),
            "idle": round((self.idle - earlier.idle) / seconds, 3),
            "steal": round((self.steal - earlier.steal) / seconds, 3),
        }


def machine_cpu() -> MachineCpu:
    """The machine's CPU time now (all zero where ``/proc/stat`` cannot be read)."""
    line = (_read(PROC / "stat") or "cpu").splitlines()[0].split()
    # cpu user nice system idle iowait irq softirq steal ... (guest time is inside user)
    ticks = [int(value) for value in line[1:9]] + [0] * (8 - len(line[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return MachineCpu(
        busy=(user + nice + system + irq + softirq) / _TICKS,
        idle=(idle + iowait) / _TICKS,
        steal=steal / _TICKS,
    )


def machine() -> dict[str, object]:
    """This machine as the results table describes it."""
    cpu_model = "unknown"
    for line in (_read(PROC / "cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in (_read(PROC / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
    }
