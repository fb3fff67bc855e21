"""bench/site_directory.py at tiny size, in a subprocess (its PostgreSQL cluster, Archivers and
SoftHSM store are its own), checked through the JSON it writes: both backends measured in
every part, with the counts asked for. No timed assertions: a tiny run's figures mean little."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_testkit.postgres import find_postgres_bin

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_site_directory_bench_measures_both_backends_in_every_part(tmp_path: Path) -> None:
    if find_postgres_bin() is None:
        message = "PostgreSQL is not installed (Debian package 'postgresql'; scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    results = tmp_path / "site.json"
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.site_directory", "--viewers", "200", "--calls", "100",
         "--reloads", "2", "--writes", "10", "--logins", "3", "--lists", "5",
         "--ingest-cameras", "3", "--ingest-windows", "1", "--ingest-seconds", "2",
         "--json", str(results)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "machine: " in done.stdout and "on paper: " in done.stdout
    data = json.loads(results.read_text())["site directory"]
    assert data["parameters"]["viewers"] == 200
    reads = data["in_process"]
    assert len(reads) == 6
    for label, rows in reads.items():
        assert set(rows) == {"postgresql", "sqlite"}, label
        expected = 2 if label.startswith("authorization change") else (
            10 if label.startswith(("authorize", "revoke")) else 100)
        assert rows["postgresql"]["n"] == rows["sqlite"]["n"] == expected, label
        assert "server_cpu_us" in rows["postgresql"] and "server_cpu_us" not in rows["sqlite"]
    https = data["https"]
    assert https["login (SoftHSM viewer, new TLS connection)"]["postgresql"]["n"] == 3
    assert https["GET /v1/cameras (kept session)"]["sqlite"]["n"] == 5
    ingest = data["ingest"]
    for backend in ("postgresql", "sqlite"):
        assert len(ingest["windows"][backend]) == 1
        assert ingest[backend]["segments"] > 0  # real segments, acknowledged after fsync
    paper = data["on_paper"]
    assert ingest["ratio_throughput"] > 0
    assert paper["cameras_per_archiver"] == 250 and paper["archivers_per_postgres_core"] > 0
