"""The tree stays `ruff` clean (the configuration is in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed")
def test_ruff_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff) if ruff.exists() else "ruff", "check", "--no-cache", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The token layer's modules that talk PKCS#11; anything else goes through keyservice.token.
PKCS11_MODULES = {"keyservice/token/session.py", "keyservice/token/runtime.py",
                  "keyservice/token/provisioning.py", "keyservice/token/piv.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_token_layer_imports_pkcs11() -> None:
    importers = set()
    for package in ("keyservice", "archiver", "client", "bench", "fusion_testkit"):
        for path in (ROOT / package).rglob("*.py"):
            if any(name == "pkcs11" or name.startswith("pkcs11.") for name in _imports(path)):
                importers.add(path.relative_to(ROOT).as_posix())
    assert importers == PKCS11_MODULES


def test_token_internals_stay_inside_the_token_package() -> None:
    # Callers use the package's public names (keyservice/token/__init__.py), not its modules.
    offenders = []
    for package in ("keyservice", "archiver", "client", "bench", "fusion_testkit", "tests"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parent == ROOT / "keyservice" / "token":
                continue
            if any(name.startswith("keyservice.token.") for name in _imports(path)):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert offenders == []


def test_no_test_module_imports_another() -> None:
    """Shared test helpers live in fusion_testkit/ or a helper module, not in a test module:
    importing one test module from another runs its tests' module code twice and hides the
    helper (issue 24)."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                if node.module.rsplit(".", 1)[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
    assert offenders == []
