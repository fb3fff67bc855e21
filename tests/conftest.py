"""Test-session plugins. SoftHSM, viewer, Archiver and camera fixtures: the fusion_testkit plugin
(fusion_testkit/pytest_plugin.py, also registered by the installed package's pytest11 entry
point; listed here so a checkout on PYTHONPATH gets it too). TPM: tests/fixtures/tokens.py."""

from __future__ import annotations

import compileall
from pathlib import Path

import pytest

pytest_plugins = ["fusion_testkit.pytest_plugin", "tests.fixtures.tokens", "tests.fixtures.server",
                  "tests.fixtures.rtsp", "tests.fixtures.piv.stack", "tests.fixtures.parallel"]


def pytest_configure(config: pytest.Config) -> None:
    """The bytecode of the packages the suite runs in subprocesses (hundreds of Archivers and
    CLI commands), compiled once per session: where PYTHONDONTWRITEBYTECODE is set, Python does
    not cache it, and every process compiled every module it imports again (an Archiver's start
    ~0.2 s of CPU more, a fusion-client command ~0.1 s; issue 23). Up-to-date files are kept;
    the files are written atomically, so xdist workers may do this at once."""
    root = Path(__file__).resolve().parents[1]
    for package in ("keyservice", "archiver", "client", "fusion_testkit"):
        compileall.compile_dir(root / package, quiet=2)


@pytest.fixture(autouse=True)
def _softhsm_for_commands(request: pytest.FixtureRequest) -> None:
    """Our tests run fusion-keys, fusion-client and pkcs11-tool as commands that inherit the
    environment: a test that uses a SoftHSM store gets its SOFTHSM2_CONF there, for that test
    only (softhsm_environ restores it). Tests that use no SoftHSM token get nothing, and the
    plugin itself sets nothing."""
    if "softhsm_store" in request.fixturenames:
        request.getfixturevalue("softhsm_environ")
