"""The layers of docs/development.md hold: the core imports no service, services never import each
other or emulator/, and the CLI works in a service image (where emulator/ is not installed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("publisher", {"subscriber", "canary", "emulator"}),
        ("subscriber", {"publisher", "canary", "emulator"}),
        ("canary", {"publisher", "subscriber", "emulator"}),
    ],
)
def test_services_meet_only_through_pubsub_and_the_record(
    package: str, forbidden: set[str]
) -> None:
    offenders = {
        module: sorted(names & forbidden)
        for module, names in imported_top_levels(package).items()
        if names & forbidden
    }
    assert offenders == {}


def test_the_core_imports_no_service_outside_the_cli() -> None:
    offenders = {
        module: sorted(names & {"publisher", "subscriber", "emulator"})
        for module, names in imported_top_levels("mailpipe").items()
        if not module.startswith("mailpipe/cli/")
        and names & {"publisher", "subscriber", "emulator"}
    }
    assert offenders == {}


def test_cli_loads_in_a_service_image_without_the_emulator_package() -> None:
    code = (
        "import sys; sys.modules['emulator'] = None\n"
        "from mailpipe.cli import build_parser\n"
        "print(sorted(build_parser()._subparsers._group_actions[0].choices))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "send" in result.stdout and "trace" in result.stdout
