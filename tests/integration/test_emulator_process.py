"""Starting and stopping Google's emulators: ready by a real call, and no Java process left behind.

These tests start their own emulators (not the session's) because they are about the processes.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator import (
    EmulatorNotInstalled,
    EmulatorStartError,
    check_installed,
    read_topology,
    start_firestore_emulator,
    start_pubsub_emulator,
)
from emulator.process import answers_ok, free_port, process_group_alive, start_emulator
from mailpipe.topology import load_topology
from tests.fixtures.processes import command_line, read_processes

DEADLINE = 60.0


def java_processes(port: int) -> list[int]:
    """Live Java processes whose command line has ``--port=PORT`` (how the emulators are run)."""

    def argv_and_state(entry: Path) -> tuple[list[bytes], str]:
        return command_line(entry), (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]

    return [
        pid
        for pid, (argv, state) in read_processes(argv_and_state).items()
        if state != "Z" and b"java" in argv[0] and f"--port={port}".encode() in argv
    ]


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return result


@pytest.fixture
def no_emulator_env(monkeypatch) -> None:
    """Make sure nothing is reused: these tests are about starting emulators."""
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)


@pytest.mark.parametrize("start", [start_pubsub_emulator, start_firestore_emulator])
def test_stop_leaves_no_java_process(start, tmp_path, no_emulator_env):
    # Firestore's launcher is a bash script that does not exec Java: only killing the whole
    # process group stops it.
    with start(log_dir=tmp_path) as running:
        assert running.running()
        assert java_processes(running.port), "the emulator's Java process should be visible"
        assert running.log_path is not None and running.log_path.is_file()
        pgid = running.pid
    assert pgid is not None
    assert not process_group_alive(pgid)
    assert java_processes(running.port) == []
    assert not answers_ok(running.host)
    running.stop()  # idempotent


def test_emulator_dies_with_its_owner_even_on_sigkill(no_emulator_env):
    # SIGKILL skips every finaliser and atexit hook; the lifeline pipe still stops the emulator.
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, emulator\n"
            "e = emulator.start_pubsub_emulator(reuse_env=False)\n"
            "print(e.pid, e.port, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([owner.stdout], [], [], DEADLINE)
        assert ready, "the owner did not start the emulator"
        pgid, port = map(int, owner.stdout.readline().split())
        assert java_processes(port)
    finally:
        owner.kill()
        owner.wait()
    wait_for(lambda: not process_group_alive(pgid), "the orphaned emulator to stop")
    assert java_processes(port) == []


def test_running_emulator_named_by_the_environment_is_reused(pubsub_emulator, monkeypatch):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    reused = start_pubsub_emulator()
    assert (reused.host, reused.pid, reused.reused) == (pubsub_emulator.host, None, True)
    reused.stop()
    assert pubsub_emulator.running(), "stopping a reused emulator must leave it running"


def test_stale_environment_starts_a_new_emulator(monkeypatch, tmp_path):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    with start_pubsub_emulator(log_dir=tmp_path) as running:
        assert running.pid is not None
        assert running.running()


def test_taken_port_is_reported_before_starting(pubsub_emulator, no_emulator_env):
    with pytest.raises(EmulatorStartError, match=f"port {pubsub_emulator.port} .* in use"):
        start_pubsub_emulator(port=pubsub_emulator.port)


def test_start_failure_shows_the_log_tail(tmp_path):
    # A stand-in that fails like a misconfigured emulator: the real one cannot be made to fail
    # on demand. What is under test is the process handling around it.
    failing = [sys.executable, "-c", "print('SEVERE: bad flag --frobnicate'); raise SystemExit(2)"]
    with pytest.raises(EmulatorStartError) as info:
        start_emulator("fake", failing, env_var="FAKE_EMULATOR_HOST", log_dir=tmp_path)
    message = str(info.value)
    assert "exited with status 2" in message
    assert "SEVERE: bad flag --frobnicate" in message
    assert str(tmp_path) in message


def test_start_timeout_stops_what_was_started(tmp_path, no_emulator_env):
    with pytest.raises(EmulatorStartError, match="did not answer") as info:
        start_pubsub_emulator(log_dir=tmp_path, timeout=0.01)
    log_path = info.value.log_path
    assert log_path is not None
    port = int(log_path.stem.rsplit("-", 1)[1])
    wait_for(lambda: not java_processes(port), "the half-started emulator to be gone", 15)


def test_missing_emulators_say_how_to_install(tmp_path):
    with pytest.raises(EmulatorNotInstalled) as info:
        check_installed(roots=[tmp_path])
    message = str(info.value)
    assert "gcloud components install pubsub-emulator beta" in message
    assert "google-cloud-cli-pubsub-emulator" in message
    assert "gcloud components install cloud-firestore-emulator" in message
    assert "google-cloud-cli-firestore-emulator" in message


def test_installed_emulators_pass_the_ci_check():
    result = subprocess.run(
        [sys.executable, "-m", "emulator"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# The CLI: `mailpipe emulator up`


@pytest.fixture
def cli_up(tmp_path) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    process = subprocess.Popen(
        [sys.executable, "-m", "ops", "emulator", "up", "--firestore"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # as from a fresh shell anywhere, not the repository
        start_new_session=True,  # so the test can clean up even if the CLI misbehaves
    )
    yield process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def read_exports(process: subprocess.Popen[str]) -> dict[str, str]:
    """The ``export NAME=value`` lines the CLI prints, read until GOOGLE_CLOUD_PROJECT's."""
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    )
    reader.start()
    exports: dict[str, str] = {}
    deadline = time.monotonic() + DEADLINE
    while "GOOGLE_CLOUD_PROJECT" not in exports:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no export lines from the CLI within {DEADLINE:g} s")
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value
    return exports


def test_cli_prints_env_lines_applies_topology_and_cleans_up_on_ctrl_c(cli_up):
    exports = read_exports(cli_up)
    pubsub, store = exports["PUBSUB_EMULATOR_HOST"], exports["FIRESTORE_EMULATOR_HOST"]
    assert exports["GOOGLE_CLOUD_PROJECT"] == "mailpipe-local"
    assert answers_ok(pubsub)
    assert answers_ok(store)
    declared = load_topology()
    live = read_topology(declared, project="mailpipe-local", emulator_host=pubsub)
    assert live.topics == declared.topics
    assert live.dead_letter_subscription == declared.dead_letter_subscription
    ports = [int(host.rsplit(":", 1)[1]) for host in (pubsub, store)]
    assert all(java_processes(port) for port in ports)

    cli_up.send_signal(signal.SIGINT)  # Ctrl-C
    assert cli_up.wait(timeout=DEADLINE) == 0
    assert [java_processes(port) for port in ports] == [[], []]
    assert "emulators stopped" in cli_up.stderr.read()
