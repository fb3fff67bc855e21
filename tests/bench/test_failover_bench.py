"""bench/failover.py with one kill, in a subprocess (its PostgreSQL cluster, Archivers and RTSP
camera are its own), checked through the JSON it writes. No timed assertions: one kill's
figures on a loaded machine mean little."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fusion_testkit import forkserver
from fusion_testkit.postgres import find_postgres_bin
from tests.fixtures.rtsp import requires_gstreamer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
@requires_gstreamer
def test_the_failover_bench_kills_the_holder_and_measures_the_takeover(tmp_path: Path) -> None:
    if find_postgres_bin() is None:
        message = "PostgreSQL is not installed (Debian package 'postgresql'; scripts/setup.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    results = tmp_path / "failover.json"
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    done = forkserver.run([sys.executable, "-m", "bench.failover", "--kills", "2", "--json",
                           str(results)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kill  1 of a1" in done.stdout and "kill  2 of a2" in done.stdout, done.stdout
    data = json.loads(results.read_text())
    assert data["kills"] == len(data["runs"]) == 2
    for run in data["runs"]:
        # The takeover comes after the kill and before the standby's first segment, and the
        # standby's first segment starts after the dead holder's last one ended.
        assert 0 <= run["detect_s"] <= run["failover_s"]
        assert run["lost_s"] >= 0 and run["first_segment_len_s"] > 0
    assert "GOP" in data["camera"] or "keyframe every 1 s" in data["camera"]
