"""Every repository path the docs or the code's comments name exists.

A reader follows `subscriber/delivery.py`, a test such as
`tests/unit/test_layers.py::test_each_package_imports_only_the_layers_below_it` or a link like
[deploy](docs/deploy.md#push-authentication) to find the code or the proof behind a sentence;
when a file moves or a test is renamed, the sentence must move with it. Checked:

- the docs (README.md, docs/**/*.md, terraform/README.md): paths in backticks, link targets, and
  bare paths that start with a top-level folder of the repository;
- Python comments and docstrings (every ``.py`` file of the repository) and Terraform comments:
  the same, with paths read from the repository root or from the file's own folder.

A reference ``FILE::NAME`` must name a function or class defined in that Python file
(``FILE::CLASS::NAME``: a method of that class); ``::NAME`` alone continues the last file named in
the same paragraph. A test named alone in backticks (``test_...``) must be defined under tests/.
Anchors of links are not checked. URLs, paths under ``../shared`` (the team's tools, absent from a
clone), globs, and paths the tools create at run time (``.venv``, ``.mailpipe``) are not
references to the repository and are left out.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]

# Folders that are not the repository's own sources (virtualenvs, caches, run-time state).
SKIPPED_DIRS = {".git", ".venv", ".venv-tools", ".mailpipe", "__pycache__", "node_modules"}

# Run-time locations the tools create; they are named in the docs but never committed.
RUNTIME_PREFIXES = (".venv", ".venv-tools", ".mailpipe", "bench/results")
# Files the user writes (docs/deploy.md step 3: copied from terraform.tfvars.example).
USER_FILES = {"terraform.tfvars"}

# Extensions a path-like token must end with (or a trailing "/" for a folder) to count as a file.
FILE_SUFFIXES = {
    ".py",
    ".md",
    ".tf",
    ".json",
    ".toml",
    ".txt",
    ".example",
    ".yml",
    ".yaml",
    ".cfg",
    ".sh",
    ".hcl",
    ".tfvars",
}
EXTENSIONLESS_FILES = {"Dockerfile", "LICENSE", "dev", "run"}

PATH_CHARS = r"[A-Za-z0-9_.\-/]"
BACKTICK = re.compile(r"`([^`\n]+)`")
TEST_NAME = re.compile(r"test_\w+")  # a test named alone: defined somewhere under tests/
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
# A bare path: starts at a word boundary and has a "/" in it, or is the name of a Markdown file.
BARE = re.compile(
    r"(?<![\w./:-])((?:\.\./)*[A-Za-z_.][A-Za-z0-9_.\-]*(?:/" + PATH_CHARS + r"*|\.md\b))"
)


@dataclass(frozen=True)
class Reference:
    source: str  # file:line
    text: str  # as written
    base: Path  # the folder of the file that names it
    link: bool = False  # a Markdown link: resolved from ``base`` only, as a browser does


@dataclass(frozen=True)
class Dangling:
    reference: Reference
    reason: str

    def __str__(self) -> str:
        return f"{self.reference.source}: `{self.reference.text}` — {self.reason}"


def _walk(suffix: str) -> Iterator[Path]:
    for path in sorted(ROOT.rglob(f"*{suffix}")):
        rel = path.relative_to(ROOT)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        yield path


def doc_files() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "terraform" / "README.md"]
    docs += sorted((ROOT / "docs").rglob("*.md"))
    return [path for path in docs if path.exists()]


@cache
def top_level_names() -> frozenset[str]:
    return frozenset(p.name for p in ROOT.iterdir() if p.name not in SKIPPED_DIRS)


def _looks_like_path(token: str) -> bool:
    # An e-mail address (`bounce@simulator.mailpipe.example`) is not a path, whatever it ends in.
    if not token or any(char in token for char in " *{}$<>@"):
        return False
    if "://" in token or token.startswith(("/", "~", "-", "@")):
        return False
    path = token.split("::", 1)[0].rstrip("/")
    name = PurePosixPath(path).name
    if token.split("::", 1)[0].endswith("/") and "/" in token.rstrip("/"):
        return True
    if PurePosixPath(name).suffix in FILE_SUFFIXES:
        return True
    return "/" in path and name in EXTENSIONLESS_FILES


def _is_repository_path(token: str, base: Path, *, bare: bool) -> bool:
    """Whether ``token`` claims to be a path in this repository (not a URL, a host path, ...)."""
    path = token.split("::", 1)[0]
    if not _looks_like_path(token):
        return False
    if path.startswith(RUNTIME_PREFIXES) or path.startswith("../shared"):
        return False
    if PurePosixPath(path).name in USER_FILES:
        return False
    first = path.split("/", 1)[0]
    if "." in first and "/" in path and first not in top_level_names():
        return False  # a host name: cloud.google.com/run/docs/...
    if base != ROOT:
        try:
            (base / path).resolve().relative_to(ROOT.resolve())
        except ValueError:
            return False  # outside the clone, e.g. ../shared seen from a subfolder
        if (base / path).resolve().is_relative_to((ROOT.parent / "shared").resolve()):
            return False
    if bare:
        # In prose only paths rooted at a top-level entry (or relative with ../) are claims, and
        # any Markdown file: a note named by file must be one a reader of the clone can open.
        return first in top_level_names() or path.startswith("../") or path.endswith(".md")
    return True


def _resolve(path: str, base: Path) -> Path | None:
    # From the naming file's folder, the repository root, or docs/ (prose names a doc by its name).
    for candidate in (base / path, ROOT / path, ROOT / "docs" / path):
        if candidate.exists():
            return candidate
    return None


@cache
def _defined_names(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
    return names


@cache
def _test_names() -> frozenset[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.add(path.stem)  # a test module named alone
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return frozenset(names)


def _has_member(path: Path, dotted: list[str]) -> bool:
    scope: dict[str, ast.AST] = _defined_names(path)
    for index, written in enumerate(dotted):
        name = re.sub(r"\[.*\]$", "", written)  # a parametrised id: test_x[sqlite]
        node = scope.get(name.removesuffix("()"))
        if node is None:
            return False
        if index < len(dotted) - 1:
            if not isinstance(node, ast.ClassDef):
                return False
            scope = {
                child.name: child
                for child in node.body
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            }
    return True


def check(ref: Reference, text: str) -> str | None:
    """Why ``text`` (a path, maybe with ``::names``) does not exist, or None when it does."""
    if TEST_NAME.fullmatch(text):
        return None if text in _test_names() else "no test of that name under tests/"
    path, _, members = text.partition("::")
    path = path.split("#", 1)[0]
    if ref.link:
        target: Path | None = ref.base / path if (ref.base / path).exists() else None
    else:
        target = _resolve(path, ref.base)
    if target is None:
        return "no such file or folder"
    if members:
        if target.suffix != ".py" or not target.is_file():
            return f"{path} is not a Python file"
        if not _has_member(target, members.split("::")):
            return f"{path} defines no {members}"
    return None


def _references_in_text(
    text: str, source: str, base: Path, first_line: int = 1, *, markdown: bool = True
) -> Iterator[tuple[Reference, str]]:
    """(reference, path to check) for each path in ``text``, line by line."""
    last_file: str | None = None  # for "::name" continuing a file named earlier in the paragraph
    for number, line in enumerate(text.splitlines(), start=first_line):
        where = f"{source}:{number}"
        if not line.strip():
            last_file = None
        spans: list[tuple[int, int]] = []
        tokens: list[tuple[int, str, str]] = []  # (position, kind, token)
        for match in BACKTICK.finditer(line):
            spans.append(match.span())
            tokens.append((match.start(), "code", match.group(1).strip()))
        for match in LINK.finditer(line):
            spans.append(match.span())
            tokens.append((match.start(), "link", match.group(1)))
        for match in BARE.finditer(line):
            if any(start <= match.start() < end for start, end in spans):
                continue
            token = match.group(1).rstrip(".,;:)")
            tokens.append((match.start(), "bare", token))
        for _, kind, written in sorted(tokens):
            token = written.strip("'\"")
            if kind == "code" and TEST_NAME.fullmatch(token):
                yield Reference(where, token, base), token
                continue
            if kind == "code" and token.startswith("::") and last_file:
                ref = Reference(where, token, base)
                yield ref, f"{last_file}{token}"
                continue
            if kind == "link":
                target = token.split("#", 1)[0]
                if not target or "://" in target or target.startswith(("mailto:", "../shared")):
                    continue
                yield Reference(where, target, base, link=markdown), target
                continue
            if not _is_repository_path(token, base, bare=kind == "bare"):
                continue
            path = token.split("::", 1)[0]
            if path.endswith(".py"):
                last_file = path
            yield Reference(where, token, base), token


def doc_references() -> Iterator[tuple[Reference, str]]:
    for doc in doc_files():
        source = str(doc.relative_to(ROOT))
        text = doc.read_text(encoding="utf-8")
        yield from _references_in_text(text, source, doc.parent)


def _python_prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring in a Python file."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                for offset, line in enumerate(body[0].value.value.splitlines()):
                    yield body[0].lineno + offset, line


def code_references() -> Iterator[tuple[Reference, str]]:
    for path in _walk(".py"):
        source = str(path.relative_to(ROOT))
        for number, line in _python_prose(path):
            yield from _references_in_text(line, source, path.parent, number, markdown=False)
    for path in _walk(".tf"):
        source = str(path.relative_to(ROOT))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            comment = re.search(r"(?:^|\s)(?:#|//)(.*)$", line)
            if comment:
                yield from _references_in_text(
                    comment.group(1), source, path.parent, number, markdown=False
                )


def dangling(references: Iterator[tuple[Reference, str]]) -> list[Dangling]:
    found = []
    for ref, text in references:
        reason = check(ref, text)
        if reason is not None:
            found.append(Dangling(ref, reason))
    return found


def _report(found: list[Dangling]) -> str:
    return "dangling references:\n" + "\n".join(f"  {item}" for item in found)


def test_every_path_the_docs_name_exists() -> None:
    found = dangling(doc_references())
    assert found == [], _report(found)


def test_every_path_comments_and_docstrings_name_exists() -> None:
    found = dangling(code_references())
    assert found == [], _report(found)


def test_the_scan_finds_the_references_it_is_meant_to_check() -> None:
    """The scan is not vacuous: it sees paths, test names and links, and flags a missing one."""
    refs = [text for _, text in doc_references()]
    assert "subscriber/delivery.py" in refs
    assert "mailpipe/topology.json" in refs
    assert any("::" in text for text in refs)
    line = (
        "see `subscriber/nowhere.py`, `tests/unit/test_layers.py::no_such_test`, "
        "`::also_missing` and [deploy](docs/missing.md#anchor), [rel](deploy.md); "
        "`tests/unit/test_layers.py::test_each_package_imports_only_the_layers_below_it` "
        "and https://cloud.google.com/run/docs/x.md and `../shared/tools/x.py` are fine"
    )
    found = dangling(_references_in_text(line, "example.md", ROOT))
    assert sorted(item.reference.text for item in found) == [
        "::also_missing",
        "deploy.md",
        "docs/missing.md",
        "subscriber/nowhere.py",
        "tests/unit/test_layers.py::no_such_test",
    ]


def test_the_docs_index_lists_every_doc() -> None:
    """docs/README.md is the way in: every page under docs/ is linked from it."""
    index = ROOT / "docs" / "README.md"
    linked = {
        (index.parent / target.split("#", 1)[0]).resolve()
        for target in LINK.findall(index.read_text(encoding="utf-8"))
    }
    missing = [
        str(doc.relative_to(ROOT))
        for doc in sorted((ROOT / "docs").rglob("*.md"))
        if doc != index and doc.resolve() not in linked
    ]
    assert missing == [], f"add these to docs/README.md: {missing}"
