"""Where the services' CPU goes: py-spy attached to the running processes, and its stacks summed.

``python -m bench --profile`` adds, per scenario and after every measured run, one more closed-loop
run with py-spy sampling each process that does the work (the publisher's gunicorn worker, each
subscriber process). The raw collapsed stacks go next to the JSON result as
``bench/results/<stamp>-<scenario>-<service>.folded``; the JSON and the tables get a summary.

Reading the summary. py-spy samples with ``--gil``: only the thread holding the GIL at the
moment of a sample is recorded, and a moment when no thread holds it is no sample at all. So the
profile is the process's *Python CPU time* (all threads together), not its wall time: waiting on
a socket, a lock or the GIL itself does not show, while C code that runs without releasing the
GIL (e.g. the json encoder's C speedups, regex matching) counts for the Python function that
called it.

- ``samples``: how many samples had a thread holding the GIL (at 100 Hz: ~100 per busy second).
- inclusive share: in how many of those samples the function was on the stack, itself or
  anything it called (counted once per sample, even when it recurses). ``send_message`` at 40 %
  means 40 % of the process's Python CPU time went into it and its callees.
- self share: in how many samples the function was the innermost frame: the code that burns
  the CPU itself. Self shares add up to 100 %; inclusive shares do not.
- The inclusive top list leaves out pass-through functions, those that hand ≥ 95 % of their
  samples to one callee (``Thread.run`` → ``_worker`` → ... → ``Flask.wsgi_app``): the callee's
  row says the same, and they would fill the list. The .folded file keeps every frame.
- A function is ``name (file)``: line numbers are dropped so one function is one row.
  ``<no Python frame>``: the GIL was held by code with no Python frame on its thread (e.g.
  grpc's Cython callbacks from its C threads).

Profiling by hand, without the benchmark: ``python -m bench.profile --pid PID --seconds 10``
records one process and prints the summary (``-o FILE`` keeps the stacks);
``python -m bench.profile FILE.folded`` summarises an existing file.

A flame graph from a ``.folded`` file, offline: speedscope (https://www.speedscope.app, or the
``speedscope`` npm package, ``speedscope FILE.folded``) opens the collapsed-stack format as it
is, and the web app reads the file in the browser without uploading it; Brendan Gregg's
``flamegraph.pl FILE.folded > flame.svg`` (or inferno's ``inferno-flamegraph``) draws an SVG.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.procstats import PROC, group_pids

RATE = 100  # samples per second (py-spy's default)
TOP_INCLUSIVE = 12
NO_PYTHON_FRAME = "<no Python frame>"
PASSTHROUGH = 0.95  # a function handing this much of its time to one callee is a mere wrapper
TOP_SELF = 8
ATTACH_TIMEOUT = 5.0
STOP_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1
# py-spy's frame: "function (file:line)"; the greedy name leaves the file after the last " (".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):\d+\)$")
_PTRACE_HINT = (
    " (py-spy reads the process's memory: it needs ptrace rights, i.e. root, CAP_SYS_PTRACE or "
    "kernel.yama.ptrace_scope=0)"
)

# -- collapsed stacks ---------------------------------------------------------------------------


def function_of(frame: str) -> str:
    """``send_message (publisher/app.py:168)`` → ``send_message (publisher/app.py)``."""
    match = _FRAME.match(frame)
    return f"{match['function']} ({match['file']})" if match else frame


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """The stacks (outermost frame first) of collapsed-stack text and their sample counts.

    Each non-blank line is ``frame;frame;...;frame COUNT``; equal stacks add up. An empty
    stack (`` COUNT``: py-spy's samples of a thread holding the GIL without a Python frame, e.g.
    in Cython code called from C, as grpc's threads are) counts as :data:`NO_PYTHON_FRAME`. A
    line of another shape raises ValueError (the file is not what it claims to be).
    """
    stacks: Counter[tuple[str, ...]] = Counter()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line:
            continue
        stack, space, count = line.rpartition(" ")
        if not space or not count.isdigit():
            raise ValueError(f"line {number} is not 'frame;...;frame COUNT': {line[:80]!r}")
        stacks[tuple(stack.split(";")) if stack else (NO_PYTHON_FRAME,)] += int(count)
    return stacks


@dataclass(frozen=True)
class ProfileSummary:
    """Per function its share of the samples, largest first (ties by name)."""

    samples: int
    inclusive: tuple[tuple[float, str], ...]  # on the stack (once per sample)
    exclusive: tuple[tuple[float, str], ...]  # innermost frame ("self")
    passthrough: frozenset[str] = frozenset()  # see summarize_collapsed

    def top_inclusive(self, count: int = TOP_INCLUSIVE) -> tuple[tuple[float, str], ...]:
        """The ``count`` largest inclusive shares, pass-through functions left out."""
        return tuple(pair for pair in self.inclusive if pair[1] not in self.passthrough)[:count]

    def to_json(
        self, top_inclusive: int = TOP_INCLUSIVE, top_self: int = TOP_SELF
    ) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "top_inclusive": [[round(s, 4), f] for s, f in self.top_inclusive(top_inclusive)],
            "top_self": [[round(s, 4), f] for s, f in self.exclusive[:top_self]],
        }


def summarize_collapsed(text: str, passthrough: float = PASSTHROUGH) -> ProfileSummary:
    """Inclusive and self share of each function (line numbers dropped) in collapsed stacks.

    A function that hands at least ``passthrough`` of its samples to one and the same callee
    (its next frame that is not itself) is a *pass-through*: ``Thread.run`` → ``_worker`` →
    ``_WorkItem.run`` → ... In a threaded server these wrappers top every inclusive ranking
    while their callee's row says the same, so :meth:`ProfileSummary.top_inclusive` leaves
    them out; ``inclusive`` keeps every function.
    """
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    calls: Counter[tuple[str, str]] = Counter()  # (function, callee): samples
    total = 0
    for stack, count in parse_collapsed(text).items():
        functions = [function_of(frame) for frame in stack]
        total += count
        seen = set()
        for index, function in enumerate(functions):
            if function in seen:  # a recursive function is still one sample
                continue
            seen.add(function)
            inclusive[function] += count
            callee = next((f for f in functions[index + 1 :] if f != function), None)
            if callee is not None:
                calls[function, callee] += count
        exclusive[functions[-1]] += count

    def shares(counts: Counter[str]) -> tuple[tuple[float, str], ...]:
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return tuple((count / total, function) for function, count in ranked)

    wrappers = frozenset(f for (f, _), n in calls.items() if n >= passthrough * inclusive[f])
    return ProfileSummary(total, shares(inclusive), shares(exclusive), wrappers)


# -- recording with py-spy ----------------------------------------------------------------------


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (a venv not on PATH), else on PATH; None if absent."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "exe")
    except OSError:
        return None


def worker_pids(leader: int) -> list[int]:
    """The processes of ``leader``'s group that do the work.

    A leader with forked children is a supervisor (gunicorn's master only forks and watches
    its worker): those children are profiled. A leader without any works itself (pull mode).
    A child running another program is no fork of the leader's and does not count.
    """
    exe = _exe(leader)
    children = [
        pid for pid in group_pids(leader) if _ppid(pid) == leader and exe and _exe(pid) == exe
    ]
    return children or [leader]


def _interrupt_with_parent() -> None:
    """In py-spy's process, before exec: SIGINT (flush and exit) when our process dies.

    py-spy runs in its own session, out of reach of a Ctrl-C meant for us (we stop it in
    order); this covers us being killed outright.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


@dataclass
class _Spy:
    """One ``py-spy record`` attached to one process."""

    service: str
    pid: int
    file: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    error: str | None = None

    def start(self, executable: str, *, rate: int, duration: int) -> None:
        self.file.unlink(missing_ok=True)  # a file from an earlier run must not pass for ours
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - py-spy writes it until close()
        command = [
            executable,
            "record",
            "--gil",
            "--nonblocking",  # never pauses the service: it keeps its speed while sampled
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--duration",  # a bound if we could not stop it; it is stopped by SIGINT before
            str(duration),
            "--pid",
            str(self.pid),
            "-o",
            str(self.file),
        ]
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RUST_BACKTRACE": "0"},  # its error, not a Rust backtrace
                start_new_session=True,
                preexec_fn=_interrupt_with_parent,  # noqa: PLW1509 - prctl only, then exec
            )
        except OSError as exc:
            self.error = f"py-spy could not start: {exc}"

    def output(self) -> str:
        """What py-spy printed so far (read without moving the file offset it writes at)."""
        if self.log is None:
            return ""
        return os.pread(self.log.fileno(), 1 << 16, 0).decode(errors="replace")

    def message(self) -> str:
        """py-spy's own words, on one line, without the progress chatter."""
        lines = []
        for raw in self.output().splitlines():
            if raw.startswith("Stack backtrace"):
                break
            line = raw.removeprefix("py-spy> ").strip()
            if line and not line.startswith(("Sampling process", "Press Control-C")):
                lines.append(line)
        text = " ".join(lines)[:400] or "no output"
        if "permission denied" in text.lower() or "operation not permitted" in text.lower():
            text += _PTRACE_HINT
        return text

    def attached(self) -> bool | None:
        """True once sampling, False if py-spy already gave up, None while it is starting."""
        if self.process is None:
            return False
        if "Sampling process" in self.output():
            return True
        return False if self.process.poll() is not None else None

    def interrupt(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)  # py-spy writes its file, then exits

    def wait(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic); kill py-spy if it is still running then."""
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.error = self.error or "py-spy did not stop after SIGINT: killed, no profile"

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def result(self, top_inclusive: int, top_self: int) -> dict[str, Any]:
        """The summary of the recorded stacks, or ``{"error": why there are none}``."""
        if self.error is not None:
            return {"error": self.error}
        code = self.process.returncode if self.process is not None else None
        if not self.file.is_file():
            return {
                "error": f"py-spy on pid {self.pid} exited with {code} and wrote no profile: "
                f"{self.message()}"
            }
        try:
            summary = summarize_collapsed(self.file.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError) as exc:
            return {"error": f"unreadable profile {self.file}: {exc}"}
        return {"file": self.file.name, **summary.to_json(top_inclusive, top_self)}


@dataclass
class Recording:
    """What :func:`record` found: per service a summary or an error, or one error for all."""

    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``{service: {"samples", "file", "top_inclusive", "top_self"} | {"error"}}``, or
        ``{"error": ...}`` when nothing could be recorded at all."""
        return {"error": self.error} if self.error is not None else dict(self.services)


@contextlib.contextmanager
def record(
    targets: Mapping[str, int],
    directory: Path,
    *,
    prefix: str = "",
    max_seconds: float = 60.0,
    rate: int = RATE,
    top_inclusive: int = TOP_INCLUSIVE,
    top_self: int = TOP_SELF,
    attach_timeout: float = ATTACH_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[Recording]:
    """Sample each ``targets`` process (service name → pid) with py-spy while the block runs.

    The stacks go to ``directory/<prefix><service>.folded``. On entry every py-spy is attached
    (or has failed) before the block starts; on exit, error or not, each gets SIGINT (it
    flushes its file and exits) and is killed if it has not stopped within ``stop_timeout``:
    no py-spy outlives the block. ``max_seconds`` bounds the recording should the block last
    longer. py-spy's failures (missing, no ptrace rights, a pid that is gone) are recorded in
    the yielded :class:`Recording` (filled on exit), never raised: a run without a profile
    keeps its numbers.
    """
    recording = Recording()
    executable = find_py_spy()
    if executable is None:
        recording.error = (
            "py-spy not found (next to the interpreter nor on PATH): pip install py-spy"
        )
        yield recording
        return
    directory.mkdir(parents=True, exist_ok=True)
    spies = [
        _Spy(service, pid, directory / f"{prefix}{service}.folded")
        for service, pid in targets.items()
    ]
    try:
        for spy in spies:
            spy.start(executable, rate=rate, duration=max(1, math.ceil(max_seconds)))
        deadline = time.monotonic() + attach_timeout
        while any(spy.attached() is None for spy in spies) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield recording
    finally:
        for spy in spies:  # all at once: each flushes its file in parallel
            spy.interrupt()
        deadline = time.monotonic() + stop_timeout
        for spy in spies:
            spy.wait(deadline)
        for spy in spies:
            recording.services[spy.service] = spy.result(top_inclusive, top_self)
            spy.close()


# -- by hand --------------------------------------------------------------------------------------


def format_summary(service: str, profile: Mapping[str, Any]) -> str:
    """A profile's JSON as plain text: samples, then top inclusive and top self shares."""
    if "error" in profile:
        return f"{service}: no profile: {profile['error']}"
    lines = [f"{service}: {profile['samples']} samples holding the GIL"]
    for title, key in (("inclusive", "top_inclusive"), ("self", "top_self")):
        lines.append(f"  top by {title} share:")
        lines += [f"  {share:7.1%}  {function}" for share, function in profile[key]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.profile FILE.folded ...`` or ``--pid PID [--seconds S] [-o FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="collapsed-stack files to summarise")
    parser.add_argument("--pid", type=int, help="record this running Python process instead")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to record")
    parser.add_argument("-o", "--output", type=Path, help="keep the stacks in this .folded file")
    parser.add_argument("--top", type=int, default=TOP_INCLUSIVE, help="rows per list")
    parser.add_argument("--rate", type=int, default=RATE, help="samples per second")
    args = parser.parse_args(argv)
    if args.pid is None and not args.files:
        parser.error("give .folded files or --pid")
    failed = False
    for path in args.files:
        summary = summarize_collapsed(path.read_text(encoding="utf-8", errors="replace"))
        print(format_summary(str(path), summary.to_json(args.top, args.top)))
    if args.pid is not None:
        with tempfile.TemporaryDirectory() as tmp:  # unused when -o says where the stacks go
            directory, name = (
                (Path(tmp), f"pid-{args.pid}")
                if args.output is None
                else (args.output.resolve().parent, args.output.stem)
            )
            with (
                record(
                    {name: args.pid},
                    directory,
                    max_seconds=args.seconds,
                    rate=args.rate,
                    top_inclusive=args.top,
                    top_self=args.top,
                ) as recording,
                contextlib.suppress(KeyboardInterrupt),
            ):  # Ctrl-C: stop, still print
                time.sleep(args.seconds)
            if recording.error is not None:  # the recording is complete once the block is left
                print(f"no profile: {recording.error}")
                failed = True
            for service, profile in recording.services.items():
                failed = failed or "error" in profile
                print(format_summary(service, profile))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
