"""The SoftHSM helper types PINs at softhsm2-util's prompts (a pseudo-terminal), never as
arguments: a command line is visible to every local user (issue 12, finding 8)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fusion_testkit.commands import fusion_keys, softhsm_util_shim
from keyservice.errors import ObjectExists
from keyservice.softhsm import init_softhsm


@pytest.mark.skipif(shutil.which("softhsm2-util") is None, reason="softhsm2 is not installed")
def test_pins_are_typed_not_passed_and_the_token_opens_with_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv_log = softhsm_util_shim(tmp_path / "shim")
    monkeypatch.setenv("PATH", f"{argv_log.parent}{os.pathsep}{os.environ['PATH']}")
    pin, so_pin = "user-8b1f2c", "so-77d0e3a9"
    conf = init_softhsm(tmp_path / "h", "typed", pin, so_pin)
    arguments = argv_log.read_text().splitlines()
    assert "--init-token" in arguments
    assert not [a for a in arguments if pin in a or so_pin in a or a in ("--pin", "--so-pin")]
    assert (conf.stat().st_mode & 0o777) == 0o600
    # The token exists and its user PIN is the one typed: an identity can be enrolled with it,
    # and not with another.
    env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    env["SOFTHSM2_CONF"] = str(conf)
    ok = fusion_keys("enroll", "--token", f"pkcs11:token=typed;object=eve?pin-value={pin}",
                     "--out", str(tmp_path / "eve.pem"), "--key", "rsa2048", env=env)
    assert ok.returncode == 0, ok.stderr
    wrong = fusion_keys("enroll", "--token", "pkcs11:token=typed;object=bob?pin-value=nope1",
                        "--out", str(tmp_path / "bob.pem"), "--key", "rsa2048", env=env)
    assert wrong.returncode == 21, wrong.stderr
    with pytest.raises(ObjectExists):
        init_softhsm(tmp_path / "h", "typed", pin, so_pin)
