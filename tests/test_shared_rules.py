"""One camera-name rule and one set of wire error codes, shared by the Archiver and the viewer."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from client.session import ERROR_CLASSES, LoginRefused
from client.viewer import check_camera
from keyservice.errors import FormatError, UsageError
from keyservice.format import validate_name
from keyservice.names import CAMERA_NAME_RULE, is_camera_name, validate_camera_name
from keyservice.wire import ErrorCode
from tests.fixtures.server import ArchiverServer

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
    with pytest.raises(UsageError):  # a value typed or sent: not a FormatError (issue 24)
        validate_camera_name(name)
    with pytest.raises(FormatError):  # the same name inside a stream record: malformed bytes
        validate_name(name)
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
    assert ERROR_CLASSES[ErrorCode.BAD_PROOF] is LoginRefused  # it used to fall to a generic exit
    assert all(isinstance(code, ErrorCode) for code in ERROR_CLASSES)
    assert ErrorCode("unknown_viewer") is ErrorCode.UNKNOWN_VIEWER


def test_the_archiver_refuses_dot_names_as_a_bad_camera_name(
        archiver_server: ArchiverServer) -> None:
    # The request model's pattern lets '.' and '..' through; the admin's own check answers them
    # (validate_camera_name raises UsageError since issue 24: no longer a FormatError).
    for name in (".", ".."):
        response = httpx.post(f"{archiver_server.url}/v1/admin/cameras", json={"name": name},
                              headers={"Authorization": f"Bearer {archiver_server.admin_token}"},
                              timeout=60, verify=archiver_server.verify)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == ErrorCode.BAD_CAMERA_NAME
        assert CAMERA_NAME_RULE in response.json()["message"]
