"""One exit code, one meaning, across fusion-keys, fusion-archiver, fusion-client and the web page.

Before: exit 53 meant an incomplete range (keyservice.errors), missing segments (client.player)
and a failed remux (client.web.media); 50 a truncated stream and a broken connection (two
classes); 60 a package that did not verify and an export that could not be built. Now every
number is one member of keyservice.exitcodes.ExitCode, defined by one error class at most, every
exit of ours goes through the enum (no bare integer), and the docs' tables are the enum's.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from client.web.backend import error_json
from keyservice.errors import IntegrityError, KeyServiceError, RangeIncomplete, StreamTruncated
from keyservice.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("keyservice", "archiver", "client")
EXIT_CALLS = {"SystemExit", "exit", "Exit", "_exit"}  # SystemExit, sys.exit, typer.Exit, os._exit


def _all_error_classes() -> list[type[KeyServiceError]]:
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    found: list[type[KeyServiceError]] = []
    todo: list[type[KeyServiceError]] = [KeyServiceError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_number_is_one_member() -> None:
    numbers = [int(code) for code in ExitCode]
    assert len(numbers) == len(set(numbers))
    assert all(0 <= n <= 255 for n in numbers)


def test_every_error_class_uses_the_enum_and_each_code_one_class() -> None:
    defined: dict[ExitCode, list[str]] = {}
    for cls in _all_error_classes():
        assert type(cls.exit_code) is ExitCode, f"{cls.__qualname__}.exit_code is not an ExitCode"
        if "exit_code" in vars(cls):
            defined.setdefault(cls.exit_code, []).append(f"{cls.__module__}.{cls.__qualname__}")
    shared = {code.name: names for code, names in defined.items() if len(names) > 1}
    assert not shared, f"one exit code, several error classes: {shared}"


def test_the_former_duplicates_are_apart() -> None:
    from client.web.media import RemuxFailed
    from keyservice.evidence.layout import EvidenceError

    assert RangeIncomplete.exit_code == ExitCode.RANGE_INCOMPLETE == 53
    assert RemuxFailed.exit_code == ExitCode.REMUX_FAILED == 58
    assert StreamTruncated.exit_code == ExitCode.STREAM_TRUNCATED == 50
    assert not issubclass(StreamTruncated, IntegrityError)
    assert EvidenceError.exit_code == ExitCode.EVIDENCE_EXPORT_FAILED == 64
    assert ExitCode.NOT_VERIFIED == 60


def test_an_export_that_cannot_write_its_package_is_not_a_failed_verification(
        tmp_path: Path) -> None:
    from client.evidence import write_zip
    from keyservice.evidence.layout import EvidenceError

    with pytest.raises(EvidenceError) as info:
        write_zip(tmp_path / "no such directory" / "case.zip", {"a": b"b"})
    assert info.value.exit_code == ExitCode.EVIDENCE_EXPORT_FAILED != ExitCode.NOT_VERIFIED


def test_a_bad_camera_name_is_a_usage_error_not_a_malformed_stream() -> None:
    from keyservice.errors import FormatError, UsageError
    from keyservice.names import validate_camera_name

    with pytest.raises(UsageError) as info:
        validate_camera_name("../etc")
    assert not isinstance(info.value, FormatError) and info.value.exit_code == ExitCode.USAGE


def bare_exits(source: str, filename: str = "<source>") -> list[str]:
    """Exit codes written as integers instead of ExitCode members: SystemExit(3), sys.exit(1),
    typer.Exit(code=2), ``exit_code = 53`` in a class, ``EXIT_X = 60`` in a module."""
    found: list[str] = []

    def integer(node: ast.AST | None) -> bool:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            node = node.operand
        return isinstance(node, ast.Constant) and type(node.value) is int

    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "code")]
            if name in EXIT_CALLS and any(integer(a) for a in args):
                found.append(f"{filename}:{node.lineno}: {name}(<int>)")
        elif isinstance(node, ast.ClassDef | ast.Module):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign | ast.AnnAssign) and integer(stmt.value):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    for target in targets:
                        if isinstance(target, ast.Name) and (
                                target.id == "exit_code" or target.id.startswith("EXIT_")):
                            found.append(f"{filename}:{stmt.lineno}: {target.id} = <int>")
    return found


def test_the_scan_finds_bare_integers() -> None:
    # The scan below must be able to fail: each of these is what it looks for.
    source = ("import sys, typer\nEXIT_DAMAGED = 3\nclass E(Exception):\n    exit_code = 53\n"
              "def f():\n    sys.exit(1)\n    raise SystemExit(2)\n    raise typer.Exit(code=4)\n")
    assert len(bare_exits(source)) == 5
    assert bare_exits("raise SystemExit(ExitCode.USAGE)\nEXIT_X = ExitCode.OK\n") == []


def test_no_bare_integer_exit_in_the_code() -> None:
    found = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             for hit in bare_exits(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def _table(text: str, heading: str, header: str) -> list[list[str]]:
    section = text[text.index(heading):]
    lines = section[section.index(header):].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_the_client_docs_table_is_the_enum() -> None:
    text = (ROOT / "docs" / "client.md").read_text()
    rows = _table(text, "## Exit codes", "| code | name | meaning |")
    assert [(int(code), name.strip("`")) for code, name, _ in rows] == [
        (int(member), member.name) for member in ExitCode]


def test_the_evidence_docs_table_is_the_enum() -> None:
    text = (ROOT / "docs" / "evidence.md").read_text()
    rows = _table(text, "the first applicable one is the exit code", "| result | exit | name |")
    assert [(int(code), name.strip("`")) for _, code, name in rows] == [
        (int(m), m.name) for m in (ExitCode.NOT_VERIFIED, ExitCode.PARTLY_VERIFIED,
                                   ExitCode.EVIDENCE_INCOMPLETE,
                                   ExitCode.SIGNER_NOT_ESTABLISHED, ExitCode.OK)]


def test_every_exit_code_the_docs_name_exists() -> None:
    known = {int(code) for code in ExitCode}
    for path in [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]:
        for number in re.findall(r"\bexit(?:s| code| codes?)?\s+\**(\d+)\b", path.read_text()):
            assert int(number) in known, f"{path.name}: exit {number} is no ExitCode"


@pytest.mark.parametrize(("error", "code"), [
    (IntegrityError(), ExitCode.INTEGRITY),
    (RangeIncomplete("The range is incomplete."), ExitCode.RANGE_INCOMPLETE),
    (StreamTruncated("The stream stopped."), ExitCode.STREAM_TRUNCATED),
    (ValueError("a bug"), ExitCode.UNEXPECTED),
])
def test_the_web_page_gets_the_same_code_and_name(error: BaseException, code: ExitCode) -> None:
    event = error_json(error)
    assert event == {"type": "error", "code": int(code), "error": code.name,
                     "message": event["message"]}
    assert event["message"] and "reason" not in event


def test_the_page_script_compares_only_enum_names() -> None:
    script = (ROOT / "client" / "web" / "static" / "app.js").read_text()
    names = re.findall(r'msg\.error === "([A-Za-z_]+)"', script)
    assert names and all(name in ExitCode.__members__ for name in names)
    assert ".reason" not in script  # one key for the sentence: "message", as the Archiver's
    assert not re.search(r"\.code\s*[=!]==?\s*\d", script)  # no literal exit codes
