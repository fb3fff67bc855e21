"""Shared by the retention and checker tests: archives of past days made through the
Archiver's real write path (bench.generate: real SoftHSM signer, real key wrapping, an
injected clock), and a search of a data directory for bytes."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from fusion_testkit import forkserver
from tests.fixtures.server import REPO_ROOT

DAY_MS = 86_400_000


def today_ms() -> int:
    now = dt.datetime.now(dt.UTC)
    return int(dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC).timestamp() * 1000)


def day_name(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def generate(data_dir: Path, camera: str, start_ms: int, hours: float, segment_s: float,
             size: int, viewers: list[Path], key_period_s: int = 60) -> dict:
    """An archive of simulated past time (a process of its own: SoftHSM reads its
    configuration once per process)."""
    start = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC).isoformat()
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    args = [sys.executable, "-m", "bench.generate", "--data", str(data_dir), "--camera", camera,
            "--start", start, "--hours", str(hours), "--segment-s", str(segment_s),
            "--segment-bytes", str(size), "--key-period", str(key_period_s)]
    for pem in viewers:
        args += ["--viewer", str(pem)]
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def key_material(data_dir: Path, camera: str, from_ms: int, to_ms: int) -> list[bytes]:
    """The chain records (every viewer's wrapped chain states) of the key chains started in
    [from_ms, to_ms), and the epoch openers created then, as stored now."""
    conn = sqlite3.connect(data_dir / "archiver.sqlite3")
    try:
        records = [r[0] for r in conn.execute(
            "SELECT record FROM chain_records JOIN chains USING (chain_id) WHERE camera=? AND"
            " valid_from_ms>=? AND valid_from_ms<?", (camera, from_ms, to_ms))]
        openers = [r[0] for r in conn.execute(
            "SELECT record FROM epochs WHERE created_ms>=? AND created_ms<?", (from_ms, to_ms))]
    finally:
        conn.close()
    return records + openers


def files_holding(data_dir: Path, needles: list[bytes]) -> dict[str, int]:
    """Every file under data_dir holding any of the needles, and how many of them it holds."""
    found: dict[str, int] = {}
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        count = sum(1 for needle in needles if needle in data)
        if count:
            found[str(path.relative_to(data_dir))] = count
    return found


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    result = forkserver.run([sys.executable, "-m", "archiver", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result
