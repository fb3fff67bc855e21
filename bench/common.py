"""Shared pieces of the benchmarks: the machine line, result collection, viewer certificates,
and a real Archiver (uvicorn in a subprocess, started by ``bench.server``)."""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from archiver.admin_client import viewer_batches
from bench import core
from fusion_testkit.server import ArchiverServer
from keyservice.certs import build_viewer_certificate, certificate_pem
from keyservice.keyscheme import KeyScheme

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: benchmarks find launchers by it
MiB = 2**20
MB = 10**6
# A camera-equivalent: one camera streaming at 4 Mbit/s (the unit).
CAMERA_BYTES_PER_S = 4_000_000 / 8


# --- the machine --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "summary": core.machine(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def machine_line() -> str:
    info = machine_info()
    return (f"machine: {info['cpu']}, {info['cores']} cores; {info['summary']}; "
            f"load average {info['loadavg_at_start'][0]}")


# --- results ------------------------------------------------------------------------------
def write_results(path: Path | None, results: list[Any]) -> None:
    """The benchmark's rows as JSON, with the machine they were measured on (no-op: None)."""
    if path is not None:
        path.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2))


def run_bench(module: str, doc: str | None, defaults: Any,
              run: Callable[[Report, Path, Any], object], argv: list[str] | None) -> int:
    """The command line of ``python -m bench.MODULE``: one flag per field of the ``defaults``
    dataclass (a bool is a switch) and ``--json FILE``; ``run(report, workdir, options)`` in a
    temporary directory, removed afterwards."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}",
                                     description=(doc or "").split("\n\n")[0])
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args(argv)
    opts = type(defaults)(**{k: getattr(args, k) for k in vars(defaults)})
    report = Report()
    report.data["command"] = f"python -m bench.{module} " + " ".join(
        sys.argv[1:] if argv is None else argv)

    def work(workdir: Path) -> dict[str, Any]:
        run(report, workdir, opts)
        return report.data

    in_workdir(f"bench-{module}-", work, args.json)
    return 0


def in_workdir(prefix: str, work: Callable[[Path], Any], json_path: Path | None) -> None:
    """``work(workdir)`` in a temporary directory, removed afterwards (a benchmark writes
    gigabytes there); its result as JSON to ``json_path`` (if given)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        result = work(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str))


class Report:
    """Prints as it goes and keeps every figure for the JSON results file."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {
            "machine": machine_info(),
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def section(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        print(f"\n== {name} ==", flush=True)
        print(machine_line(), flush=True)
        print("parameters: " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()), flush=True)
        self.data[name] = {"parameters": params}
        return self.data[name]

    @staticmethod
    def line(text: str) -> None:
        print(text, flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def size_label(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else float("nan")


def parse_sizes(text: str) -> list[int]:
    """'1M,2M,4M' or '262144,1048576' -> byte counts (K and M are binary)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        scale = {"K": 1024, "M": MiB}.get(part[-1], 1)
        number = part[:-1] if scale != 1 else part
        sizes.append(int(float(number) * scale))
    if not sizes or min(sizes) <= 0:
        raise ValueError("Give segment sizes like 1M,2M,4M.")
    return sizes


def parse_ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


# --- viewer certificates (public parts only: the Archiver needs nothing else) ---------------
@dataclass
class CertFactory:
    """One RSA key made in software, many certificates for it. Different subjects and serials
    give different fingerprints, so the Archiver sees distinct viewers; it only ever encrypts to
    public keys, so sharing one key pair changes nothing it does (and saves minutes of key
    generation). Each carries the OAEP-hash extension of keyservice.certs, as enrolment makes."""

    oaep_hash: KeyScheme = KeyScheme.RSA_OAEP_SHA256
    bits: int = 2048
    key: rsa.RSAPrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(65537, self.bits)

    def certificate(self, index: int) -> x509.Certificate:
        return build_viewer_certificate(self.key, f"bench-viewer-{index:05d}",
                                        oaep_hash=self.oaep_hash, now=dt.datetime.now(dt.UTC),
                                        days=2, serial=1000 + index)

    def pems(self, start: int, stop: int) -> list[str]:
        return [certificate_pem(self.certificate(i)).decode() for i in range(start, stop)]


# --- a real Archiver ----------------------------------------------------------------------
@dataclass
class BenchServer(ArchiverServer):
    """``python -m bench.server`` in a subprocess on 127.0.0.1 (uvicorn, as `serve` runs it),
    which can also run the plaintext baseline; fusion_testkit.server does the rest."""

    key_period_s: int = 60
    plaintext_baseline: bool = False
    start_timeout_s: float = 60
    stop_timeout_s: float = 20
    cwd: Path | None = REPO_ROOT  # bench is not installed: -m bench.server runs from the checkout

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "bench.server", "--data", str(self.data_dir),
                "--port", str(self.port), "--key-period", str(self.key_period_s)]
        return [*args, "--plaintext-baseline"] if self.plaintext_baseline else args

    def add_cameras(self, names: Sequence[str]) -> dict[str, str]:
        """name -> ingest token."""
        with httpx.Client(timeout=60) as client:
            return {name: self.add_camera(name, client) for name in names}

    def add_viewers(self, pems: Sequence[str]) -> list[str]:
        """Authorize each certificate on all cameras through the admin API's batch enrolment
        (batches cut as ``fusion-archiver viewers add`` cuts them); fingerprints."""
        fingerprints: list[str] = []
        with httpx.Client(timeout=300) as client:
            for batch in viewer_batches(pems, "all"):
                answer = self.admin("POST", "/v1/admin/viewers/batch", {"viewers": [
                    {"certificate": pem, "cameras": "all"} for pem in batch]},
                    expect=201, client=client)
                fingerprints += [viewer["fingerprint"] for viewer in answer]
        return fingerprints

    def free_archived_bytes(self) -> int:
        """Give the disk back the archive files' bytes between two windows, keeping every
        file's size and offsets (a hole: the Archiver appends and fsyncs as before; nothing
        reads these files back in a capacity run). A run at ~370 MB/s would otherwise fill
        the disk in a few minutes. Returns the bytes freed."""
        freed = 0
        for path in self.data_dir.rglob("*.fsa"):
            fd = os.open(path, os.O_WRONLY)
            try:
                size = os.fstat(fd).st_size
                if _LIBC.fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, 0, size) != 0:
                    raise OSError(ctypes.get_errno(), f"could not punch a hole in {path}")
                freed += size
            finally:
                os.close(fd)
        return freed


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h
