"""Secrets stay secret on the Archiver's machine (issue 12, finding 4, except RTSP): the data
directory is 0700 and nothing in it is readable by other users; the Archiver's token PINs never
appear on a command line (softhsm2-util got them as arguments at first start)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fusion_testkit.commands import softhsm_util_shim
from tests.fixtures.server import ArchiverServer
from tests.fixtures.viewer import fetch, login


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix() or ".": stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")] if not p.is_symlink()}


def test_data_dir_is_private_and_pins_never_on_a_command_line(
        tmp_path: Path, make_viewer, monkeypatch: pytest.MonkeyPatch) -> None:
    argv_log = softhsm_util_shim(tmp_path / "shim")
    monkeypatch.setenv("PATH", f"{argv_log.parent}{os.pathsep}{os.environ['PATH']}")
    data = tmp_path / "archiver"
    # A data directory made loosely by hand (or by an older version) is tightened at start.
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "notes.txt").write_text("left here by an admin")
    (data / "notes.txt").chmod(0o666)

    # Its own process image: a forked Archiver's /proc/PID/cmdline and environ are the fork
    # server's, which would make the check below vacuous.
    server = ArchiverServer(data, forked=False).start()
    try:
        viewer = make_viewer("alice")
        token = server.add_camera("cam1")
        server.add_viewer(viewer.pem, ["cam1"])
        assert server.put_segment("cam1", token, b"x" * 1000) == 201
        assert fetch(server.url, login(server.url, viewer.identity), "cam1").status_code == 200
        # The server's own command line and environment carry no secret either.
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes()
        secrets = [server.admin_token, (data / "token" / "pin").read_text().strip(), token]
        assert not [s for s in secrets if s.encode() in cmdline + environ]

        modes = _modes(data)
        for name in ("archiver.sqlite3", "archiver.sqlite3-wal", "archiver.sqlite3-shm",
                     "audit.jsonl", "admin-token", "metrics-token", "token/pin"):
            assert name in modes, sorted(modes)
        loose = {name: f"{mode:04o}" for name, mode in modes.items()
                 if (stat.S_ISDIR((data / name).lstat().st_mode) and mode != 0o700)
                 or (not stat.S_ISDIR((data / name).lstat().st_mode) and mode & 0o137)}
        assert not loose, loose  # directories 0700, files 0600 or 0640 at most
        assert any(name.endswith(".fsa") for name in modes)  # archive files were checked too
        for name in ("archiver.sqlite3", "admin-token", "token/pin", "audit.jsonl"):
            assert modes[name] == 0o600, (name, f"{modes[name]:04o}")
    finally:
        server.stop()

    # softhsm2-util ran at first start (it made the signing token), and never with a PIN.
    pin = (data / "token" / "pin").read_text().strip()
    arguments = argv_log.read_text().splitlines()
    assert "--init-token" in arguments, arguments
    assert pin not in arguments and "--pin" not in arguments and "--so-pin" not in arguments
    assert not [a for a in arguments if len(a) == 32 and all(c in "0123456789abcdef" for c in a)]
