"""``python -m emulator``: check that the emulators are installed (CI runs this first).

Exit status 0 when both are present, 3 (the CLI's "missing dependency") with the fix otherwise.
"""

from __future__ import annotations

import sys

from emulator.errors import EmulatorNotInstalled
from emulator.install import check_installed


def main() -> int:
    try:
        check_installed()
    except EmulatorNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print("Pub/Sub and Firestore emulators found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
