"""The local emulator stack: Pub/Sub (and optionally Firestore) with the topology applied.

Shared by ``mailpipe emulator up`` and ``mailpipe up`` so both start, apply and stop the same way.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from emulator.process import RunningEmulator, start_firestore_emulator, start_pubsub_emulator
from emulator.pubsub_topology import TopologyChange, sync_topology
from mailpipe.config import DEFAULT_PROJECT as DEFAULT_LOCAL_PROJECT
from mailpipe.topology import Topology, load_topology


@dataclass
class EmulatorStack:
    """Running emulators plus the project and topology applied to them."""

    project: str
    topology: Topology
    pubsub: RunningEmulator
    firestore: RunningEmulator | None = None
    changes: list[TopologyChange] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Variables that point Google's client libraries and mailpipe at this stack."""
        env = dict(self.pubsub.env)
        if self.firestore is not None:
            env.update(self.firestore.env)
        env["GOOGLE_CLOUD_PROJECT"] = self.project
        return env

    def export_lines(self) -> list[str]:
        """``export NAME=value`` lines to paste into a shell."""
        return [f"export {name}={shlex.quote(value)}" for name, value in self.env.items()]

    def emulators(self) -> list[RunningEmulator]:
        return [e for e in (self.pubsub, self.firestore) if e is not None]


@contextmanager
def run_emulators(
    *,
    project: str = DEFAULT_LOCAL_PROJECT,
    port: int | None = None,
    firestore: bool = False,
    firestore_port: int | None = None,
    topology: Topology | None = None,
    push_endpoints: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    reuse_env: bool = True,
    timeout: float = 30.0,
) -> Iterator[EmulatorStack]:
    """Start the emulators, apply the topology, yield the stack, and stop what was started.

    Everything started is stopped on the way out, also on errors and Ctrl-C.
    """
    topology = topology or load_topology()
    with ExitStack() as stack:
        pubsub = stack.enter_context(
            start_pubsub_emulator(port=port, log_dir=log_dir, timeout=timeout, reuse_env=reuse_env)
        )
        store = None
        if firestore:
            store = stack.enter_context(
                start_firestore_emulator(
                    port=firestore_port, log_dir=log_dir, timeout=timeout, reuse_env=reuse_env
                )
            )
        # Runs first on the way out (LIFO): both JVMs get SIGTERM at once and are awaited together,
        # so a loaded machine waits for the slower one, not their sum (each stop() is idempotent).
        stack.callback(_stop_together, [e for e in (pubsub, store) if e is not None])
        changes = sync_topology(
            topology, project=project, push_endpoints=push_endpoints, emulator_host=pubsub.host
        )
        yield EmulatorStack(
            project=project, topology=topology, pubsub=pubsub, firestore=store, changes=changes
        )


def _stop_together(emulators: list[RunningEmulator]) -> None:
    """Stop every emulator at once; re-raise the first failure after all have been waited for."""
    with ThreadPoolExecutor(max_workers=max(len(emulators), 1)) as pool:
        futures = [pool.submit(emulator.stop) for emulator in emulators]
    for future in futures:
        future.result()
