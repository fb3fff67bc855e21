"""The declared public surface (issue 24): ``__all__`` in every module of client and at
keyservice's top level, a docstring on every public name, ``py.typed`` in each package, and an
API reference generated from the docstrings with pdoc, built here so that it cannot rot."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import tomllib
from pathlib import Path

import pytest

from fusion_testkit import forkserver

ROOT = Path(__file__).parents[1]
CLIENT_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "client").rglob("*.py") if p.name != "__main__.py")


def public_definitions(module_name: str) -> list[str]:
    """Names in the module's ``__all__`` that it defines with def or class, and the public
    methods of those classes ("Class.method")."""
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    declared = set(getattr(module, "__all__", ()))
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in declared:
            names.append(node.name)
            if isinstance(node, ast.ClassDef):
                names += [f"{node.name}.{m.name}" for m in node.body
                          if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
    return names


@pytest.mark.parametrize("module_name", CLIENT_MODULES)
def test_every_client_module_declares_its_surface_with_docstrings(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert isinstance(getattr(module, "__all__", None), list), f"{module_name} has no __all__"
    assert inspect.getdoc(module), f"{module_name} has no docstring"
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.__all__ names {name}, which it lacks"
    undocumented = []
    for dotted in public_definitions(module_name):
        obj: object = module
        for part in dotted.split("."):
            obj = inspect.getattr_static(obj, part)
        if isinstance(obj, classmethod | staticmethod | property):
            obj = obj.__func__ if not isinstance(obj, property) else obj.fget
        if not (getattr(obj, "__doc__", None) or "").strip():
            undocumented.append(dotted)
    assert undocumented == [], f"{module_name}: no docstring on {undocumented}"


def test_keyservice_declares_its_top_level() -> None:
    import keyservice

    assert "KeyServiceError" in keyservice.__all__
    assert {"reader", "token", "errors", "exits"} <= set(keyservice.__all__)
    assert "cli" not in keyservice.__all__ and "cli_support" not in keyservice.__all__


def test_the_names_the_issue_found_undocumented_are_documented() -> None:
    from archiver.app import create_app
    from client.player import Player
    from keyservice.token import RuntimeToken

    for obj in (RuntimeToken.open, create_app, Player.run, Player.for_saved_stream):
        assert (obj.__doc__ or "").strip(), obj


def test_each_package_ships_py_typed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    for package in ("keyservice", "archiver", "client"):
        assert (ROOT / package / "py.typed").is_file()
        assert "py.typed" in data[package]


def test_the_api_reference_builds(tmp_path: Path) -> None:
    out = tmp_path / "api"
    done = forkserver.run([sys.executable, "-m", "pdoc", "-o", str(out), "client", "keyservice"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warn" not in done.stderr, done.stderr
    viewer = (out / "client" / "viewer.html").read_text()
    for name in ("fetch_range", "VerifiedRange", "play_range", "export_evidence"):
        assert f'id="{name}"' in viewer, name
    token = (out / "keyservice" / "token.html").read_text()
    assert "never retried" in token  # RuntimeToken.open's docstring
    assert (out / "keyservice" / "reader.html").is_file()
    assert (out / "index.html").is_file()
