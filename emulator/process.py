"""Start and stop Google's Pub/Sub and Firestore emulators as child processes.

Each emulator runs in its own process group (``start_new_session``) on a loopback port, with its
output in a log file. Readiness is a real call (``GET /`` answers ``Ok``), never a sleep. Stopping
signals the whole group, because the Firestore wrapper script does not ``exec`` Java and signalling
only the parent leaves the Java child running (see ``docs/local-vs-gcp.md``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from emulator.errors import EmulatorError, EmulatorStartError
from emulator.install import firestore_emulator_command, pubsub_emulator_command

log = logging.getLogger(__name__)

PUBSUB_HOST_VAR = "PUBSUB_EMULATOR_HOST"
FIRESTORE_HOST_VAR = "FIRESTORE_EMULATOR_HOST"

_POLL_INTERVAL = 0.05
_STOP_GRACE = 10.0
_LOG_TAIL_LINES = 30
_BIND_FAILURE_MARKERS = ("Address already in use", "BindException", "Failed to bind")

# Runs the emulator ("$@") under a small shell that leads its process group. The shell's stdin is a
# pipe held open by this Python process only; when it closes (stop(), or this process dying even
# by SIGKILL, when atexit cannot run), the watcher signals the whole group, so no Java process can
# outlive its owner. The shell exits with the emulator's status so a crash is still seen by poll().
_SUPERVISOR = """
exec 3<&0 0</dev/null
"$@" 3<&- &
emulator=$!
{ cat <&3 >/dev/null; kill -TERM 0; } &
exec 3<&-
wait "$emulator"
exit $?
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket() as sock:
        # As the emulators' servers do (Java sets it on every server socket): connections of a
        # previous server on this port left in TIME_WAIT must not make the port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def answers_ok(host: str, timeout: float = 1.0) -> bool:
    """Whether an emulator at ``host`` ("HOST:PORT") answers ``GET /`` with ``Ok``."""
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=timeout) as response:
            return bool(response.status == 200 and response.read().strip() == b"Ok")
    except (OSError, ValueError):
        return False


def read_log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether the group still exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def process_group_alive(pgid: int) -> bool:
    """Whether any live process remains in process group ``pgid``."""
    return bool(_group_members(pgid))


class RunningEmulator:
    """A started (or reused) emulator. Stop it with :meth:`stop` or use it as a context manager.

    ``pid`` is the id of the emulator's process group (its leader is a small supervising shell,
    see ``_SUPERVISOR``), or ``None`` when an already running emulator was reused (then
    :meth:`stop` leaves it alone).
    """

    def __init__(
        self,
        *,
        kind: str,
        host: str,
        env_var: str,
        log_path: Path | None = None,
        process: subprocess.Popen[bytes] | None = None,
        owned_dir: Path | None = None,
    ) -> None:
        self.kind = kind
        self.host = host
        self.env_var = env_var
        self.log_path = log_path
        self._process = process
        self._owned_dir = owned_dir
        self._stopped = process is None

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def reused(self) -> bool:
        return self._process is None

    @property
    def env(self) -> dict[str, str]:
        """The variable Google's client libraries read, e.g. ``PUBSUB_EMULATOR_HOST``."""
        return {self.env_var: self.host}

    def exit_code(self) -> int | None:
        """The emulator process's exit status if it has ended on its own, else ``None``."""
        if self._process is None or self._stopped:
            return None
        return self._process.poll()

    def running(self) -> bool:
        """Whether the emulator still answers ``GET /``."""
        return answers_ok(self.host)

    def stop(self) -> None:
        """Stop the whole process group and wait until no process of it is left. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        process = self._process
        assert process is not None
        pgid = process.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            process.wait()
        # The leader may be gone while a child (Firestore's java, under a bash wrapper) still exits.
        if not _wait_group_gone(pgid, _STOP_GRACE):
            _signal_group(pgid, signal.SIGKILL)
            if not _wait_group_gone(pgid, _STOP_GRACE):
                raise EmulatorError(
                    f"{self.kind} emulator process group {pgid} survived SIGKILL: "
                    f"{_group_members(pgid)}"
                )
        if process.stdin is not None:
            process.stdin.close()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "reused" if self.reused else f"pid={self.pid}"
        return f"<RunningEmulator {self.kind} {self.host} {state}>"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def _reuse_from_env(env_var: str, kind: str, port: int | None) -> RunningEmulator | None:
    host = os.environ.get(env_var, "").strip()
    if not host:
        return None
    if port is not None and not host.endswith(f":{port}"):
        return None
    if answers_ok(host):
        log.info("reusing the %s emulator at %s (from %s)", kind, host, env_var)
        return RunningEmulator(kind=kind, host=host, env_var=env_var)
    log.warning("%s=%s does not answer; starting a new %s emulator", env_var, host, kind)
    return None


def start_emulator(
    kind: str,
    command: Callable[[], Sequence[str]] | Sequence[str],
    *,
    env_var: str,
    port: int | None = None,
    log_dir: Path | None = None,
    timeout: float = 30.0,
    reuse_env: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> RunningEmulator:
    """Run ``command`` + ``--port=N`` as an emulator: own process group, log file, ``GET /`` ready.

    The building block of :func:`start_pubsub_emulator` and :func:`start_firestore_emulator`;
    ``command`` may be a callable so that "not installed" is raised only when a start is needed.
    """
    if reuse_env:
        reused = _reuse_from_env(env_var, kind, port)
        if reused is not None:
            return reused
    # Raises EmulatorNotInstalled before anything is created.
    command = list(command() if callable(command) else command)
    if port is not None and not port_is_free(port):
        raise EmulatorStartError(
            f"cannot start the {kind} emulator: port {port} on 127.0.0.1 is already in use "
            f"(another emulator? then set {env_var}=127.0.0.1:{port} to reuse it)"
        )
    owned_dir = None
    if log_dir is None:
        owned_dir = log_dir = Path(tempfile.mkdtemp(prefix=f"mailpipe-{kind}-emulator-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # A port picked by free_port() can be taken before Java binds it: retry once on that race.
    attempts = 2 if port is None else 1
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        log_path = log_dir / f"{kind}-emulator-{chosen}.log"
        try:
            return _launch(
                kind=kind,
                command=[*command, f"--port={chosen}"],
                env_var=env_var,
                port=chosen,
                log_path=log_path,
                timeout=timeout,
                owned_dir=owned_dir,
                extra_env=extra_env,
            )
        except EmulatorStartError as exc:
            bind_race = any(marker in exc.log_tail for marker in _BIND_FAILURE_MARKERS)
            if attempt < attempts and bind_race:
                log.warning("%s emulator lost the race for port %s; retrying", kind, chosen)
                continue
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _launch(
    *,
    kind: str,
    command: list[str],
    env_var: str,
    port: int,
    log_path: Path,
    timeout: float,
    owned_dir: Path | None,
    extra_env: Mapping[str, str] | None,
) -> RunningEmulator:
    env = dict(os.environ)
    # The emulator must not think it is itself talking to another emulator.
    env.pop(env_var, None)
    env.update(extra_env or {})
    host = f"127.0.0.1:{port}"
    try:
        log_file = log_path.open("wb")
    except OSError as exc:
        raise EmulatorStartError(f"cannot write the {kind} emulator log {log_path}: {exc}") from exc
    try:
        process = subprocess.Popen(  # noqa: S603 - fixed script; the command is passed as "$@"
            ["/bin/sh", "-c", _SUPERVISOR, f"mailpipe-{kind}-emulator", *command],
            stdin=subprocess.PIPE,  # the lifeline: closed when this process ends, however it ends
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() can kill Java with its wrapper
        )
    except OSError as exc:
        log_file.close()
        raise EmulatorStartError(f"cannot run the {kind} emulator {command[0]}: {exc}") from exc
    log_file.close()  # the child holds its own descriptor
    emulator = RunningEmulator(
        kind=kind, host=host, env_var=env_var, log_path=log_path, process=process, owned_dir=None
    )
    atexit.register(emulator.stop)  # last resort if the caller forgets (not on SIGKILL)
    try:
        _wait_ready(emulator, process, command, timeout)
    except BaseException:
        emulator.stop()  # also on Ctrl-C while waiting: never leave Java behind
        raise
    emulator._owned_dir = owned_dir
    log.info("%s emulator ready at %s (pid %s, log %s)", kind, host, process.pid, log_path)
    return emulator


def _wait_ready(
    emulator: RunningEmulator, process: subprocess.Popen[bytes], command: list[str], timeout: float
) -> None:
    """Poll ``GET /`` until it answers ``Ok``; raise with the log's tail if the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        exited = process.poll() is not None
        if not exited and answers_ok(emulator.host, timeout=1.0):
            return
        if exited or time.monotonic() > deadline:
            why = (
                f"exited with status {process.returncode}"
                if exited
                else f"did not answer on {emulator.host} within {timeout:g} s"
            )
            assert emulator.log_path is not None
            emulator.stop()
            # The log (and its directory) is kept so that the path in the message stays readable.
            raise EmulatorStartError(
                f"the {emulator.kind} emulator {why}: {' '.join(command)}",
                log_path=emulator.log_path,
                log_tail=read_log_tail(emulator.log_path),
            )
        time.sleep(_POLL_INTERVAL)


def start_pubsub_emulator(
    *,
    port: int | None = None,
    log_dir: Path | None = None,
    timeout: float = 30.0,
    reuse_env: bool = True,
) -> RunningEmulator:
    """Start Google's Pub/Sub emulator on 127.0.0.1 and return once it answers.

    ``port=None`` picks a free port. With ``reuse_env`` and ``PUBSUB_EMULATOR_HOST`` set to an
    emulator that answers (on ``port``, if one is given), that one is returned instead and
    :meth:`RunningEmulator.stop` leaves it running. ``log_dir=None`` logs to a temporary
    directory that is removed on stop.

    Raises :class:`EmulatorNotInstalled` or :class:`EmulatorStartError` (with the log's tail).
    """
    return start_emulator(
        "pubsub",
        pubsub_emulator_command,
        env_var=PUBSUB_HOST_VAR,
        port=port,
        log_dir=log_dir,
        timeout=timeout,
        reuse_env=reuse_env,
    )


def start_firestore_emulator(
    *,
    port: int | None = None,
    log_dir: Path | None = None,
    timeout: float = 30.0,
    reuse_env: bool = True,
) -> RunningEmulator:
    """Start Google's Firestore emulator on 127.0.0.1; see :func:`start_pubsub_emulator`."""
    return start_emulator(
        "firestore",
        firestore_emulator_command,
        env_var=FIRESTORE_HOST_VAR,
        port=port,
        log_dir=log_dir,
        timeout=timeout,
        reuse_env=reuse_env,
    )


__all__ = [
    "FIRESTORE_HOST_VAR",
    "PUBSUB_HOST_VAR",
    "RunningEmulator",
    "answers_ok",
    "free_port",
    "process_group_alive",
    "start_emulator",
    "start_firestore_emulator",
    "start_pubsub_emulator",
]
