"""Run mailpipe locally on Google's own Pub/Sub and Firestore emulators, shaped like production.

- :mod:`emulator.install` finds the emulators shipped with the Google Cloud CLI.
- :mod:`emulator.process` starts them on loopback in their own process group and stops them
  without leaving Java behind.
- :mod:`emulator.pubsub_topology` applies the one topology declaration (``mailpipe/topology.json``)
  idempotently and reads it back.
- :mod:`emulator.clients` builds google-cloud-pubsub clients for an explicit emulator host.
- :mod:`emulator.firestore` resets the Firestore emulator between tests.
- :mod:`emulator.stack` puts these together for ``mailpipe emulator up`` and ``mailpipe up``.

Errors (``emulator.errors``)::

    EmulatorError                 base: anything about the local emulators went wrong
    ├── EmulatorNotInstalled      the emulator (or Java) is missing; says how to install it
    ├── EmulatorStartError        the emulator did not become ready; carries the tail of its log
    └── TopologyApplyError        the topology could not be applied to / read from the emulator

This package is for local runs and tests only: the services (``publisher/``, ``subscriber/``)
never import it.
"""

from __future__ import annotations

from emulator.clients import publisher_client, subscriber_client
from emulator.errors import (
    EmulatorError,
    EmulatorNotInstalled,
    EmulatorStartError,
    TopologyApplyError,
)
from emulator.firestore import reset_firestore
from emulator.install import check_installed
from emulator.process import (
    FIRESTORE_HOST_VAR,
    PUBSUB_HOST_VAR,
    RunningEmulator,
    start_firestore_emulator,
    start_pubsub_emulator,
)
from emulator.pubsub_topology import (
    TopologyChange,
    apply_topology,
    delete_topology,
    read_topology,
    sync_topology,
)
from emulator.stack import DEFAULT_LOCAL_PROJECT, EmulatorStack, run_emulators

__all__ = [
    "DEFAULT_LOCAL_PROJECT",
    "FIRESTORE_HOST_VAR",
    "PUBSUB_HOST_VAR",
    "EmulatorError",
    "EmulatorNotInstalled",
    "EmulatorStack",
    "EmulatorStartError",
    "RunningEmulator",
    "TopologyApplyError",
    "TopologyChange",
    "apply_topology",
    "check_installed",
    "delete_topology",
    "publisher_client",
    "read_topology",
    "reset_firestore",
    "run_emulators",
    "start_firestore_emulator",
    "start_pubsub_emulator",
    "subscriber_client",
    "sync_topology",
]
