"""Every module the deployed code imports comes from a declared runtime dependency.

The images install ``[project.dependencies]`` only (``pip install -c constraints.txt .``), so an
import served by a test extra (PyJWT once was) or by some other package's dependencies (a
transitive one can disappear with any upgrade) is a service that cannot start. This walks the
syntax tree of every module in the deployed packages (mailpipe/, publisher/, subscriber/,
canary/, client/, and ops/: the CLI the publisher image carries), finds the distribution that
installs each imported module in this environment, and requires it to be named in
``[project.dependencies]`` itself. Imports under ``if TYPE_CHECKING:`` never run and are left
out; first-party packages and the standard library need no declaration.

tests/e2e/test_image_environment.py proves the same from the other side: it installs exactly
what the Dockerfiles install and starts every entry point.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("mailpipe", "publisher", "subscriber", "canary", "client", "ops")
FIRST_PARTY = {"mailpipe", "publisher", "subscriber", "canary", "client", "ops", "emulator"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[str]:
    """Absolute module names imported by ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    if isinstance(tree, ast.If) and _is_type_checking(tree.test):
        for node in tree.orelse:
            yield from _runtime_imports(node)
        return
    if isinstance(tree, ast.Import):
        yield from (alias.name for alias in tree.names)
    elif isinstance(tree, ast.ImportFrom) and tree.level == 0 and tree.module:
        # `from a.b import c` may import the submodule a.b.c: name it so namespace packages
        # (google.*, opentelemetry.*) resolve to the distribution that really ships it.
        yield from (f"{tree.module}.{alias.name}" for alias in tree.names)
    for child in ast.iter_child_nodes(tree):
        yield from _runtime_imports(child)


def service_imports() -> dict[str, set[str]]:
    """``{module: {files importing it}}`` for third-party imports of the service packages."""
    found: dict[str, set[str]] = {}
    for package in SERVICE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for module in _runtime_imports(tree):
                top = module.split(".")[0]
                if top in FIRST_PARTY or top in sys.stdlib_module_names or top == "__future__":
                    continue
                found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


@cache
def _files_by_distribution() -> dict[str, str]:
    """``{installed file path without suffix: distribution}`` for every installed package file."""
    owners: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            text = str(file)
            if text.endswith((".py", ".so", ".pyd")) and ".." not in text:
                module = re.sub(r"(\.[^./]+)?\.(py|so|pyd)$", "", text)
                owners.setdefault(module.removesuffix("/__init__"), name)
    return owners


def distribution_of(module: str) -> str | None:
    """The distribution that installs ``module`` (or, for ``from a import name``, ``a``)."""
    owners = _files_by_distribution()
    parts = module.split(".")
    while parts:
        owner = owners.get("/".join(parts))
        if owner:
            return owner
        parts.pop()
    return None


def declared_runtime_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}


def test_the_walk_finds_what_the_services_import() -> None:
    imports = service_imports()
    assert "flask.Flask" in imports
    assert distribution_of("google.cloud.pubsub_v1") == "google-cloud-pubsub"
    assert distribution_of("google.api_core.exceptions") == "google-api-core"
    assert distribution_of("opentelemetry.sdk.trace") == "opentelemetry-sdk"
    # The imports of a `TYPE_CHECKING` block are not runtime imports.
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jwt\n")
    assert list(_runtime_imports(tree)) == ["typing.TYPE_CHECKING"]


def test_every_service_import_is_a_declared_runtime_dependency() -> None:
    declared = declared_runtime_dependencies()
    unknown: dict[str, list[str]] = {}
    undeclared: dict[str, list[str]] = {}
    for module, files in sorted(service_imports().items()):
        owner = distribution_of(module)
        if owner is None:
            unknown[module] = sorted(files)
        elif owner not in declared:
            undeclared.setdefault(owner, []).append(f"{module} ({', '.join(sorted(files))})")
    assert unknown == {}, f"imports no installed distribution provides: {unknown}"
    assert undeclared == {}, (
        "imported by deployed code but not in [project.dependencies] of pyproject.toml "
        "(the images install only those):\n"
        + "\n".join(f"  {dist}: {'; '.join(uses)}" for dist, uses in undeclared.items())
    )


def test_every_runtime_dependency_is_pinned_in_constraints() -> None:
    pins = {
        canonicalize_name(line.split("==")[0])
        for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    unpinned = sorted(declared_runtime_dependencies() - pins)
    assert unpinned == [], f"add pins to constraints.txt for: {unpinned}"
