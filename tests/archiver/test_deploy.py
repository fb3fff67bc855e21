"""Deployment (docs/deployment.md): the systemd unit of deploy/ is accepted by systemd, scores
as systemd measures it, runs `serve` with options the CLI takes and never restarts into a PIN
retry; the Archiver runs under the unit's confinement (what of it can be had without systemd);
it stops promptly with viewers watching; a backup taken as the guide says restores and
verifies; the metrics the guide names exist."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import typer

from archiver.cli import app
from archiver.server import SHUTDOWN_GRACE_S
from fusion_testkit import forkserver
from keyservice.errors import (
    ArchiverMismatch,
    CertificateError,
    PinIncorrect,
    PinLocked,
    TokenError,
    UsageError,
)
from tests.fixtures.server import ArchiverServer, self_signed_tls
from tests.fixtures.viewer import login

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "fusion-archiver.service"
INSTALLED = "/opt/fusion-archiver/bin/fusion-archiver"  # where docs/deployment.md installs it
requires_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                              reason="systemd-analyze is not installed")


def unit_settings(text: str) -> dict[str, list[str]]:
    """key -> values in order (a unit file may repeat a key), continuation lines joined."""
    settings: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_exec_start_is_the_serve_command_with_options_it_takes() -> None:
    settings = unit_settings(UNIT.read_text())
    words = shlex.split(settings["ExecStart"][0])
    assert words[0] == INSTALLED and words[1] == "serve"
    assert words[-1] == "$FUSION_ARCHIVER_OPTS"
    # The data directory is the StateDirectory systemd makes and opens for writing (%S = /var/lib).
    assert words[words.index("--data") + 1] == "%S/" + settings["StateDirectory"][0]
    # Parse the rest with the CLI's own parser: a renamed or removed option fails here.
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    args = [w.replace("%S", "/var/lib").replace("%d", "/run/credentials/x") for w in words[2:-1]]
    context = serve.make_context("serve", args)
    assert Path(context.params["tls_cert"]) == Path("/run/credentials/x/tls.crt")
    assert Path(context.params["tls_key"]) == Path("/run/credentials/x/tls.key")
    # The TLS files it names are the credentials the unit loads.
    loaded = {value.split(":", 1)[0] for value in settings["LoadCredential"]}
    assert {"tls.crt", "tls.key"} <= loaded


def _subclasses(cls: type) -> set[type]:
    return {cls} | {sub for direct in cls.__subclasses__() for sub in _subclasses(direct)}


def test_a_pin_or_token_failure_is_never_restarted() -> None:
    # A restart loop would try a wrong PIN again every few seconds: an HSM locks after a few.
    settings = unit_settings(UNIT.read_text())
    assert settings["Restart"] == ["on-failure"]
    prevented = {int(code) for code in settings["RestartPreventExitStatus"][0].split()}
    needed = {c.exit_code for c in _subclasses(TokenError)} | {
        UsageError.exit_code, CertificateError.exit_code, ArchiverMismatch.exit_code}
    assert {PinIncorrect.exit_code, PinLocked.exit_code} <= needed
    assert needed <= prevented, f"restarted after exit codes {sorted(needed - prevented)}"


def _copy_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's fusion-archiver: `verify` checks that
    the program exists."""
    here = Path(sys.executable).parent / "fusion-archiver"
    if not here.exists():
        pytest.skip("fusion-archiver is not installed in this environment (scripts/setup.sh)")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(here)))
    return copy


@requires_systemd_analyze
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = _copy_for_this_machine(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 on settings it ignores: any message about the unit is a failure too.
    assert result.returncode == 0, result.stderr
    assert unit.name not in result.stdout + result.stderr, result.stdout + result.stderr


@requires_systemd_analyze
def test_systemd_rates_the_hardening(tmp_path: Path) -> None:
    unit = _copy_for_this_machine(tmp_path)
    text = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", text.stdout)
    assert found, text.stdout + text.stderr
    exposure = float(found.group(1))
    # 0 is best, 10 worst; an unhardened service scores 9.6 ("UNSAFE"). This unit: 1.2.
    assert exposure <= 1.5, text.stdout
    checks = json.loads(subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--json=short", str(unit)],
        capture_output=True, text=True, timeout=60).stdout)
    failed = {check["name"] for check in checks if not check["set"]}
    rated = {check["name"] for check in checks}
    for name in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=",
                 "PrivateDevices=", "MemoryDenyWriteExecute=", "UMask=",
                 "CapabilityBoundingSet=~CAP_SYS_ADMIN", "SystemCallFilter=~@privileged",
                 "User=/DynamicUser="):
        assert name in rated and name not in failed, f"{name} is not in force"


def _family(series: str, histograms: set[str]) -> str:
    """A histogram's _bucket/_sum/_count series are documented under the histogram's name."""
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in histograms:
            return series.removesuffix(suffix)
    return series


def test_the_guide_lists_exactly_the_metrics_that_exist(tmp_path: Path,
                                                        postgres_url: str) -> None:
    listed = set(re.findall(r"`(fusion_\w+)", (ROOT / "docs" / "deployment.md").read_text()))
    assert len(listed) >= 10
    # A member of a site (PostgreSQL): it exports the directory's and the leases' series too.
    archiver_server = ArchiverServer(tmp_path / "archiver", extra_args=(
        "--directory", postgres_url, "--name", "a1")).start()
    try:
        _check_metrics(archiver_server, listed)
    finally:
        archiver_server.stop()


def _check_metrics(archiver_server: ArchiverServer, listed: set[str]) -> None:
    token = archiver_server.add_camera("lobby")
    assert archiver_server.put_segment("lobby", token, b"v" * 1000) == 201
    assert archiver_server.put_segment("lobby", "wrong", b"v") == 403  # an HTTP error counted
    text = httpx.get(f"{archiver_server.url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {archiver_server.admin_token}"}).text
    histograms = {line.split()[2] for line in text.splitlines()
                  if line.startswith("# TYPE ") and line.endswith(" histogram")}
    exported = {_family(line.split("{")[0].split()[0], histograms) for line in text.splitlines()
                if line and not line.startswith("#")}
    assert listed <= exported, f"the guide names series that do not exist: {listed - exported}"
    # And the other way: a new series is documented for the operator who has to watch it.
    assert exported <= listed, f"docs/deployment.md does not list {sorted(exported - listed)}"


# --- the Archiver under the unit's confinement ----------------------------------------------
# What of the unit can be reproduced without systemd as PID 1: a read-only file system but for
# the data directory (ProtectSystem=strict with StateDirectory=, in a private mount namespace),
# no new privileges and no capability (setpriv), no writable executable memory (prctl
# PR_SET_MDWE, Linux 6.3+, inherited across exec), umask 0077, no home, and TLS served by the
# Archiver itself as the unit runs it.
READ_ONLY_BUT_DATA = """
mount --bind "$1" "$1"
mount -o remount,bind,ro /
shift
exec "$@"
"""
CONFINE = """
import ctypes, os, sys
if os.environ.pop("FUSION_TEST_MDWE") == "1" and ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed")
os.umask(0o077)
os.execv(sys.executable, [sys.executable, "-m", "archiver", *sys.argv[1:]])
"""


def _mdwe_supported() -> bool:
    probe = ("import ctypes, mmap, sys\n"
             "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit(1)\n"
             "try: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except OSError: sys.exit(0)\n"
             "sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


class ConfinedServer(ArchiverServer):
    def command(self) -> list[str]:
        launcher = super().command()
        serve = launcher[launcher.index("archiver") + 1:]  # [python, ..., archiver] replaced by the wrapper
        # exec all the way down: the pid is the Archiver's (its /proc status is read below).
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", READ_ONLY_BUT_DATA,
                "sh", str(self.data_dir), "setpriv", "--no-new-privs", "--bounding-set=-all",
                "--inh-caps=-all", sys.executable, "-c", CONFINE, *serve]


def _can_confine() -> bool:
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_confine(), reason="needs setpriv and unshare --mount (root)")
def test_the_archiver_runs_confined_as_the_unit_runs_it(tmp_path: Path) -> None:
    crt, key = self_signed_tls(tmp_path)
    mdwe = _mdwe_supported()
    env = {k: v for k, v in os.environ.items() if k != "HOME"}
    env.update(HOME="/nonexistent", FUSION_TEST_MDWE="1" if mdwe else "0")
    server = ConfinedServer(tmp_path / "data", tls_ca=crt, env=env,
                            extra_args=("--tls-cert", str(crt), "--tls-key", str(key)))
    with server:
        assert server.process is not None
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["NoNewPrivs"].strip() == "1"
        assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
        mounts = Path(f"/proc/{server.process.pid}/mounts").read_text().splitlines()
        assert any(m.split()[1] == "/" and "ro" in m.split()[3].split(",") for m in mounts)
        # First start made the signing token (softhsm2-util through a pty), and a segment is
        # sealed, signed and indexed: the crypto, PKCS#11 and SQLite paths all ran confined.
        token = server.add_camera("lobby")
        assert server.put_segment("lobby", token, b"\x47" * 188 * 10) == 201
        assert server.admin("GET", "/v1/admin/cameras", expect=200)[0]["segments"] == 1
        # Plain HTTP is not served on the TLS port.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    assert "Traceback" not in server.log()
    if not mdwe:
        pytest.skip("ran without MemoryDenyWriteExecute: the kernel lacks PR_SET_MDWE")


# --- backups, as docs/deployment.md says to take them ---------------------------------------
def test_a_backup_taken_while_ingesting_restores_and_verifies(tmp_path: Path) -> None:
    live = tmp_path / "data"
    server = ArchiverServer(live).start()
    acknowledged: list[int] = []
    stop = threading.Event()
    try:
        token = server.add_camera("cam")

        def upload() -> None:
            with httpx.Client(timeout=30) as client:
                number = 0
                while not stop.is_set():
                    response = client.put(f"{server.url}/ingest/cam/s{number}.ts",
                                          content=bytes([number % 256]) * 50_000,
                                          headers={"Authorization": f"Bearer {token}"})
                    assert response.status_code == 201, response.text
                    acknowledged.append(number)
                    number += 1

        uploader = threading.Thread(target=upload)
        uploader.start()
        while len(acknowledged) < 10:
            stop.wait(0.05)
        # 1. the database, through SQLite's backup API, while segments keep arriving
        backup = tmp_path / "backup"
        backup.mkdir()
        before_db_backup = len(acknowledged)
        with sqlite3.connect(live / "archiver.sqlite3") as source, \
                sqlite3.connect(backup / "archiver.sqlite3") as target:
            source.backup(target)
        # 2. then the archive files, still while ingesting; 3. the rest
        shutil.copytree(live / "archive", backup / "archive")
        for name in ("audit.jsonl", "admin-token", "metrics-token"):
            shutil.copy2(live / name, backup / name)
        shutil.copytree(live / "token", backup / "token")
        stop.set()
        uploader.join(60)
        assert len(acknowledged) > before_db_backup
    finally:
        stop.set()
        server.stop()
    # Restore in place (the default token's softhsm2.conf names its directory).
    live.rename(tmp_path / "lost")
    shutil.copytree(backup, live)
    restored = ArchiverServer(live).start()
    try:
        (camera,) = restored.admin("GET", "/v1/admin/cameras", expect=200)
        indexed = camera["segments"]
    finally:
        restored.stop()
    assert before_db_backup <= indexed <= len(acknowledged)
    assert "ARCHIVE DAMAGED" not in restored.log() and "ARCHIVE INCONSISTENT" not in restored.log()
    # Every segment of the restored archive verifies against the Archiver's signature.
    rebuilt = forkserver.run([sys.executable, "-m", "archiver", "reindex", "--data", str(live),
                              "--json"], capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert report["problems"] == [] and report["segments"] == indexed


# --- stopping: `systemctl stop` and restarts (upgrades, certificate renewals) ---------------
def test_a_stop_with_a_live_viewer_is_prompt_and_clean(archiver_server: ArchiverServer,
                                                        make_viewer) -> None:
    server = archiver_server
    token = server.add_camera("cam")
    viewer = make_viewer("watcher")
    server.add_viewer(viewer.pem, "all")
    session = login(server.url, viewer.identity)
    received: list[int] = []
    ended = threading.Event()

    def watch() -> None:
        try:
            with httpx.stream("GET", f"{server.url}/v1/cameras/cam/live",
                              params={"duration_s": 600, "nonce": os.urandom(16).hex()},
                              headers={"Authorization": f"Bearer {session}"},
                              timeout=None) as response:
                received.append(response.status_code)
                for chunk in response.iter_bytes():
                    received.append(len(chunk))
        except httpx.HTTPError:
            pass  # cut without its signed end record, as the viewer will report
        finally:
            ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert server.put_segment("cam", token, b"\x47" * 188 * 10) == 201
    deadline = time.monotonic() + 30
    while sum(received[1:]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received and received[0] == 200 and sum(received[1:]) > 0  # the stream is live
    assert server.process is not None
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # what systemctl stop sends
    server.process.wait(60)
    took = time.monotonic() - started
    # An open live stream has no end of its own: it must not hold the shutdown (before, the
    # process waited for it until systemd's TimeoutStopSec killed it).
    assert took < SHUTDOWN_GRACE_S / 2, f"the stop took {took:.1f} s"
    assert ended.wait(10)
    log = server.log()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and "ERROR" not in log
