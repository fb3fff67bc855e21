"""Archiver ingest capacity: plaintext baseline versus encryption for 0..N authorized viewers.

Two real Archivers run side by side on 127.0.0.1 (uvicorn subprocesses started by
``bench.server``, each with its own SoftHSM signing token): one in the plaintext baseline mode,
one encrypting. Both get the same cameras. A load generator in a process of its own
(``bench.loadgen``) plays the cameras: closed-loop PUTs of incompressible 1-4 MB segments, each
acknowledged only after it was (encrypted,) fsynced and indexed. Windows alternate between the
two Archivers (baseline, then encrypted ones, with a baseline again after every two), and each
encrypted window is compared with the mean of the baseline windows on either side of it, so that
the noise of a shared 2-core machine hits both alike. Viewers are added through the admin API
(``POST /v1/admin/clients``), which also forces a key rotation and new epochs, so every
encrypted window starts by wrapping fresh keys (and epoch openers) for all its viewers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    CAMERA_BYTES_PER_S,
    MB,
    REPO_ROOT,
    BenchServer,
    CertFactory,
    MiB,
    Report,
    size_label,
)


@dataclass
class Params:
    viewers: list[int] = field(default_factory=lambda: [0, 1, 20, 100, 1000])
    periods: list[int] = field(default_factory=lambda: [60, 5])
    cameras: int = 100
    concurrency: int = 16
    seconds: float = 8.0
    warmup: float = 1.0
    sizes: list[int] = field(default_factory=lambda: [1 * MiB, 4 * MiB])


# --- what the machine did during a window (Linux /proc; empty elsewhere) -----------------------
def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _machine_ticks() -> tuple[int, int] | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return sum(values), values[3] + values[4]  # all, idle + iowait


def _metrics(server: BenchServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    wanted = ("fusion_key_rotations_total", "fusion_wrapped_keys_total",
              "fusion_epochs_started_total")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name.removeprefix("fusion_").removesuffix("_total")] = float(value)
    return out


def window(server: BenchServer, cameras_file: Path, params: Params) -> dict[str, Any]:
    """One load-generator run against ``server``; MB/s acknowledged inside the window."""
    assert server.process is not None
    metrics0 = _metrics(server)
    cpu0, ticks0, wall0 = _cpu_seconds(server.process.pid), _machine_ticks(), time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", "--url", server.url, "--cameras",
         str(cameras_file), "--concurrency", str(params.concurrency), "--warmup",
         str(params.warmup), "--seconds", str(params.seconds),
         "--sizes", ",".join(str(s) for s in params.sizes)],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    cpu1, ticks1, wall1 = _cpu_seconds(server.process.pid), _machine_ticks(), time.perf_counter()
    if done.returncode != 0:
        raise RuntimeError(f"bench.loadgen failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    metrics1 = _metrics(server)
    result.update({f"{k}_in_run": metrics1[k] - metrics0.get(k, 0) for k in metrics1})
    if cpu0 is not None and cpu1 is not None:
        result["server_cpu_cores"] = (cpu1 - cpu0) / (wall1 - wall0)
    if ticks0 and ticks1:
        total, idle = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
        result["machine_busy"] = 1 - idle / total if total else None
    if result["errors"]:
        raise RuntimeError(f"the Archiver refused segments: {result['errors']} (see "
                           f"{server.log_path})")
    return result


def _describe(label: str, row: dict[str, Any]) -> str:
    mb_s = row["bytes_per_s"] / MB
    text = (f"{label:<24} {mb_s:>7.1f} MB/s {row['bytes_per_s'] / CAMERA_BYTES_PER_S:>6.0f} cams"
            f"  p50 ack {row['latency_p50_s'] * 1000:>5.0f} ms")
    if "ratio" in row:
        text += f"  ratio {row['ratio']:.3f}"
    if "server_cpu_cores" in row:
        text += f"  server CPU {row['server_cpu_cores']:.2f} cores"
    if row.get("machine_busy") is not None:
        text += f", machine {row['machine_busy'] * 100:.0f} % busy"
    if row.get("key_rotations_in_run"):
        text += (f"; {row['key_rotations_in_run']:.0f} rotations, "
                 f"{row['wrapped_keys_in_run']:.0f} key records, "
                 f"{row['epochs_started_in_run']:.0f} epoch openers")
    return text


def run(report: Report, workdir: Path, params: Params) -> dict[str, Any]:
    result = report.section("ingest", {
        "viewers": params.viewers, "key_periods_s": params.periods, "cameras": params.cameras,
        "concurrent_uploads": params.concurrency,
        "segment_sizes": f"uniform {size_label(min(params.sizes))}..{size_label(max(params.sizes))}"
                         " (incompressible)",
        "window_s": params.seconds, "warmup_s": params.warmup,
        "camera_equivalent": "4 Mbit/s",
        "viewer_certificates": "one software RSA-2048 key, one certificate per viewer "
                               "(OAEP-SHA256 extension)"})
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"cam{i:04d}" for i in range(params.cameras)]
    most = max(params.viewers, default=0)
    started = time.perf_counter()
    pems = CertFactory().pems(0, most)
    report.line(f"{most} viewer certificates made in {time.perf_counter() - started:.1f} s")
    blocks = []
    for period in params.periods:
        blocks.append(_block(report, workdir / f"period-{period}", names, pems, period, params))
    result["blocks"] = blocks
    return result


def _block(report: Report, workdir: Path, names: list[str], pems: list[str], period: int,
           params: Params) -> dict[str, Any]:
    """Baseline and encrypted windows for one key period, on two fresh Archivers."""
    report.line(f"-- key period {period} s --")
    workdir.mkdir(parents=True, exist_ok=True)
    baseline = BenchServer(workdir / "baseline", key_period_s=period, plaintext_baseline=True)
    encrypted = BenchServer(workdir / "encrypted", key_period_s=period)
    rows: list[dict[str, Any]] = []
    try:
        baseline.start()
        encrypted.start()
        files = {}
        for name, server in (("baseline", baseline), ("encrypted", encrypted)):
            files[name] = workdir / f"{name}-cameras.json"
            files[name].write_text(json.dumps(server.add_cameras(names)))
        added = 0
        plan: list[int | None] = [None]  # None: a baseline window
        for index, viewers in enumerate(sorted(params.viewers)):
            plan.append(viewers)
            if index % 2 == 1:
                plan.append(None)
        if plan[-1] is not None:
            plan.append(None)
        for step in plan:
            if step is None:
                row = window(baseline, files["baseline"], params)
                row["mode"] = "baseline"
                report.line(_describe("baseline (plaintext)", row))
            else:
                if step > added:
                    t0 = time.perf_counter()
                    encrypted.add_viewers(pems[added:step])
                    report.line(f"   authorized {step - added} more viewers through the admin "
                                f"API in {time.perf_counter() - t0:.1f} s")
                    added = step
                row = window(encrypted, files["encrypted"], params)
                row["mode"] = "encrypted"
                row["viewers"] = step
                rows.append(row)
                report.line(_describe(f"encrypted, {step} viewers", row))
                continue
            rows.append(row)
        _ratios(rows)
        for row in rows:
            if row["mode"] == "encrypted":
                report.line(f"   {row['viewers']:>5} viewers: ratio to the baseline windows "
                            f"around it {row['ratio']:.3f}")
        return {"key_period_s": period, "windows": rows}
    finally:
        encrypted.stop()
        baseline.stop()
        # The archives are tens of GB of test data: do not leave them behind.
        for server in (baseline, encrypted):
            shutil.rmtree(server.data_dir, ignore_errors=True)


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each encrypted window against the mean of the nearest baseline window before and after."""
    for i, row in enumerate(rows):
        if row["mode"] != "encrypted":
            continue
        before = next((r for r in reversed(rows[:i]) if r["mode"] == "baseline"), None)
        after = next((r for r in rows[i + 1:] if r["mode"] == "baseline"), None)
        around = [r["bytes_per_s"] for r in (before, after) if r is not None]
        base = sum(around) / len(around)
        row["baseline_bytes_per_s"] = base
        row["ratio"] = row["bytes_per_s"] / base


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per key period and viewer count: MB/s, camera-equivalents and ratio (for the plot)."""
    out = []
    for block in result.get("blocks", []):
        baselines = [w["bytes_per_s"] for w in block["windows"] if w["mode"] == "baseline"]
        for w in block["windows"]:
            if w["mode"] == "encrypted":
                out.append({"key_period_s": block["key_period_s"], "viewers": w["viewers"],
                            "mb_s": w["bytes_per_s"] / MB,
                            "cameras": w["bytes_per_s"] / CAMERA_BYTES_PER_S,
                            "ratio": w["ratio"],
                            "baseline_mb_s": sum(baselines) / len(baselines) / MB,
                            "baseline_cameras": sum(baselines) / len(baselines)
                            / CAMERA_BYTES_PER_S})
    return out
