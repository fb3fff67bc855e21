"""A new shell does not find its SoftHSM token (issue 20, item 6): SoftHSM reads SOFTHSM2_CONF, and
a shell without it reads the system's configuration. The error says so, and what to export.

Real parts: a SoftHSM token, fusion-keys in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fusion_testkit import forkserver
from keyservice.errors import TokenNotFound
from keyservice.softhsm import write_config
from tests.fixtures.tokens import TokenHandle, enroll_viewer


def fusion_keys(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return forkserver.run([sys.executable, "-m", "keyservice.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def test_a_shell_without_softhsm2_conf_is_told_to_export_it(softhsm_token: TokenHandle,
                                                           tmp_path: Path) -> None:
    enroll_viewer(softhsm_token, "alice")
    uri = softhsm_token.object_uri("alice")
    base = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "SOFTHSM2_CONF")}

    # A new shell: no SOFTHSM2_CONF (the system's configuration, without this token).
    new_shell = fusion_keys("list", "--token", uri, env=base)
    assert new_shell.returncode == TokenNotFound.exit_code, new_shell.stderr
    assert "SOFTHSM2_CONF is not set" in new_shell.stderr
    assert "export SOFTHSM2_CONF=" in new_shell.stderr and "Traceback" not in new_shell.stderr

    # Another directory's configuration: the message names the one that was read.
    other = write_config(tmp_path / "other")
    wrong = fusion_keys("list", "--token", uri, env={**base, "SOFTHSM2_CONF": str(other)})
    assert wrong.returncode == TokenNotFound.exit_code, wrong.stderr
    assert f"SOFTHSM2_CONF is {other}" in wrong.stderr

    # As the README says: export the token directory's softhsm2.conf, and it is found.
    found = fusion_keys("list", "--token", uri,
                        env={**base, **softhsm_token.env})
    assert found.returncode == 0, found.stderr
    assert "alice" in found.stdout
