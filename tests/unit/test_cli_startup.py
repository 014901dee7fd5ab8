"""``mailpipe`` starts without the Pub/Sub client unless the command uses it: ``mailpipe --help``
and ``mailpipe status`` import neither google-cloud-pubsub nor :mod:`ops.replay` (the dlq
commands import them when they run). Each case is a fresh interpreter, as a user starts it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("google.cloud.pubsub", "google.pubsub", "ops.replay")

# Parse the arguments as `mailpipe` does, then list the heavy modules that were imported.
PARSE_THEN_LIST = f"""
import json, sys
from ops.cli import build_parser
try:
    build_parser().parse_args(sys.argv[1:])
except SystemExit:  # --help
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))
"""


def heavy_modules_after(*code_or_argv: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", *code_or_argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found: list[str] = json.loads(done.stdout.splitlines()[-1])
    return found


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("status",),
        ("status", "m-1", "--json"),
        ("send", "--to", "bob@example.org", "--text", "hi", "--deliver-by", "1796115600"),
        ("dlq", "replay", "--due"),  # parsed only: the Pub/Sub client comes when it runs
    ],
)
def test_parsing_a_command_imports_no_pubsub_client(argv: tuple[str, ...]) -> None:
    assert heavy_modules_after(PARSE_THEN_LIST, *argv) == []


def test_the_check_sees_the_pubsub_client_when_it_is_imported() -> None:
    imported = heavy_modules_after(
        PARSE_THEN_LIST.replace("import json", "import ops.replay, json")
    )
    assert "google.cloud.pubsub_v1" in imported and "ops.replay" in imported
