"""Raw limits of the machine, measured in the same run as the Archiver: AES-256-GCM of
``cryptography`` on one core, SHA-256 (the manifest's segment digest) on one core, and the
disk's sequential write rate with an fsync after every segment (what the Archiver does before it
acknowledges one), with one writer and with several writers on separate files."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import core
from bench.common import MiB, Report, size_label


def aes_gcm(size: int, seconds: float) -> dict[str, float]:
    """MiB/s of AESGCM.encrypt and .decrypt on one core (best of alternating rounds)."""
    aead = AESGCM(AESGCM.generate_key(256))
    nonce, ad = bytes(12), b"segment ad of realistic length: camera, seq, time, key id"
    data = os.urandom(size)
    sealed = aead.encrypt(nonce, data, ad)
    encrypt, decrypt = core.best_of(lambda: aead.encrypt(nonce, data, ad),
                                           lambda: aead.decrypt(nonce, sealed, ad), size, seconds)
    return {"encrypt_mib_s": encrypt, "decrypt_mib_s": decrypt}


def sha256(size: int, seconds: float) -> float:
    data = os.urandom(size)
    def digest() -> bytes:
        return hashlib.sha256(data).digest()

    # best_of sizes its rounds by the second callable: time the same one twice.
    first, second = core.best_of(digest, digest, size, seconds)
    return max(first, second)


def disk_write(directory: Path, size: int, seconds: float, writers: int = 1) -> float:
    """MiB/s of appending ``size``-byte blocks, each followed by fsync, from ``writers``
    threads on separate files (the Archiver appends to one file per camera)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    totals = [0] * writers
    deadline = time.perf_counter() + seconds

    def writer(index: int) -> None:
        path = directory / f"disk-{size}-{writers}-{index}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        try:
            while time.perf_counter() < deadline:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                totals[index] += size
        finally:
            os.close(fd)
            path.unlink()

    start = time.perf_counter()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(totals) / MiB / (time.perf_counter() - start)


def run(report: Report, workdir: Path, sizes: list[int], seconds: float,
        writers: int = 4) -> dict[str, Any]:
    result = report.section("raw", {"sizes": [size_label(s) for s in sizes],
                                    "seconds_per_figure": seconds, "disk_writers": [1, writers],
                                    "disk_dir": "the benchmark work directory"})
    rows = []
    report.line(f"{'segment':>8} {'AES-GCM enc':>12} {'AES-GCM dec':>12} {'SHA-256':>9} "
                f"{'disk 1 writer':>14} {f'disk {writers} writers':>15}   (MiB/s)")
    for size in sizes:
        row: dict[str, Any] = {"size": size, **aes_gcm(size, seconds),
                               "sha256_mib_s": sha256(size, seconds / 2),
                               "disk_1_mib_s": disk_write(workdir, size, seconds),
                               f"disk_{writers}_mib_s": disk_write(workdir, size, seconds,
                                                                   writers)}
        rows.append(row)
        report.line(f"{size_label(size):>8} {row['encrypt_mib_s']:>12.0f} "
                    f"{row['decrypt_mib_s']:>12.0f} {row['sha256_mib_s']:>9.0f} "
                    f"{row['disk_1_mib_s']:>14.0f} {row[f'disk_{writers}_mib_s']:>15.0f}")
    result["rows"] = rows
    result["disk_writers"] = writers
    return result
