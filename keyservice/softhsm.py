"""Developer helper: a private SoftHSM token directory and a token in it, via softhsm2-util.

SoftHSM is for development and tests only: its "token" is files on disk protected by the PIN,
not hardware. Real viewers use a smartcard or TPM (docs/tokens.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from keyservice.errors import ModuleNotFound, ObjectExists, TokenError, UsageError

CONFIG_NAME = "softhsm2.conf"


def write_config(directory: Path) -> Path:
    """Create DIR/tokens and DIR/softhsm2.conf pointing at it (kept if already there)."""
    directory = directory.expanduser().resolve()
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    # Token files hold the (PIN-encrypted) keys: keep the directory private to this user.
    tokens.chmod(0o700)
    conf = directory / CONFIG_NAME
    text = (f"directories.tokendir = {tokens}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n")
    if not conf.exists() or conf.read_text(encoding="utf-8") != text:
        conf.write_text(text, encoding="utf-8")
    return conf


def _softhsm_util() -> str:
    tool = shutil.which("softhsm2-util")
    if tool is None:
        raise ModuleNotFound("softhsm2-util is not installed; install it with "
                             "apt-get install softhsm2.")
    return tool


def token_labels(conf: Path) -> list[str]:
    """Labels of the initialised tokens in the SoftHSM directory of ``conf``."""
    result = subprocess.run([_softhsm_util(), "--show-slots"], capture_output=True, text=True,
                            env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=False)
    labels = []
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Label" and value.strip():
            labels.append(value.strip())
    return labels


def init_softhsm(directory: Path, label: str, pin: str, so_pin: str) -> Path:
    """Create (or reuse) a SoftHSM directory and a new token in it; return the config path."""
    if not label or len(label.encode("utf-8")) > 32:
        raise UsageError("A token label must have 1 to 32 bytes.")
    for name, value in (("PIN", pin), ("SO PIN", so_pin)):
        if not 4 <= len(value) <= 255:
            raise UsageError(f"SoftHSM needs a {name} of 4 to 255 characters.")
    tool = _softhsm_util()
    conf = write_config(directory)
    if label in token_labels(conf):
        raise ObjectExists(f"A token labelled '{label}' already exists in {conf.parent}; choose "
                           "another label or use that token.")
    # NB: softhsm2-util takes the PINs as arguments (visible in ps while it runs); this helper
    # is for development tokens, never for production keys.
    result = subprocess.run(
        [tool, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        capture_output=True, text=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit code {result.returncode}"
        raise TokenError(f"softhsm2-util could not create token '{label}' ({reason}); check "
                         f"that {conf.parent} is writable.")
    return conf
