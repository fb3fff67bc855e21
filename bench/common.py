"""Shared pieces of the benchmarks: the machine line, result collection, viewer certificates,
and a real Archiver (uvicorn in a subprocess, started by ``bench.server``)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from keyservice import bench as core_bench
from keyservice.certs import build_viewer_certificate, certificate_pem
from keyservice.identity import OaepHash

MiB = 2**20
MB = 10**6
# A camera-equivalent: one camera streaming at 4 Mbit/s (the unit).
CAMERA_BYTES_PER_S = 4_000_000 / 8
REPO_ROOT = Path(__file__).resolve().parents[1]


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
        "summary": core_bench.machine(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def machine_line() -> str:
    info = machine_info()
    return (f"machine: {info['cpu']}, {info['cores']} cores; {info['summary']}; "
            f"load average {info['loadavg_at_start'][0]}")


# --- results ------------------------------------------------------------------------------
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

    oaep_hash: OaepHash = OaepHash.SHA256
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
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class BenchServer:
    """``python -m bench.server`` in a subprocess on 127.0.0.1 (uvicorn, as `serve` runs it)."""

    data_dir: Path
    key_period_s: int = 60
    plaintext_baseline: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    def start(self, timeout: float = 60) -> BenchServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The Archiver makes its own SoftHSM signing token in its data directory (the
        # production default), so it must not inherit the benchmark's SoftHSM configuration.
        env = {k: v for k, v in (self.env or os.environ).items()
               if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
        args = [sys.executable, "-m", "bench.server", "--data", str(self.data_dir),
                "--port", str(self.port), "--key-period", str(self.key_period_s)]
        if self.plaintext_baseline:
            args.append("--plaintext-baseline")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=REPO_ROOT)
        if not wait_until_healthy(self.process, self.url, timeout):
            self.stop()
            raise RuntimeError(f"the Archiver did not start within {timeout:.0f} s; "
                               f"see {self.log_path}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def admin(self, method: str, path: str, body: Any = None, client: httpx.Client | None = None
              ) -> Any:
        http = client or httpx
        response = http.request(method, self.url + path, json=body, timeout=60,
                                headers={"Authorization": f"Bearer {self.admin_token}"})
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None

    def add_cameras(self, names: Sequence[str]) -> dict[str, str]:
        """name -> ingest token."""
        with httpx.Client() as client:
            return {name: self.admin("POST", "/v1/admin/cameras", {"name": name},
                                     client)["ingest_token"] for name in names}

    def add_viewers(self, pems: Sequence[str], workers: int = 4) -> list[str]:
        """Authorize each certificate on all cameras through the admin API; fingerprints."""
        def add(chunk: Sequence[str]) -> list[str]:
            with httpx.Client() as client:
                return [self.admin("POST", "/v1/admin/viewers",
                                   {"certificate": pem, "cameras": "all"}, client)["fingerprint"]
                        for pem in chunk]

        chunks = [pems[i::workers] for i in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            return [fp for part in pool.map(add, chunks) for fp in part]


def wait_until_healthy(process: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """Wait for a started Archiver to answer /healthz: True when it does, False on timeout;
    RuntimeError if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the Archiver exited at start; see its log")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False
