"""Routers hold no rules (issue 24, item 4): archiver/routers/ are HTTP adapters over the
services. They do not import the index or the audit log, never reach into ``.db`` or call
``audit.record``, read no ``app.state`` (dependencies come through archiver/deps.py, the one
injection style), and import no other module's private names. A static scan, so the rule
cannot quietly erode."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTERS = sorted((Path(__file__).resolve().parents[2] / "archiver" / "routers").glob("*.py"))
FORBIDDEN_MODULES = ("archiver.db", "archiver.audit", "archiver.archive", "archiver.migrations",
                     "archiver.grants_store", "sqlite3", "archiver.directory",
                     "archiver.directory.store", "sqlalchemy")


def _problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in FORBIDDEN_MODULES:
                problems.append(f"line {node.lineno}: imports {node.module}")
            problems += [f"line {node.lineno}: imports the private {alias.name} of {node.module}"
                         for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Import):
            problems += [f"line {node.lineno}: imports {alias.name}" for alias in node.names
                         if alias.name in FORBIDDEN_MODULES]
        elif isinstance(node, ast.Attribute):
            if node.attr in ("db", "directory"):
                problems.append(f"line {node.lineno}: reaches into .{node.attr}")
            if node.attr == "record" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "audit":
                problems.append(f"line {node.lineno}: calls audit.record")
            if node.attr == "state" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "app":
                problems.append(f"line {node.lineno}: reads app.state")
    return problems


@pytest.mark.parametrize("router", ROUTERS, ids=lambda p: p.name)
def test_a_router_holds_no_rules(router: Path) -> None:
    assert _problems(router.read_text()) == []


def test_the_scan_finds_what_the_routers_used_to_do() -> None:
    # What routers/grants.py and routers/admin.py did before the service layer: the scan
    # must see each of them (a scan that finds nothing would pass anything).
    before = '''
from archiver.db import CameraRow
from archiver.routers.viewer import _ViewerStream

def create_grant(request, services):
    store = request.app.state.grants
    services.archive.db.viewer("x")
    services.audit.record("x", "grant.create", 0)
'''
    found = _problems(before)
    assert len(found) == 5, found
    assert len(ROUTERS) >= 6  # admin, admins, grants, ingest, viewer, streams (and __init__)
