"""Every test the docs name exists: docs/security.md's claim -> test table (and the other pages
that cite a test as `path::test_name`) must not point at a renamed or deleted test.

A reference is `path/test_x.py::test_name`, the path relative to tests/ (or starting with
tests/); the test exists when the file does and defines that function (at module level or in a
class), so a claim cannot silently lose the test behind it in a refactor.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"
REFERENCE = re.compile(r"(?<![\w/.-])((?:tests/)?[\w/-]+\.py)::(\w+)")
# `python -m bench.x ...` and the like: the project's own modules the docs tell people to run.
MODULE = re.compile(r"python -m ((?:tests|bench|keyservice|archiver|client)(?:\.\w+)*)")


def references(text: str) -> list[tuple[str, str]]:
    return [(path.removeprefix("tests/"), name) for path, name in REFERENCE.findall(text)]


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def missing(refs: list[tuple[str, str]]) -> list[str]:
    problems = []
    cache: dict[str, set[str]] = {}
    for path, name in refs:
        file = TESTS / path
        if not file.is_file():
            problems.append(f"{path}::{name}: no file tests/{path}")
            continue
        if path not in cache:
            cache[path] = defined_functions(file)
        if name not in cache[path]:
            problems.append(f"{path}::{name}: tests/{path} defines no {name}")
    return problems


def doc_pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def test_the_parser_finds_references_and_flags_a_wrong_one() -> None:
    # The check itself must be able to fail: a made-up name and a made-up file are reported.
    text = ("`archiver/test_service.py::test_audit_log_and_health`, "
            "(`tests/client/test_e2e.py::test_archiver_pinning`), "
            "`archiver/test_service.py::test_no_such_test`, `nowhere/test_gone.py::test_x`")
    refs = references(text)
    assert refs == [("archiver/test_service.py", "test_audit_log_and_health"),
                    ("client/test_e2e.py", "test_archiver_pinning"),
                    ("archiver/test_service.py", "test_no_such_test"),
                    ("nowhere/test_gone.py", "test_x")]
    assert missing(refs) == [
        "archiver/test_service.py::test_no_such_test: tests/archiver/test_service.py defines "
        "no test_no_such_test",
        "nowhere/test_gone.py::test_x: no file tests/nowhere/test_gone.py"]


def test_security_md_names_its_tests() -> None:
    # The page is a claim -> test table: if the pattern stopped matching it, the check below
    # would pass on nothing.
    refs = references((DOCS / "security.md").read_text())
    assert len(set(refs)) >= 50, "docs/security.md: the `path::test_name` references vanished"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_doc_names_exists(page: Path) -> None:
    problems = missing(references(page.read_text()))
    assert not problems, f"{page.relative_to(ROOT)} names tests that do not exist:\n" + \
        "\n".join(problems)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_a_doc_runs_exists(page: Path) -> None:
    modules = MODULE.findall(page.read_text())
    absent = [m for m in modules
              if not (ROOT / Path(*m.split("."))).with_suffix(".py").is_file()
              and not (ROOT / Path(*m.split(".")) / "__main__.py").is_file()]
    assert not absent, f"{page.relative_to(ROOT)} runs modules that do not exist: {absent}"
