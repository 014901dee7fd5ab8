"""Helpers for the Firestore emulator (its HTTP control endpoints)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from emulator.errors import EmulatorError


def reset_firestore(host: str, project: str, database: str = "(default)") -> None:
    """Delete every document of ``project``/``database`` in the Firestore emulator at ``host``.

    Uses the emulator-only ``DELETE /emulator/v1/projects/P/databases/D/documents`` endpoint,
    which answers 200 even when there is nothing to delete.
    """
    path = (
        f"/emulator/v1/projects/{urllib.parse.quote(project, safe='')}"
        f"/databases/{urllib.parse.quote(database, safe='()')}/documents"
    )
    request = urllib.request.Request(f"http://{host}{path}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http only
            response.read()
    except (OSError, ValueError) as exc:
        raise EmulatorError(f"cannot reset the Firestore emulator at {host}: {exc}") from exc
