"""Test-session plugins. SoftHSM, viewer, Archiver and camera fixtures: the fusion_testkit plugin
(fusion_testkit/pytest_plugin.py, also registered by the installed package's pytest11 entry
point; listed here so a checkout on PYTHONPATH gets it too). TPM: tests/fixtures/tokens.py."""

from __future__ import annotations

import pytest

pytest_plugins = ["fusion_testkit.pytest_plugin", "tests.fixtures.tokens", "tests.fixtures.server",
                  "tests.fixtures.rtsp", "tests.fixtures.piv.stack", "tests.fixtures.parallel"]


@pytest.fixture(autouse=True)
def _softhsm_for_commands(request: pytest.FixtureRequest) -> None:
    """Our tests run fusion-keys, fusion-client and pkcs11-tool as commands that inherit the
    environment: a test that uses a SoftHSM store gets its SOFTHSM2_CONF there, for that test
    only (softhsm_environ restores it). Tests that use no SoftHSM token get nothing, and the
    plugin itself sets nothing."""
    if "softhsm_store" in request.fixturenames:
        request.getfixturevalue("softhsm_environ")
