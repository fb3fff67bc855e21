"""tests/conftest.py starts the longest single tests first under xdist (SLOW_FIRST): each entry
must still name a test, or a renamed one would silently lose its place and could end the run
late again."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import SLOW_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_every_slow_first_entry_names_a_test() -> None:
    for entry in SLOW_FIRST:
        path, _, name = entry.partition("::")
        tree = ast.parse((ROOT / path).read_text())
        functions = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
        assert any(f.startswith("test_") and f.startswith(name) for f in functions), entry
