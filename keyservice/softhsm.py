"""Developer helper: a private SoftHSM token directory and a token in it, via softhsm2-util.

SoftHSM is for development and tests only: its "token" is files on disk protected by the PIN,
not hardware. Real viewers use a smartcard or TPM (docs/tokens.md).
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from collections.abc import Mapping
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
    conf.chmod(0o600)  # names where the token files are: nobody else's business
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
    # The PINs are typed at softhsm2-util's prompts through a pseudo-terminal, never passed as
    # arguments: a command line is visible to every local user (ps, /proc/PID/cmdline).
    returncode, output = _run_with_pins(
        [tool, "--init-token", "--free", "--label", label],
        {"so pin": so_pin, "user pin": pin}, env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    result = subprocess.CompletedProcess([], returncode, output, "")
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit code {result.returncode}"
        raise TokenError(f"softhsm2-util could not create token '{label}' ({reason}); check "
                         f"that {conf.parent} is writable.")
    return conf


def _run_with_pins(args: list[str], answers: Mapping[str, str], env: Mapping[str, str],
                   timeout_s: float = 60.0) -> tuple[int, str]:
    """Run a tool that prompts for PINs on its terminal, answering each prompt whose last line
    names a key of ``answers`` (case-insensitive). Returns (exit code, output without echo)."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=dict(env),
                                   start_new_session=True, close_fds=True)
    finally:
        os.close(slave)
    output = b""
    answered = 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the tool exited and closed its terminal
                break
            if not data:
                break
            output += data
            prompt = output.rsplit(b"\n", 1)[-1].decode(errors="replace")
            if prompt.rstrip().endswith(":") and len(output) > answered:
                for name, value in answers.items():
                    if name in prompt.lower():
                        os.write(master, value.encode() + b"\n")
                        answered = len(output)
                        break
        else:
            process.kill()
    finally:
        os.close(master)
        try:
            returncode = process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
    # The terminal echoes '*' for each character typed: nothing of a PIN, but noise.
    text = output.decode(errors="replace").replace("\r", "")
    return returncode, "\n".join(line.rstrip("*") for line in text.splitlines())
