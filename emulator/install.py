"""Find Google's emulators on this machine (they ship with the Google Cloud CLI).

Nothing here starts a process; :mod:`emulator.process` runs the commands found here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from emulator.errors import EmulatorNotInstalled

PUBSUB_INSTALL_HINT = (
    "install it with `gcloud components install pubsub-emulator beta`, or on Debian/Ubuntu "
    "`sudo apt-get install google-cloud-cli-pubsub-emulator` (already there in Cloud Shell)"
)
FIRESTORE_INSTALL_HINT = (
    "install it with `gcloud components install cloud-firestore-emulator`, or on Debian/Ubuntu "
    "`sudo apt-get install google-cloud-cli-firestore-emulator` (already there in Cloud Shell)"
)
JAVA_INSTALL_HINT = (
    "the emulators need a Java 11+ runtime on PATH (or JAVA_HOME): install one, for example "
    "`sudo apt-get install openjdk-17-jre-headless`"
)

# Relative to the Google Cloud CLI's root directory.
_PUBSUB_SCRIPT = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
_FIRESTORE_SCRIPT = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")

# Where the Google Cloud CLI lives when `gcloud` is not on PATH: the apt/yum packages, Cloud Shell,
# the interactive installer's default, and the snap.
_KNOWN_SDK_ROOTS = (
    Path("/usr/lib/google-cloud-sdk"),
    Path("/usr/share/google-cloud-sdk"),
    Path("/google/google-cloud-sdk"),
    Path("~/google-cloud-sdk").expanduser(),
    Path("/opt/google-cloud-sdk"),
    Path("/snap/google-cloud-cli/current"),
)


def sdk_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Candidate Google Cloud CLI root directories, most specific first."""
    env = os.environ if environ is None else environ
    roots: list[Path] = []
    if env.get("CLOUDSDK_ROOT_DIR"):
        roots.append(Path(env["CLOUDSDK_ROOT_DIR"]))
    gcloud = shutil.which("gcloud", path=env.get("PATH"))
    if gcloud:
        # <root>/bin/gcloud, usually reached through a symlink such as /usr/bin/gcloud.
        roots.append(Path(os.path.realpath(gcloud)).parent.parent)
    roots.extend(_KNOWN_SDK_ROOTS)
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def _find_script(relative: Path, what: str, hint: str, roots: Sequence[Path] | None) -> Path:
    candidates = sdk_roots() if roots is None else list(roots)
    for root in candidates:
        candidate = root / relative
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(str(root) for root in candidates)
    raise EmulatorNotInstalled(f"the {what} is not installed (looked under {searched}): {hint}")


def _check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return
    if shutil.which("java") is None:
        raise EmulatorNotInstalled(f"Java was not found: {JAVA_INSTALL_HINT}")


def pubsub_emulator_command(roots: Sequence[Path] | None = None) -> list[str]:
    """The command that runs the Pub/Sub emulator in the foreground (``--port`` added later)."""
    script = _find_script(_PUBSUB_SCRIPT, "Pub/Sub emulator", PUBSUB_INSTALL_HINT, roots)
    _check_java()
    return [str(script), "--host=127.0.0.1"]


def firestore_emulator_command(roots: Sequence[Path] | None = None) -> list[str]:
    """The command that runs the Firestore emulator in the foreground (``--port`` added later)."""
    script = _find_script(_FIRESTORE_SCRIPT, "Firestore emulator", FIRESTORE_INSTALL_HINT, roots)
    _check_java()
    return [str(script), "start", "--host=127.0.0.1"]


def check_installed(
    *, pubsub: bool = True, firestore: bool = True, roots: Sequence[Path] | None = None
) -> None:
    """Raise :class:`EmulatorNotInstalled` (listing every missing piece) unless all are present.

    CI runs ``python -m emulator`` (or ``python -c "import emulator; emulator.check_installed()"``)
    before the tests so that a missing emulator fails at once with the fix, not as a hang.
    ``roots`` replaces the searched Google Cloud CLI directories (default: :func:`sdk_roots`).
    """
    problems: list[str] = []
    checks = []
    if pubsub:
        checks.append(pubsub_emulator_command)
    if firestore:
        checks.append(firestore_emulator_command)
    for check in checks:
        try:
            check(roots)
        except EmulatorNotInstalled as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    if problems:
        raise EmulatorNotInstalled("; ".join(problems))
