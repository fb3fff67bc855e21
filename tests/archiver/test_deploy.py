"""The systemd unit of deploy/ (docs/deployment.md): systemd accepts it, its hardening scores
as systemd measures it, and it runs the Archiver the way the CLI actually takes its options."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import typer

from archiver.cli import app
from keyservice.errors import (
    ArchiverMismatch,
    CertificateError,
    PinIncorrect,
    PinLocked,
    TokenError,
    UsageError,
)
from tests.fixtures.server import ArchiverServer

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
    assert context.params["tls_cert"] == Path("/run/credentials/x/tls.crt")
    assert context.params["tls_key"] == Path("/run/credentials/x/tls.key")
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


def test_the_metrics_the_guide_says_to_watch_exist(archiver_server: ArchiverServer) -> None:
    listed = set(re.findall(r"`(fusion_\w+)", (ROOT / "docs" / "deployment.md").read_text()))
    assert len(listed) >= 10
    token = archiver_server.add_camera("lobby")
    assert archiver_server.put_segment("lobby", token, b"v" * 1000) == 201
    assert archiver_server.put_segment("lobby", "wrong", b"v") == 403  # an HTTP error counted
    text = httpx.get(f"{archiver_server.url}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {archiver_server.admin_token}"}).text
    exported = {line.split("{")[0].split()[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    assert listed <= exported, f"the guide names series that do not exist: {listed - exported}"
