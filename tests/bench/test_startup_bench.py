"""``python -m bench.startup`` at one run per command, in a subprocess (its SoftHSM store and
Archivers are its own), checked through the JSON it writes: every command ran for real (a
failed command fails the benchmark) and was timed. No timed assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.startup import COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_startup_benchmark_runs_every_command(tmp_path: Path) -> None:
    results = tmp_path / "startup.json"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--runs", "1", "--workdir",
         str(tmp_path / "work"), "--results", str(results)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "machine: " in done.stdout and "| fusion-client --help |" in done.stdout
    data = json.loads(results.read_text())
    assert set(data["commands"]) == set(COMMANDS)
    for name, per in data["commands"].items():
        timing = per["this"]
        assert timing["runs"] == 1, name
        assert timing["wall_median_ms"] > 0 and timing["cpu_median_ms"] > 0, name
    # play's first byte also less its main thread's wait for a core (Linux schedstat).
    play = data["commands"]["fusion-client play -o - (first byte)"]["this"]
    assert 0 < play["unqueued_median_ms"] <= play["wall_median_ms"]
