"""The README is the contract with a new user: its commands, CI's command, and the variable table
it links to (docs/configuration.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def _env_names_read_in(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    pattern = r'"((?:MAILPIPE|GOOGLE_CLOUD|PUBSUB|FIRESTORE|OTEL)_[A-Z_]+|PORT)"'
    return set(re.findall(pattern, text))


def test_readme_has_the_two_fresh_machine_commands() -> None:
    assert "./dev up" in README
    assert "./dev test" in README
    assert (ROOT / "dev").stat().st_mode & 0o111


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec \./dev test$", ci, re.MULTILINE)


def test_every_variable_the_services_read_is_documented() -> None:
    readers = [ROOT / package / "config.py" for package in ("mailpipe", "publisher", "subscriber")]
    names = set().union(*(_env_names_read_in(path) for path in readers))
    assert "MAILPIPE_SMTP_HOST" in names  # the scan itself works
    undocumented = sorted(name for name in names if f"`{name}`" not in CONFIGURATION)
    assert undocumented == [], f"add these to docs/configuration.md's table: {undocumented}"


def test_readme_links_point_at_files_that_exist() -> None:
    for target in re.findall(r"\]\(((?!http)[^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"
