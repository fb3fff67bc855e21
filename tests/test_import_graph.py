"""The import graph of the whole repository (the packages, the harness, the benchmarks and the
tests; issue 24): no module imports another module's private (``_name``) names, and no modules
import each other in a cycle (imports inside functions count: a cycle hidden in a function is
still a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("keyservice", "archiver", "client", "fusion_testkit", "bench", "tests")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between the packages' modules, and every cross-module private import."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    private: list[str] = []
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                target = imported(module, path, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in known:  # a submodule
                        edges[module].add(f"{target}.{alias.name}")
                    elif target in known:
                        edges[module].add(target)
                        if alias.name.startswith("_") and target != module:
                            private.append(f"{module} imports {target}.{alias.name}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_modules() -> None:
    edges, _ = graph()
    assert "client.viewer" in edges and "client.session" in edges["client.viewer"]
    assert "keyservice.token.session" in edges["keyservice.token.runtime"]
    # The checker finds a cycle and a private import when there is one.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_no_module_imports_another_modules_private_names() -> None:
    _, private = graph()
    assert private == []


def test_the_import_graph_has_no_cycle() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_libraries_do_not_import_typer() -> None:
    """keyservice (every module but the CLI ones) and the viewer library load without the CLI
    framework: a developer's program that uses them does not pull typer in. (click may load:
    httpx imports it for its own command line when it is installed.)"""
    cli_modules = {"keyservice.cli", "keyservice.cli_support", "keyservice.__main__"}
    library = sorted(m for m in modules() if m.split(".")[0] == "keyservice"
                     and m not in cli_modules)
    library += ["client.viewer", "client.session", "client.player", "client.pinning",
                "client.timespec", "client.evidence_zip"]
    code = ("import importlib, sys\n"
            f"for name in {library!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'typer'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
