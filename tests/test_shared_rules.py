"""One camera-name rule and one set of wire error codes, shared by the Archiver and the viewer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from client.session import _CODES, LoginRefused
from client.viewer import check_camera
from keyservice.errors import FormatError, UsageError
from keyservice.format import validate_name
from keyservice.names import is_camera_name, validate_camera_name
from keyservice.wire import ErrorCode

ROOT = Path(__file__).parents[1]
GOOD = ["cam1", "a", "A-b_c.d", "x" * 64, ".hidden", "a..b"]
BAD = ["", ".", "..", "x" * 65, "a/b", "caméra", "a b", "a\n", "a\\b"]


@pytest.mark.parametrize("name", GOOD)
def test_every_side_accepts_a_camera_name(name: str) -> None:
    assert is_camera_name(name)
    assert validate_camera_name(name) == name == validate_name(name)
    assert check_camera(name) == name


@pytest.mark.parametrize("name", BAD)
def test_every_side_refuses_what_is_not_a_camera_name(name: str) -> None:
    assert not is_camera_name(name)
    with pytest.raises(FormatError):
        validate_camera_name(name)
    with pytest.raises(UsageError):  # the viewer CLI used to let '.' and '..' through
        check_camera(name)


def test_the_rule_is_written_once() -> None:
    copies = [path.relative_to(ROOT).as_posix()
              for package in ("keyservice", "archiver", "client")
              for path in (ROOT / package).rglob("*.py")
              if re.search(r"A-Za-z0-9\._-\]\{\{?1,", path.read_text(encoding="utf-8"))]
    assert copies == ["keyservice/names.py"]


def test_the_archiver_answers_only_named_error_codes() -> None:
    literal = re.compile(r"(ApiError|_Refuse|_error)\((request, )?[\w.]+, \"")
    offenders = [path.relative_to(ROOT).as_posix() for path in (ROOT / "archiver").rglob("*.py")
                 if literal.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_viewer_maps_every_login_refusal() -> None:
    assert _CODES[ErrorCode.BAD_PROOF] is LoginRefused  # it used to fall to a generic exit
    assert all(isinstance(code, ErrorCode) for code in _CODES)
    assert ErrorCode("unknown_viewer") is ErrorCode.UNKNOWN_VIEWER
