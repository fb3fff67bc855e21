"""Revocation at scale (issue 23): one viewer revoked on every camera, C cameras x V viewers.

Drives the Archiver's own ``KeyManager`` in process, as bench/rotation.py does (a real SQLite
index with synchronous=FULL, the key journal appended and fsynced, signed chain recipients, an
injected clock). Minute 0 is a UTC day's start (every camera starts a chain for every viewer).

* **synchronous** (what a revocation did before issue 23, and what any other authorization
  change still does): ``authorization_changed`` drops every camera's chain; each camera's next
  segment (minute 1) starts a new chain and wraps it for every viewer before it is sealed. The
  time those segments wait is the "foreground" time: ingest stands still for it.
* **prepared** (``access_removed``, when the KeyManager has it): 20 s into minute 2, the cameras
  keep their current key for the rest of the period while a background thread prepares every
  camera's next chain; a segment of each camera after the change (minute 2) and the first one
  of minute 3 (the switch) are timed in the foreground, the thread's work separately.
  Where the KeyManager can wrap in its chain preparation process (archiver.chain_worker), this
  is done twice in one run: wrapped in the preparing thread (minute 2), then in the process
  (another viewer revoked at minute 4).
* **next day** (when the KeyManager prepares the next UTC day's chains before midnight):
  each camera's first segment in the last minutes of the day sets the preparation off; the
  wait is timed as above, then the first segments after midnight (the switch). The day's start
  at minute 0, where every camera wraps its first chain on its own first segment, is the
  figure without it, in the same run.
* **day starts only** (``--day-starts``): every camera's first chain of a day wrapped in the
  Archiver's interpreter (the path before chain starts went to the preparation process), then
  the same in a fresh KeyManager on the same index (an Archiver's restart: its chains wrapped
  by the process), then the next day's chains prepared before midnight; the ingest probe runs
  through each.
* **ingest probe**: while each preparation runs, a thread of this process does an ingest-like
  mix (a 64 KiB segment sealed with AES-GCM and hashed, plus some Python per segment) as fast as
  it can; its rate during the preparation is compared with its rate alone just before (same
  run, same length): how much of the process the preparation leaves to ingest.

Runs against any checkout: ``PYTHONPATH=<checkout> python -m bench.revocation`` from a copy of
this file measures that checkout's KeyManager (only the synchronous path if it predates
issue 23). CPU is the whole process's (all threads); wall is the foreground's unless stated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
from archiver.keying import KeyManager
from bench.common import CertFactory, in_workdir
from keyservice.certs import build_archiver_certificate
from keyservice.crypto import KeyChain, seal_segment
from keyservice.format import DataStream, encode_record
from keyservice.identity import SoftwareSigner, fingerprint

T0_MS = 1_748_822_400_000  # 2025-06-02T00:00:00Z, a UTC day's start
PERIOD_S = 60
MINUTE_MS = PERIOD_S * 1000


def _first_segments(keys: KeyManager, names: list[str], now_ms: int) -> dict[str, float]:
    """Each camera's first segment of a period asks for its key; the longest and total wait."""
    waits = []
    cpu0 = time.process_time()
    for offset, camera in enumerate(names):
        t0 = time.perf_counter()
        keys.key_for(camera, DataStream.VIDEO, now_ms + offset)
        waits.append(time.perf_counter() - t0)
    return {"foreground_wall_s": sum(waits), "longest_wait_s": max(waits),
            "cpu_s": time.process_time() - cpu0}


class _Probe:
    """A thread doing an ingest-like mix as fast as it can while ``running`` is set."""

    def __init__(self) -> None:
        chain, _ = KeyChain.start("probe", DataStream.VIDEO, PERIOD_S, T0_MS)
        self._key = chain.key_at(T0_MS)
        self._payload = os.urandom(64 * 1024)
        self.count = 0
        self.thread_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        cpu0 = time.thread_time()
        seq = 0
        while not self._stop.is_set():
            segment = seal_segment(self._key, seq, T0_MS + seq, self._payload)
            encode_record(segment)
            # Python work per segment, as the HTTP handler and the index row are
            _ = sorted({str(i): i * seq for i in range(300)}.items())
            seq += 1
            self.count = seq
        self.thread_cpu_s = time.thread_time() - cpu0

    # --no-probe: a pure-Python thread that wants the interpreter all the time queues every
    # lock hand-over of the code measured behind it (at 10 000 viewers the figures then say
    # more about that queue than about the code; the live benchmark has real ingest threads).
    enabled = True

    def __enter__(self) -> _Probe:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()


def _probe_alone(seconds: float) -> float:
    """Probe segments per second with nothing else running here (0 without the probe)."""
    if not _Probe.enabled:
        return 0.0
    with _Probe() as probe:
        time.sleep(seconds)
        count = probe.count
    return count / seconds


def _ratio(during: float, alone: float) -> float | None:
    return during / alone if alone else None


def _probed(result: dict[str, Any]) -> str:
    ratio = result["probe_ratio"]
    return "no ingest probe" if ratio is None else f"ingest probe {ratio:.2f} of its rate alone"


def _child_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _prepared(keys: KeyManager, directory: Any, db: Database, names: list[str], fp: str,
              minute: int, clock_ms: list[int]) -> dict[str, Any]:
    """One revocation prepared off the ingest path, 20 s into ``minute``; the switch at the
    next one. Returns the figures (and prints them)."""
    cameras = len(names)
    _first_segments(keys, names, T0_MS + minute * MINUTE_MS + 500)
    now = T0_MS + minute * MINUTE_MS + 20_000
    clock_ms[0] = now
    records0 = keys.key_records_written
    prepared0 = keys.chains_prepared
    worker = getattr(keys, "chain_worker", None)
    alone_s = 5.0
    alone = _probe_alone(alone_s)
    _revoke(directory, db, fp, now - 100)
    child0 = _child_cpu_s(worker.pid if worker is not None else None)
    with _Probe() as probe:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        keys.access_removed(fp, None, now)
        during = _first_segments(keys, names, now + 200)
        while keys.chains_prepared < prepared0 + cameras:  # the background thread's work
            time.sleep(0.01)
        prepared_wall = time.perf_counter() - wall0
        probe_count = probe.count
    process_cpu = time.process_time() - cpu0 - probe.thread_cpu_s
    parts = dict(getattr(keys, "prepare_cpu_s", {}))
    child_cpu = _child_cpu_s(worker.pid if worker is not None else None) - child0
    switch = _first_segments(keys, names, T0_MS + (minute + 1) * MINUTE_MS + 500)
    result = {
        "where": "process" if worker is not None else "thread",
        "records": keys.key_records_written - records0,
        "during_period": during, "preparation_wall_s": prepared_wall,
        "preparation_cpu_s": process_cpu + child_cpu,
        "archiver_process_cpu_s": process_cpu, "child_cpu_s": child_cpu,
        "core_share_of_period": process_cpu / PERIOD_S, "switch": switch,
        "probe_alone_per_s": alone, "probe_during_per_s": probe_count / prepared_wall,
        "probe_ratio": _ratio(probe_count / prepared_wall, alone),
        "pending_after_switch": keys.pending_chains(),
        "archiver_thread_cpu_by_part_s": parts}
    print(f"prepared revocation ({result['where']}): {result['records']} chain records in "
          f"{prepared_wall:.2f} s; CPU {process_cpu:.2f} s in the Archiver's process "
          f"({process_cpu / PERIOD_S * 100:.0f} % of one core over the {PERIOD_S} s period) + "
          f"{child_cpu:.2f} s in the preparation process; {_probed(result)}; first "
          f"segments in the change's period waited {during['foreground_wall_s']:.3f} s in all "
          f"(longest {during['longest_wait_s'] * 1000:.1f} ms); at the switch "
          f"{switch['foreground_wall_s']:.3f} s in all (longest "
          f"{switch['longest_wait_s'] * 1000:.1f} ms)", flush=True)
    if result["where"] == "process" and parts:
        print("  the preparing thread's CPU in the Archiver's process, by part: " + ", ".join(
            f"{name} {cpu:.2f} s" for name, cpu in parts.items()), flush=True)
    return result


def _next_day(keys: KeyManager, names: list[str], clock_ms: list[int]) -> dict[str, Any]:
    """The next day's chains, prepared before its midnight; the switch after it."""
    from archiver.keying import NEXT_DAY_LEAD_MS
    midnight = T0_MS + 86_400_000
    now = midnight - NEXT_DAY_LEAD_MS + 500
    clock_ms[0] = now
    records0, prepared0 = keys.key_records_written, keys.chains_prepared
    worker = keys.chain_worker
    assert worker is not None
    _first_segments(keys, names, now - MINUTE_MS)  # every camera active, not due yet
    alone = _probe_alone(5.0)
    child0 = _child_cpu_s(worker.pid)
    with _Probe() as probe:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        before = _first_segments(keys, names, now)  # the first of them sets it off
        while keys.chains_prepared < prepared0 + len(names):
            time.sleep(0.01)
        prepared_wall = time.perf_counter() - wall0
        probe_count = probe.count
    process_cpu = time.process_time() - cpu0 - probe.thread_cpu_s
    child_cpu = _child_cpu_s(worker.pid) - child0
    clock_ms[0] = midnight + 500
    started0 = keys.chains_started
    switch = _first_segments(keys, names, midnight + 500)
    result = {
        "records": keys.key_records_written - records0, "before_midnight": before,
        "preparation_wall_s": prepared_wall, "archiver_process_cpu_s": process_cpu,
        "child_cpu_s": child_cpu, "probe_ratio": _ratio(probe_count / prepared_wall, alone),
        "switch": switch, "chains_started_at_switch": keys.chains_started - started0}
    print(f"next day prepared before midnight: {result['records']} chain records in "
          f"{prepared_wall:.2f} s; CPU {process_cpu:.2f} s in the Archiver's process + "
          f"{child_cpu:.2f} s in the preparation process; {_probed(result)}; segments "
          f"before midnight waited "
          f"{before['foreground_wall_s']:.3f} s in all; after midnight (the switch) "
          f"{switch['foreground_wall_s']:.3f} s in all (longest "
          f"{switch['longest_wait_s'] * 1000:.1f} ms), CPU {switch['cpu_s']:.2f} s, "
          f"{result['chains_started_at_switch']} chains started there", flush=True)
    return result


def _first_chains(keys: KeyManager, names: list[str], now_ms: int, where: str
                  ) -> dict[str, Any]:
    """Every camera's first chain, on its first segment, all cameras at once (one thread
    each, as the Archiver's request threads), the ingest probe running."""
    worker = keys.chain_worker
    alone = _probe_alone(5.0)
    records0 = keys.key_records_written
    child0 = _child_cpu_s(worker.pid if worker is not None else None)
    with _Probe() as probe, ThreadPoolExecutor(len(names)) as pool:
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        waits = list(pool.map(lambda camera: _first_segments(keys, [camera], now_ms), names))
        segments = {"longest_wait_s": max(w["longest_wait_s"] for w in waits),
                    "cpu_s": time.process_time() - cpu0}
        wall = time.perf_counter() - wall0
        probe_count = probe.count
    child_cpu = _child_cpu_s(worker.pid if worker is not None else None) - child0
    result = segments | {
        "where": where, "records": keys.key_records_written - records0, "wall_s": wall,
        "archiver_process_cpu_s": segments["cpu_s"] - probe.thread_cpu_s,
        "child_cpu_s": child_cpu, "probe_ratio": _ratio(probe_count / wall, alone)}
    print(f"first chains {where}: {result['records']} chain records in {wall:.2f} s "
          f"(the longest wait {segments['longest_wait_s']:.2f} s); CPU "
          f"{result['archiver_process_cpu_s']:.2f} s in the Archiver's process + "
          f"{child_cpu:.2f} s in the preparation process; {_probed(result)}", flush=True)
    return result


def _synchronous(keys: KeyManager, directory: Any, db: Database, names: list[str], fp: str,
                 now: int, result: dict[str, Any]) -> None:
    """The synchronous path: every camera's first segment after the change wraps its chain."""
    records0 = keys.key_records_written
    _revoke(directory, db, fp, now - 100)
    keys.authorization_changed(fp, None)
    sync = _first_segments(keys, names, now)
    sync["records"] = keys.key_records_written - records0
    result["synchronous"] = sync
    print(f"synchronous revocation: {sync['records']} chain records; segments waited "
          f"{sync['foreground_wall_s']:.2f} s in all (longest {sync['longest_wait_s']:.2f} "
          f"s), CPU {sync['cpu_s']:.2f} s", flush=True)


def _directory(db: Database, workdir: Path) -> Any:
    """Where the viewers are: the site directory (beside the index), or, in a checkout from
    before it, the index itself."""
    try:
        from archiver.directory import open_directory
    except ImportError:
        return db
    return open_directory(None, workdir)


def _revoke(directory: Any, db: Database, fp: str, now_ms: int) -> None:
    if directory is db:  # a checkout before the site directory
        db.revoke_viewer(fp, now_ms, delete_key_streams=False)  # type: ignore[attr-defined]
    else:
        directory.revoke_viewer(fp, now_ms)


def run(workdir: Path, cameras: int, viewers: int, synchronous: bool = True,
        day_starts: bool = False) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    db = Database(workdir / "revocation.sqlite3")
    directory: Any = _directory(db, workdir)
    journal_fd = os.open(workdir / "keys.fsk", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def journal(camera: str, now_ms: int, records: list[bytes]) -> None:
        os.write(journal_fd, b"".join(records))
        os.fsync(journal_fd)

    clock_ms = [T0_MS]
    result: dict[str, Any] = {"cameras": cameras, "viewers": viewers, "key_period_s": PERIOD_S}
    try:
        factory = CertFactory()
        fps = []
        for i in range(viewers):
            cert = factory.certificate(i)
            fps.append(fingerprint(cert).hex())
            directory.add_viewer(fps[-1], cert.public_bytes(Encoding.DER),
                                 cert.subject.rfc4514_string(), int(factory.oaep_hash), None,
                                 T0_MS)
        signing_key = ec.generate_private_key(ec.SECP256R1())
        signer = SoftwareSigner(build_archiver_certificate(
            signing_key, "bench archiver", now=dt.datetime.now(dt.UTC)), signing_key)
        try:
            keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal,  # type: ignore[call-arg]
                              clock=lambda: clock_ms[0],
                              **({} if directory is db else {"directory": directory}))
        except TypeError:  # a checkout before issue 23
            keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal)
        names = [f"cam{i:04d}" for i in range(cameras)]
        clock_ms[0] = T0_MS + 500
        if day_starts:
            worker, keys.chain_worker = keys.chain_worker, None
            result["in_the_interpreter"] = _first_chains(keys, names, T0_MS + 500,
                                                         "in the Archiver's interpreter")
            keys.chain_worker = worker
            keys.close()
            clock_ms[0] = T0_MS + MINUTE_MS + 500
            keys = KeyManager(db, PERIOD_S, signer=signer, journal=journal,
                              clock=lambda: clock_ms[0], directory=directory)
            result["restart"] = _first_chains(keys, names, T0_MS + MINUTE_MS + 500,
                                              "after a restart, in the preparation process")
            result["next_day"] = _next_day(keys, names, clock_ms)
            keys.close()
            return result
        day = _first_segments(keys, names, T0_MS + 500)
        result["day_start"] = day | {"records": keys.key_records_written}
        print(f"day start (on the cameras' first segments): {keys.key_records_written} chain "
              f"records; segments waited {day['foreground_wall_s']:.2f} s in all (longest "
              f"{day['longest_wait_s']:.2f} s), CPU {day['cpu_s']:.1f} s", flush=True)

        # Synchronous: every camera's first segment after the change wraps its new chain.
        now = T0_MS + MINUTE_MS + 500
        if not synchronous:  # the chains only step (revoking nobody at minute 1)
            _first_segments(keys, names, now)
        else:
            _synchronous(keys, directory, db, names, fps[0], now, result)

        if hasattr(keys, "access_removed"):
            worker = getattr(keys, "chain_worker", None)
            if worker is not None:  # first in the preparing thread, then in the process
                keys.chain_worker = None
                result["prepared_thread"] = _prepared(keys, directory, db, names, fps[1], 2,
                                                      clock_ms)
                keys.chain_worker = worker
                result["prepared"] = _prepared(keys, directory, db, names, fps[2], 4,
                                               clock_ms)
                if hasattr(keys, "_next_day_todo"):
                    result["next_day"] = _next_day(keys, names, clock_ms)
            else:
                result["prepared"] = _prepared(keys, directory, db, names, fps[1], 2,
                                               clock_ms)
        return result
    finally:
        os.close(journal_fd)
        if directory is not db:
            directory.close()
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__)
    parser.add_argument("--size", default="100x10000", help="CAMERASxVIEWERS")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--no-synchronous", action="store_true",
                        help="skip the synchronous path (minute 1: the chains only step)")
    parser.add_argument("--no-probe", action="store_true",
                        help="no ingest probe thread beside the code measured")
    parser.add_argument("--day-starts", action="store_true",
                        help="only every camera's first chains: in the interpreter, after a "
                             "restart, and prepared before midnight")
    args = parser.parse_args(argv)
    cameras, viewers = (int(x) for x in args.size.lower().split("x"))
    _Probe.enabled = not args.no_probe
    in_workdir("bench-revocation-", lambda workdir: run(
        workdir, cameras, viewers, synchronous=not args.no_synchronous,
        day_starts=args.day_starts), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
