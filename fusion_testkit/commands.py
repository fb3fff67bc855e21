"""The project's other commands as their users run them, in a subprocess: ``fusion-keys``, and a
``softhsm2-util`` shim that records how it was called. Shared by tests of several packages
(they import these from here, never from each other's test modules)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fusion_testkit import forkserver


def fusion_keys(*args: str, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``fusion-keys ARGS`` (as ``python -m keyservice.cli``), its output captured as text."""
    if env is None:  # the session's environment, minus any PIN a developer exported
        env = {k: v for k, v in os.environ.items() if k != "FUSION_PIN"}
    return forkserver.run([sys.executable, "-m", "keyservice.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120, stdin=subprocess.DEVNULL)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    """fusion-keys failed with exit ``code`` and one line naming ``needle``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusion-keys: ")
    assert needle in lines[0], lines[0]


def softhsm_util_shim(directory: Path) -> Path:
    """A softhsm2-util first on PATH that records its arguments, then runs the real one."""
    real = shutil.which("softhsm2-util")
    assert real is not None
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "argv.log"
    shim = directory / "softhsm2-util"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    return log
