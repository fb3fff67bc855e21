"""Each benchmark at tiny size, as `python -m bench --quick --only NAME` in a subprocess (so its
SoftHSM, TPM and Archiver processes are its own), checked through the JSON it writes.

No timed assertions: the figures of a --quick run mean little. What is checked is that each
benchmark ran its real parts and that the counts it reports are the ones the design implies
(key records per rotation, epoch openers, token operations per epoch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    results = tmp_path / f"{name}.json"
    # The benchmark makes its own SoftHSM directory; the test session's must not leak in.
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", name, "--workdir",
         str(tmp_path / "work"), "--results", str(results), *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "machine: " in done.stdout and "parameters: " in done.stdout
    return json.loads(results.read_text())


def test_raw(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "raw", "--sizes", "64K,128K")
    rows = data["raw"]["rows"]
    assert [row["size"] for row in rows] == [65536, 131072]
    for row in rows:
        for key in ("encrypt_mib_s", "decrypt_mib_s", "sha256_mib_s", "disk_1_mib_s",
                    "disk_4_mib_s"):
            assert row[key] > 0, key


def test_rotation_counts(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "rotation", "--rotation", "3x4")
    first, second = data["rotation"]["minutes"]
    # Minute 0 starts every viewer's epoch and every camera's key chain, wrapped for every
    # viewer; minute 1 only steps the chains. Adding a viewer the old way restarts the 3 chains
    # for all 5 viewers; the new way (issue 23) joins it to each: 3 join records, no chain. A
    # revocation on one camera wraps that camera's new chain for the 5 viewers left.
    assert (first["epoch_openers"], first["chains_started"], first["key_records"]) == (4, 3, 12)
    assert (second["epoch_openers"], second["chains_started"], second["key_records"]) == (0, 0, 0)
    restart, join = data["rotation"]["add_viewer_restart"], data["rotation"]["add_viewer_join"]
    assert (restart["epoch_openers"], restart["chains_started"], restart["key_records"]) == (1, 3, 15)
    assert (join["epoch_openers"], join["chains_started"], join["key_records"]) == (1, 0, 3)
    change = data["rotation"]["authorization_change"]
    assert (change["epoch_openers"], change["chains_started"], change["key_records"]) == (0, 1, 5)
    assert first["key_material_bytes"] > 0 and first["cpu_s"] > 0


def test_ingest_windows(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "ingest", "--viewers", "0,2,3", "--cameras", "2",
                     "--periods", "1")
    (block,) = data["ingest"]["blocks"]
    windows = block["windows"]
    # A baseline window on either side of every encrypted one.
    assert [w["mode"] for w in windows] == ["baseline", "encrypted"] * 3 + ["baseline"]
    previous = 0
    for w in windows:
        assert w["bytes"] > 0 and w["segments"] > 0 and not w["errors"]
        assert w["server_user_ms_per_mb"] + w["server_kernel_ms_per_mb"] == pytest.approx(
            w["server_cpu_ms_per_mb"])
        if w["mode"] == "encrypted":
            assert w["ratio"] > 0
            # The crypto measured in the same run, on top of the baselines' machine CPU per
            # MB: always below 1.
            assert 0 < w["cpu_bound_ratio"] < 1
            # Viewers added join the running chains (one record each per camera stream); a
            # chain start (a new UTC day, a restart) wraps it for every authorized viewer. Only
            # the viewers added before this window start an epoch. Joins (and their epochs)
            # are prepared off the ingest path as soon as a viewer is added, so some or all of
            # that work may be done before the window begins: counted as at most, not exactly.
            assert w["key_rotations_in_run"] > 0
            assert w["wrapped_keys_in_run"] == (w["viewers"] * w["key_chains_started_in_run"]
                                                + w["key_chain_joins_in_run"])
            assert 0 <= w["epochs_started_in_run"] <= w["viewers"] - previous
            previous = w["viewers"]
    plot = pytest.importorskip("bench.plot")
    pytest.importorskip("matplotlib")
    png = plot.plot(data, tmp_path / "capacity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_viewer(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "viewer")
    viewer = data["viewer"]
    tokens = [row["token"] for row in viewer["token_operations"]]
    assert tokens[0] == "SoftHSM"
    for row in viewer["token_operations"]:
        # One token operation per epoch: an hour of playback (inside one UTC day) costs one,
        # the whole archive too; logging in costs one more.
        assert row["playback_ops"] == 1 and row["whole_archive_ops"] == 1
        assert row["login_ops"] == 1
        assert row["segments"] > 0
    for row in viewer["seek"]:
        assert row["cli_first_byte_s"] and row["library_first_byte_s"]
    assert viewer["live"]["segments"] == len(viewer["live"]["ack_to_decrypted_s"]) > 0
    throughput = viewer["throughput"]
    assert throughput["reader_in_memory_mib_s"] > 0 and throughput["raw_aes_gcm_decrypt_mib_s"] > 0


def test_revocation_counts(tmp_path: Path) -> None:
    """bench.revocation at 3 cameras x 4 viewers: the synchronous revocation wraps every
    camera's new chain for the 3 viewers left, the prepared ones (a second, then a third viewer
    revoked) for the 2 and then the 1 left, in the background, and each switch leaves nothing
    pending."""
    results = tmp_path / "revocation.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.revocation", "--size", "3x4", "--json", str(results)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["day_start"]["records"] == 12
    assert data["synchronous"]["records"] == 9
    # The prepared path twice, each revoking one more viewer: in a thread (2 viewers left),
    # then in the preparation process (1 left).
    in_thread, prepared = data["prepared_thread"], data["prepared"]
    assert in_thread["records"] == 6 and in_thread["pending_after_switch"] == 0
    assert prepared["records"] == 3 and prepared["pending_after_switch"] == 0
    assert prepared["preparation_cpu_s"] > 0
    # Then the next day's chains, for the one viewer left, prepared before midnight.
    assert data["next_day"]["records"] == 3 and data["next_day"]["chains_started_at_switch"] == 0


def test_revocation_day_starts(tmp_path: Path) -> None:
    """bench.revocation --day-starts at 3 cameras x 4 viewers: every camera's first chains
    wrapped in the interpreter, then after a restart by the preparation process (which does
    the wrapping: its CPU is counted), then the next day's prepared before midnight, so that
    no chain starts at the switch."""
    results = tmp_path / "day-starts.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.revocation", "--size", "3x4", "--day-starts", "--json",
         str(results)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(results.read_text())
    assert data["in_the_interpreter"]["records"] == data["restart"]["records"] == 12
    assert data["in_the_interpreter"]["child_cpu_s"] == 0
    assert data["next_day"]["records"] == 12 and data["next_day"]["chains_started_at_switch"] == 0


def test_ingest_revocation_windows(tmp_path: Path) -> None:
    """--revoke: after the most viewers' windows, one viewer is revoked on every camera and the
    revocation's key period and the next one are measured, with no refused segment."""
    data = run_bench(tmp_path, "ingest", "--viewers", "2", "--cameras", "2", "--periods", "1",
                     "--steady", "--revoke")
    (block,) = data["ingest"]["blocks"]
    windows = block["windows"]
    assert [w.get("phase") for w in windows if w["mode"] == "encrypted"] == [
        "after authorization change", "steady", "revocation, same period",
        "revocation, next period 1"]
    for w in windows:
        assert w["bytes"] > 0 and not w["errors"]
    assert [w["viewers"] for w in windows if w["mode"] == "encrypted"] == [2, 2, 1, 1]
    # The revocation's windows have a baseline right before them (not minutes away).
    revoked = [w.get("phase") for w in windows].index("revocation, same period")
    assert windows[revoked - 1]["mode"] == "baseline"
