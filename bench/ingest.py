"""Archiver ingest capacity: plaintext baseline versus encryption for 0..N authorized viewers.

Two real Archivers run side by side on 127.0.0.1 (uvicorn subprocesses started by
``bench.server``, each with its own SoftHSM signing token): one in the plaintext baseline mode,
one encrypting. Both get the same cameras. A load generator in a process of its own
(``bench.loadgen``) plays the cameras: closed-loop PUTs of incompressible 1-4 MB segments, each
acknowledged only after it was (encrypted,) fsynced and indexed. Windows alternate between the
two Archivers (a baseline window before and after every encrypted one), and each encrypted
window is compared with the mean of the baseline windows on either side of it, so that the noise
of a shared 2-core machine hits both alike. Between windows the archive files' bytes are given
back to the disk (holes; sizes and offsets stay), so that long runs at a few hundred MB/s fit.

Viewers are added through the admin API (``POST /v1/admin/viewers``); that ends the current
keys of every camera, so each encrypted window starts with every camera rotating its key and
every new viewer starting an epoch (an RSA-OAEP epoch opener) -- the burst the Archiver also
goes through at the start of every key period. Two kinds of blocks:

* short key period (default 5 s): windows of whole key periods, i.e. the steady state of an
  Archiver that rotates 12 times as often as in production;
* the production period (60 s): a window starts with the burst and never crosses a key-period
  boundary. With many viewers it lasts 55 s, almost the whole key period, so that the burst
  weighs in it as it does in a real minute; with few viewers the burst is over in well under a
  second and 8 s windows suffice.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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
    # Encrypted windows with this many viewers or more, in blocks with a long key period, last
    # long_seconds (most of a key period): their rotation burst takes seconds.
    long_viewers: int = 500
    long_seconds: float = 55.0
    warmup: float = 1.0
    sizes: list[int] = field(default_factory=lambda: [1 * MiB, 4 * MiB])
    profile_dir: Path | None = None  # py-spy profiles of the Archivers, when given
    writepath_segments: int = 40  # segments per mode for the in-process write-path CPU cost
    # After each window that follows an authorization change (viewers added: every camera
    # starts a new key chain, wrapped for every viewer), this many more windows with the same
    # viewers, each in the next key period: chains only step (no key records) once every
    # camera's new chain has started. The last is "steady"; earlier ones "next period k" (with
    # many viewers the chain starts of the burst can spill into them: chains start at each
    # camera's first segment).
    steady: int = 0
    # Issue 23: after the windows of the most viewers, revoke one of them (on every camera)
    # and measure a window in the revocation's key period, then ``steady`` more, each in the
    # next key period.
    revoke: bool = False


# --- what the machine did during a window (Linux /proc; empty elsewhere) -----------------------
def _cpu_split(pid: int) -> tuple[float, float] | None:
    """(user, kernel) CPU seconds of ``pid``: the Archiver's kernel time (copies into the
    page cache, fsync, sockets) is a large part of its whole."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return None


def _cpu_seconds(pid: int) -> float | None:
    split = _cpu_split(pid)
    return None if split is None else sum(split)


def _children_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU of each child process of ``pid`` (the Archiver's chain preparation process,
    archiver.chain_worker): its work is off the Archiver's interpreter but on this machine."""
    out: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            cpu = _cpu_seconds(int(child))
            if cpu is not None:
                out[int(child)] = cpu
    return out


def _machine_ticks() -> tuple[int, int] | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return sum(values), values[3] + values[4]  # all, idle + iowait


def _metrics(server: BenchServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=60,
                     headers={"Authorization": f"Bearer {server.admin_token}"}).text
    wanted = ("fusion_key_rotations_total", "fusion_wrapped_keys_total",
              "fusion_epochs_started_total", "fusion_key_chains_started_total",
              "fusion_key_chain_joins_total", "fusion_key_material_bytes_total")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name.removeprefix("fusion_").removesuffix("_total")] = float(value)
    return out


def _profile(server: BenchServer, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on the Archiver for the window: which thread holds the GIL, doing what."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists() or server.process is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([py_spy, "record", "--pid", str(server.process.pid), "--duration",
                             str(max(1, int(seconds))), "--rate", "100", "--gil", "--format",
                             "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def window(server: BenchServer, cameras_file: Path, params: Params, seconds: float,
           profile: Path | None = None) -> dict[str, Any]:
    """One load-generator run against ``server``; MB/s acknowledged inside the window."""
    assert server.process is not None
    metrics0 = _metrics(server)
    cpu0, ticks0, wall0 = _cpu_split(server.process.pid), _machine_ticks(), time.perf_counter()
    children0 = _children_cpu_seconds(server.process.pid)
    loadgen = subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", "--url", server.url, "--cameras",
         str(cameras_file), "--concurrency", str(params.concurrency), "--warmup",
         str(params.warmup), "--seconds", str(seconds),
         "--sizes", ",".join(str(s) for s in params.sizes)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    spy = None
    if profile is not None:
        time.sleep(params.warmup + 0.5)
        spy = _profile(server, seconds - 0.5, profile)
    out, err = loadgen.communicate()
    cpu1, ticks1, wall1 = _cpu_split(server.process.pid), _machine_ticks(), time.perf_counter()
    children1 = _children_cpu_seconds(server.process.pid)
    if spy is not None:
        spy.wait(60)
    # After the window's figures, not part of its cost; synced so that the file system's
    # work for the holes is done before the next window starts.
    server.free_archived_bytes()
    os.sync()
    if loadgen.returncode != 0:
        raise RuntimeError(f"bench.loadgen failed: {err.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    metrics1 = _metrics(server)
    result.update({f"{k}_in_run": metrics1[k] - metrics0.get(k, 0) for k in metrics1})
    if cpu0 is not None and cpu1 is not None:
        user, kernel = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        megabytes = result["bytes"] / MB or 1
        result["server_cpu_cores"] = (user + kernel) / (wall1 - wall0)
        # CPU per MB is robust to a noisy neighbour in a way MB/s is not.
        result["server_cpu_ms_per_mb"] = (user + kernel) * 1000 / megabytes
        result["server_user_ms_per_mb"] = user * 1000 / megabytes
        result["server_kernel_ms_per_mb"] = kernel * 1000 / megabytes
    children = sum(cpu - children0.get(pid, 0.0) for pid, cpu in children1.items())
    if children:
        result["children_cpu_cores"] = children / (wall1 - wall0)
    if ticks0 and ticks1:
        total, idle = ticks1[0] - ticks0[0], ticks1[1] - ticks0[1]
        result["machine_busy"] = 1 - idle / total if total else None
    if result["errors"]:
        # The work directory may be temporary: quote the Archiver's last error here.
        lines = server.log_path.read_text(errors="replace").splitlines()
        errors = [i for i, line in enumerate(lines) if "Traceback" in line]
        tail = "\n".join(lines[errors[-1]:][-15:]) if errors else ""
        raise RuntimeError(f"the Archiver refused segments: {result['errors']}\n{tail}")
    return result


def _describe(label: str, row: dict[str, Any]) -> str:
    mb_s = row["bytes_per_s"] / MB
    text = (f"{label:<24} {mb_s:>6.1f} MB/s {row['bytes_per_s'] / CAMERA_BYTES_PER_S:>5.0f} cams"
            f" ({row['seconds']:.0f} s) p50 ack {row['latency_p50_s'] * 1000:>5.0f} ms")
    if "server_cpu_cores" in row:
        text += (f"  server {row['server_cpu_cores']:.2f} cores, "
                 f"{row['server_cpu_ms_per_mb']:.1f} ms CPU/MB (user "
                 f"{row['server_user_ms_per_mb']:.1f}, kernel {row['server_kernel_ms_per_mb']:.1f})")
    if row.get("children_cpu_cores"):
        text += f", its chain preparation process {row['children_cpu_cores']:.2f} cores"
    if row.get("machine_busy") is not None:
        text += f", machine {row['machine_busy'] * 100:.0f} % busy"
    if row.get("key_rotations_in_run"):
        text += (f"; {row['key_rotations_in_run']:.0f} minute keys, "
                 f"{row.get('key_chains_started_in_run', 0):.0f} chains started, "
                 f"{row['wrapped_keys_in_run']:.0f} chain records, "
                 f"{row['epochs_started_in_run']:.0f} epoch openers, "
                 f"{row.get('key_material_bytes_in_run', 0) / 2**20:.2f} MiB key material")
    return text


def run(report: Report, workdir: Path, params: Params) -> dict[str, Any]:
    result = report.section("ingest", {
        "viewers": params.viewers, "key_periods_s": params.periods, "cameras": params.cameras,
        "concurrent_uploads": params.concurrency,
        "segment_sizes": f"uniform {size_label(min(params.sizes))}..{size_label(max(params.sizes))}"
                         " (incompressible)",
        "window_s": params.seconds,
        "long_window_s": f"{params.long_seconds} (>= {params.long_viewers} viewers, long periods)",
        "warmup_s": params.warmup, "camera_equivalent": "4 Mbit/s",
        "viewer_certificates": "one software RSA-2048 key, one certificate per viewer "
                               "(OAEP-SHA256 extension)"})
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"cam{i:04d}" for i in range(params.cameras)]
    most = max(params.viewers, default=0)
    started = time.perf_counter()
    pems = CertFactory().pems(0, most)
    report.line(f"{most} viewer certificates made in {time.perf_counter() - started:.1f} s")
    result["write_path"] = write_path(report, workdir / "writepath", params)
    path = result["write_path"]
    crypto = (path["aes_gcm_ms_per_mb"] + path["sha256_digest_ms_per_mb"]
              + path["ecdsa_sign_ms_per_mb"])
    result["blocks"] = [_block(report, workdir / f"period-{period}", names, pems, period, params,
                               crypto)
                        for period in params.periods]
    return result


def write_path(report: Report, workdir: Path, params: Params) -> dict[str, Any]:
    """CPU per MB of Archive.ingest_segment without HTTP (bench.writepath, own process)."""
    size = (min(params.sizes) + max(params.sizes)) // 2
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    done = subprocess.run([sys.executable, "-m", "bench.writepath", "--data", str(workdir),
                           "--segments", str(params.writepath_segments), "--size", str(size)],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    shutil.rmtree(workdir, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.writepath failed: {done.stderr.strip()[-2000:]}")
    row: dict[str, Any] = json.loads(done.stdout)
    report.line(
        f"write path without HTTP ({row['segments']} x {size_label(size)}, one thread, CPU "
        f"time): baseline {row['baseline_cpu_ms_per_mb']:.2f} ms/MB, encrypted "
        f"{row['encrypted_cpu_ms_per_mb']:.2f} ms/MB; of the difference: AES-256-GCM "
        f"{row['aes_gcm_ms_per_mb']:.2f}, SHA-256 segment digest "
        f"{row['sha256_digest_ms_per_mb']:.2f}, ECDSA manifest signature on SoftHSM "
        f"{row['ecdsa_sign_ms_per_mb']:.2f} ms/MB ({row['ecdsa_sign_ms_per_segment']:.2f} ms "
        "per segment)")
    return row


def _plan(viewers: list[int]) -> list[int | None]:
    """Window order: None is a baseline window; one between every two encrypted steps (and
    ``_block`` puts one between the windows of a step too)."""
    plan: list[int | None] = [None]
    for count in sorted(viewers):
        plan += [count, None]
    return plan


def _block(report: Report, workdir: Path, names: list[str], pems: list[str], period: int,
           params: Params, crypto_ms_per_mb: float | None = None) -> dict[str, Any]:
    """Baseline and encrypted windows for one key period, on two fresh Archivers;
    ``crypto_ms_per_mb`` gives each encrypted window its CPU-bound ratio (``_ratios``)."""
    long_period = period >= 30
    # Short periods: whole key periods per window. Long ones: the window stays inside one.
    base_seconds = (params.seconds if long_period
                    else max(period, math.ceil(params.seconds / period) * period))
    kind = ("production: windows start with the rotation burst" if long_period
            else "stress: windows of whole key periods")
    report.line(f"-- key period {period} s ({kind}) --")
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
        fingerprints: list[str] = []

        def baseline_window() -> None:
            row = window(baseline, files["baseline"], params, base_seconds,
                         _profile_path(params, period, len(rows), "baseline"))
            row["mode"] = "baseline"
            rows.append(row)
            report.line(_describe("baseline (plaintext)", row))

        for step in _plan(params.viewers):
            if step is None:
                baseline_window()
                continue
            if step > added:
                t0 = time.perf_counter()
                fingerprints += encrypted.add_viewers(pems[added:step])
                report.line(f"   authorized {step - added} more viewers through the admin API "
                            f"in {time.perf_counter() - t0:.1f} s")
                added = step
            seconds = (params.long_seconds if long_period and step >= params.long_viewers
                       else base_seconds)
            if long_period:
                _stay_inside_period(period, params.warmup + seconds + 2)
            row = window(encrypted, files["encrypted"], params, seconds,
                         _profile_path(params, period, len(rows), f"{step}-viewers"))
            row.update(mode="encrypted", viewers=step, key_period_s=period,
                       phase="after authorization change")
            rows.append(row)
            report.line(_describe(f"encrypted, {step} viewers", row))
            for k in range(params.steady):
                # Every encrypted window is compared with the baseline windows right before
                # and after it (seconds apart, in the wait for the next key period), not
                # minutes away: this machine's speed drifts.
                baseline_window()
                if long_period:  # the next key period: chains step, nothing is wrapped
                    _stay_inside_period(period, period)
                phase = "steady" if k == params.steady - 1 else f"next period {k + 1}"
                row = window(encrypted, files["encrypted"], params, seconds,
                             _profile_path(params, period, len(rows), f"{step}-{phase}"))
                row.update(mode="encrypted", viewers=step, key_period_s=period, phase=phase)
                rows.append(row)
                report.line(_describe(f"  {phase}, {step} viewers", row))
            if params.revoke and step == max(params.viewers) and fingerprints:
                baseline_window()
                _revocation(report, encrypted, files["encrypted"], params, period, step,
                            seconds, fingerprints[0], rows, baseline_window)
        _ratios(rows, crypto_ms_per_mb)
        for row in rows:
            if row["mode"] != "encrypted":
                continue
            text = (f"   {row['viewers']:>5} viewers ({row.get('phase', '')}): ratio "
                    f"{row['ratio']:.3f} to the baseline "
                    f"windows around it; CPU per MB {row.get('cpu_ratio', float('nan')):.2f}x "
                    "the baseline's")
            if "cpu_bound_ratio" in row:
                text += f"; {row['cpu_bound_ratio']:.3f} if CPU-bound, with only the crypto added"
            report.line(text)
        return {"key_period_s": period, "windows": rows}
    finally:
        encrypted.stop()
        baseline.stop()
        # The archives are tens of GB of test data: do not leave them behind.
        for server in (baseline, encrypted):
            shutil.rmtree(server.data_dir, ignore_errors=True)


def _revocation(report: Report, server: BenchServer, cameras_file: Path, params: Params,
                period: int, viewers: int, seconds: float, fingerprint: str,
                rows: list[dict[str, Any]], baseline_window: Callable[[], None]) -> None:
    """One viewer revoked on every camera (issue 23): a window in the revocation's key period
    (the cameras keep their key while the next chains are prepared), then the next ones, a
    baseline window between each two."""
    _stay_inside_period(period, params.warmup + seconds + 2)
    t0 = time.perf_counter()
    server.revoke(fingerprint)
    report.line(f"   revoked one of {viewers} viewers (all cameras) in "
                f"{time.perf_counter() - t0:.2f} s")
    row = window(server, cameras_file, params, seconds,
                 _profile_path(params, period, len(rows), "revocation-same-period"))
    row.update(mode="encrypted", viewers=viewers - 1, key_period_s=period,
               phase="revocation, same period")
    rows.append(row)
    report.line(_describe(f"  revocation, same period, {viewers - 1} viewers", row))
    for k in range(params.steady):
        baseline_window()
        _stay_inside_period(period, period)
        phase = f"revocation, next period {k + 1}"
        row = window(server, cameras_file, params, seconds,
                     _profile_path(params, period, len(rows), f"revocation-next-{k + 1}"))
        row.update(mode="encrypted", viewers=viewers - 1, key_period_s=period, phase=phase)
        rows.append(row)
        report.line(_describe(f"  {phase}, {viewers - 1} viewers", row))


def _profile_path(params: Params, period: int, index: int, what: str) -> Path | None:
    """Where the py-spy profile of window ``index`` goes (None: no profiles asked for)."""
    if params.profile_dir is None:
        return None
    return params.profile_dir / f"period{period}-{index:02d}-{what.replace(' ', '-')}.txt"


def _stay_inside_period(period: int, needed_s: float) -> None:
    """Wait for the next key-period boundary (the Archiver uses the wall clock) if the window
    would cross it: it would add a second rotation burst."""
    remaining = period - (time.time() % period)
    if remaining < needed_s:
        time.sleep(remaining + 0.2)


def _machine_ms_per_mb(row: dict[str, Any]) -> float | None:
    """CPU of the whole machine (every process) per MB archived in a window."""
    if row.get("machine_busy") is None or not row["bytes_per_s"]:
        return None
    return row["machine_busy"] * (os.cpu_count() or 1) * 1000 / (row["bytes_per_s"] / MB)


def _ratios(rows: list[dict[str, Any]], crypto_ms_per_mb: float | None = None) -> None:
    """Each encrypted window against the mean of the nearest baseline window before and after.

    ``crypto_ms_per_mb``: the CPU per MB of what encryption cannot skip (AES-256-GCM, the
    SHA-256 digest the signed manifest carries, the signature), measured in one thread in the
    same run (``write_path``). With it, each window also gets its *CPU-bound ratio*: the ratio
    to expect if the machine's CPU were all that limits and encryption added nothing else, i.e.
    the baselines' machine CPU per MB over that plus the crypto's. A machine that is not
    saturated (16 uploads in flight wait on fsync too) can read above it."""
    for i, row in enumerate(rows):
        if row["mode"] != "encrypted":
            continue
        before = next((r for r in reversed(rows[:i]) if r["mode"] == "baseline"), None)
        after = next((r for r in rows[i + 1:] if r["mode"] == "baseline"), None)
        around = [r for r in (before, after) if r is not None]
        base = sum(r["bytes_per_s"] for r in around) / len(around)
        row["baseline_bytes_per_s"] = base
        row["ratio"] = row["bytes_per_s"] / base
        cpu = [r["server_cpu_ms_per_mb"] for r in around if "server_cpu_ms_per_mb" in r]
        if cpu and "server_cpu_ms_per_mb" in row:
            row["cpu_ratio"] = row["server_cpu_ms_per_mb"] / (sum(cpu) / len(cpu))
        machine = [m for m in map(_machine_ms_per_mb, around) if m is not None]
        if machine and crypto_ms_per_mb is not None:
            base_ms = sum(machine) / len(machine)
            row["cpu_bound_ratio"] = base_ms / (base_ms + crypto_ms_per_mb)


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per key period and viewer count: MB/s, camera-equivalents and ratios (for the plot)."""
    out = []
    for block in result.get("blocks", []):
        baselines = [w["bytes_per_s"] for w in block["windows"] if w["mode"] == "baseline"]
        base = sum(baselines) / len(baselines)
        for w in block["windows"]:
            if w["mode"] != "encrypted":
                continue
            row = {"key_period_s": block["key_period_s"], "viewers": w["viewers"],
                   "phase": w.get("phase", ""),
                   "mb_s": w["bytes_per_s"] / MB, "cameras": w["bytes_per_s"] / CAMERA_BYTES_PER_S,
                   "ratio": w["ratio"], "baseline_mb_s": base / MB,
                   "baseline_cameras": base / CAMERA_BYTES_PER_S}
            if "cpu_bound_ratio" in w:
                row["cpu_bound_ratio"] = w["cpu_bound_ratio"]
            out.append(row)
    return out
