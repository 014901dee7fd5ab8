"""The benchmark's profiler against real processes: py-spy attached, stopped, and never left behind.

Real parts: a Python process burning CPU in a function with a name found nowhere else, and the
py-spy installed with the ``bench`` extra. py-spy needs ptrace rights (root in CI): without
them these tests fail, saying so, rather than skip.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.profile import find_py_spy, record
from tests.fixtures.processes import command_line, read_processes

SPINNER = textwrap.dedent(
    """
    def spin_for_the_profiler():
        total = 0
        while True:
            for number in range(10_000):
                total += number

    print("spinning", flush=True)
    spin_for_the_profiler()
    """
)


def py_spies_on(pid: int) -> list[str]:
    """Command lines of the py-spy processes still running against ``pid``."""
    return [
        b" ".join(argv).decode()
        for argv in read_processes(command_line).values()
        if argv and argv[0].endswith(b"py-spy") and str(pid).encode() in argv
    ]


@pytest.fixture
def spinner(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    script = tmp_path / "spinner.py"
    script.write_text(SPINNER)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"spinning\n"  # the interpreter is up: attachable
        yield process
    finally:
        process.kill()
        process.wait()


def test_py_spy_is_installed() -> None:
    assert find_py_spy(), "py-spy is missing: pip install -e '.[bench]'"


def test_a_recording_names_the_function_that_burns_the_cpu(
    spinner: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    with record({"spinner": spinner.pid}, tmp_path, prefix="run-", max_seconds=30) as recording:
        assert py_spies_on(spinner.pid), "py-spy is not running during the block"
        time.sleep(2.0)

    profile = recording.to_json()["spinner"]
    assert "error" not in profile, (
        f"py-spy could not record a process we started: {profile['error']} "
        "(it needs ptrace rights: root or CAP_SYS_PTRACE)"
    )
    assert profile["file"] == "run-spinner.folded"
    assert (tmp_path / "run-spinner.folded").read_text().strip()
    assert profile["samples"] >= 50  # ~200 at 100 Hz over 2 s, with room for a loaded machine
    inclusive = {function: share for share, function in profile["top_inclusive"]}
    assert inclusive.get("spin_for_the_profiler (spinner.py)", 0) >= 0.9, inclusive
    share, function = profile["top_self"][0]
    assert function == "spin_for_the_profiler (spinner.py)"
    assert share >= 0.9
    assert py_spies_on(spinner.pid) == []


def test_a_process_that_is_gone_is_a_recorded_error_not_an_exception(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    with record({"gone": gone.pid}, tmp_path, max_seconds=30) as recording:
        pass

    profile = recording.to_json()["gone"]
    assert set(profile) == {"error"}
    assert f"pid {gone.pid}" in profile["error"]
    assert "Check that the process is running" in profile["error"]  # py-spy's own words
    assert not (tmp_path / "gone.folded").exists()
    assert py_spies_on(gone.pid) == []


def test_an_error_in_the_block_still_stops_py_spy(
    spinner: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="the run failed"):  # noqa: SIM117 - the point
        with record({"spinner": spinner.pid}, tmp_path, max_seconds=30):
            assert py_spies_on(spinner.pid)
            raise RuntimeError("the run failed")

    assert py_spies_on(spinner.pid) == []
    assert (tmp_path / "spinner.folded").exists()  # stopped by SIGINT: it flushed its stacks
