"""The layers of docs/development.md hold, with no exemption:

    mailpipe/   the core: imports no other package of the repository
    publisher/, subscriber/   the services: the core only (they meet through Pub/Sub and the record)
    client/     the publisher API's client: imports no other package; no service or core imports it
    canary/     a deployable of its own (a Cloud Run job): the core and the client
    emulator/   local runs and tests: the core, the services and the client, never the operator
                tooling
    ops/        operator tooling (the CLI, replay, the trace viewer): may import every package;
                nothing but tests and bench imports it

and the CLI works in the publisher image (where emulator/ and subscriber/ are not installed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"mailpipe", "publisher", "subscriber", "client", "canary", "emulator", "ops"}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """``{module file: {top-level packages it imports}}`` for every module of ``package``."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


ALLOWED = {
    "mailpipe": {"mailpipe"},
    "publisher": {"mailpipe", "publisher"},
    "subscriber": {"mailpipe", "subscriber"},
    "client": {"client"},
    "canary": {"mailpipe", "client", "canary"},
    "emulator": {"mailpipe", "publisher", "subscriber", "client", "emulator"},
    "ops": PACKAGES,
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    offenders = {
        module: sorted((names & PACKAGES) - ALLOWED[package])
        for module, names in imported_top_levels(package).items()
        if (names & PACKAGES) - ALLOWED[package]
    }
    assert offenders == {}


def test_every_package_of_the_repository_has_its_layer() -> None:
    top_level = {
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if path.parent.name not in ("tests", "bench")
    }
    assert top_level == set(ALLOWED)


def test_cli_loads_in_the_publisher_image_without_emulator_or_subscriber() -> None:
    code = (
        "import sys; sys.modules['emulator'] = sys.modules['subscriber'] = None\n"
        "from ops.cli import build_parser\n"
        "print(sorted(build_parser()._subparsers._group_actions[0].choices))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "send" in result.stdout and "trace" in result.stdout and "canary" in result.stdout
