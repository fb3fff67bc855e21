"""``python -m bench.enrolment`` at a small size, in a subprocess against its own Archiver:
every way of enrolling ran for real (the benchmark fails unless every viewer was authorized)
and was timed. No timed assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_enrolment_benchmark_runs_every_way(tmp_path: Path) -> None:
    results = tmp_path / "enrolment.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.enrolment", "--viewers", "40", "--one-by-one", "3",
         "--cameras", "2", "--results", str(results)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "machine: " in done.stdout and "| batches (`POST /v1/admin/viewers/batch`) |" in (
        done.stdout)
    figures = json.loads(results.read_text())
    assert set(figures) == {"one_by_one_ms", "batches_ms", "cli_ms"}
    assert all(value > 0 for value in figures.values())


def test_enrolment_benchmark_measures_a_site(tmp_path: Path) -> None:
    """``--site``: a real PostgreSQL, two Archivers' listeners; both ways applied every viewer
    (the benchmark fails otherwise)."""
    results = tmp_path / "site.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.enrolment", "--site", "--viewers", "30", "--results",
         str(results)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "applied together in" in done.stdout
    figures = json.loads(results.read_text())
    assert set(figures) == {"one_by_one_s", "together_s"} and min(figures.values()) > 0
