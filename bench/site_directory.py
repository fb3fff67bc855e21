"""The site directory (issue 21): PostgreSQL against SQLite, measured in one run.

    python -m bench.site_directory [--viewers 10000] [--json FILE]

Three parts, each alternating the two backends so that a shared machine's noise hits both:

1. **In process**: the Directory calls the Archiver makes (archiver/directory/store.py), with
   ``--viewers`` viewers and ``--cameras`` cameras in the directory: a login's (the
   challenge's ``viewer(fp)``), a camera list's (``viewer(fp)`` + ``cameras()``), a segment's
   (``camera(name)``, its token check), the KeyManager's reload after an authorization change
   (``viewers()``: every viewer), and the writes of an authorization (``add_viewer``) and a
   revocation (``revoke_viewer``). Wall time per call (median, p95); the Archiver process's CPU
   per call; for PostgreSQL also the server's CPU per call (every process of the cluster,
   background workers included: a conservative figure), hence calls per PostgreSQL core-second.
2. **Over HTTPS**: two real Archivers (``fusion-archiver serve`` under a site CA), one a
   member of the site (``--directory postgresql://...``, the database of part 1), one
   standalone (the SQLite data directory of part 1): a real SoftHSM viewer's login (challenge
   decrypted on the token, a new TLS connection each time, as a client's first call) and
   ``GET /v1/cameras`` on a kept session.
3. **Ingest CPU**: two Archivers over HTTP, site (a fresh PostgreSQL database) and standalone,
   the same load generator as bench/ingest.py (incompressible segments, closed loop, each
   acknowledged after fsync), windows alternating; Archiver CPU per MB, and PostgreSQL's.

Then the capacity on paper, from these figures (printed, and in the JSON).
PostgreSQL is a throwaway cluster of fusion_testkit/postgres.py (fsync=off: the data is
throwaway; the figures are latency and CPU of queries, not of commits to disk).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import insert

from archiver.db import Database
from archiver.directory import Directory, open_directory
from archiver.directory import schema as t
from bench.common import MB, BenchServer, CertFactory, MiB, Report, median, percentile, run_bench
from bench.ingest import Params, window
from fusion_testkit.pki import SiteCa
from fusion_testkit.postgres import PostgresCluster
from fusion_testkit.server import ArchiverServer, production_archiver
from fusion_testkit.tokens import EnrolledViewer, SoftHsmStore
from fusion_testkit.viewer import login
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme

BACKENDS = ("postgresql", "sqlite")
# Generous per-client limits: the benchmark logs one viewer in hundreds of times from one
# address, which the production limits (issue 12) would refuse.
UNLIMITED = ("--login-rate", "100000", "--viewer-rate", "100000")


@dataclass
class Options:
    viewers: int = 10_000
    cameras: int = 16
    calls: int = 2000          # per in-process read and backend
    reloads: int = 6           # viewers() with every viewer, per backend
    writes: int = 200          # add_viewer / revoke_viewer, per backend
    logins: int = 100          # HTTPS logins per Archiver
    lists: int = 400           # HTTPS camera lists per Archiver
    ingest_cameras: int = 20
    ingest_windows: int = 3    # per Archiver
    ingest_seconds: float = 8.0
    skip_http: bool = False
    skip_ingest: bool = False


# --- CPU time of processes (Linux /proc) -----------------------------------------------------
def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0  # a backend that ended between the listing and the read


def postgres_cpu(cluster: PostgresCluster) -> float:
    """CPU seconds used so far by the postmaster and every process it started (backends,
    checkpointer, autovacuum...): all of it is charged to the queries."""
    try:
        postmaster = int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = _cpu_of(postmaster)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == postmaster:
            total += _cpu_of(int(entry.name))
    return total


def _stats(wall_s: list[float]) -> dict[str, float]:
    return {"median_ms": median(wall_s) * 1000, "p95_ms": percentile(wall_s, 0.95) * 1000,
            "n": len(wall_s)}


# --- part 1: the Directory in process --------------------------------------------------------
def populate(directory: Directory, certs: list[x509.Certificate], cameras: int) -> list[str]:
    """``cameras`` cameras, and a viewer per certificate in one bulk transaction (the admin
    API would take minutes for 10 000): a third on all cameras, the others on two cameras each.
    Returns the viewers' fingerprints."""
    now = int(time.time() * 1000)
    names = [f"cam{i:02d}" for i in range(cameras)]
    viewer_rows, grants, fps = [], [], []
    for i, cert in enumerate(certs):
        fp = fingerprint(cert).hex()
        fps.append(fp)
        all_cameras = i % 3 == 0
        viewer_rows.append({"fingerprint": fp, "certificate": cert.public_bytes(Encoding.DER),
                            "subject": cert.subject.rfc4514_string(),
                            "oaep_hash": int(KeyScheme.RSA_OAEP_SHA256),
                            "all_cameras": int(all_cameras), "added_ms": now,
                            "revoked_ms": None, "key_streams_deleted": 0})
        if not all_cameras:
            grants += [{"fingerprint": fp, "camera": names[(i + k) % cameras]} for k in (0, 1)]
    for name in names:  # the Directory's own call: a camera's placement comes with it
        directory.add_camera(name, secrets.token_bytes(32), None, now)
    with directory.engine.begin() as conn:
        conn.execute(insert(t.viewers), viewer_rows)
        if grants:
            conn.execute(insert(t.viewer_cameras), grants)
    return fps


def _timed(calls: dict[str, Callable[[], object]], count: int, block: int,
           cluster: PostgresCluster) -> dict[str, dict[str, float]]:
    """``count`` calls of each backend's function, in alternating blocks of ``block``: wall
    time per call, this process's CPU per call, and (PostgreSQL) the server's."""
    walls: dict[str, list[float]] = {b: [] for b in calls}
    cpu: dict[str, float] = dict.fromkeys(calls, 0.0)
    server: dict[str, float] = dict.fromkeys(calls, 0.0)
    done = 0
    while done < count:
        n = min(block, count - done)
        order = list(calls) if (done // block) % 2 == 0 else list(reversed(calls))
        for backend in order:
            call = calls[backend]
            s0, c0 = postgres_cpu(cluster), time.process_time()
            for _ in range(n):
                w0 = time.perf_counter()
                call()
                walls[backend].append(time.perf_counter() - w0)
            cpu[backend] += time.process_time() - c0
            server[backend] += postgres_cpu(cluster) - s0
        done += n
    out = {}
    for backend in calls:
        row = _stats(walls[backend])
        row["client_cpu_us"] = cpu[backend] / count * 1e6
        if backend == "postgresql":
            row["server_cpu_us"] = server[backend] / count * 1e6
            row["calls_per_server_core_s"] = (count / server[backend] if server[backend] > 0
                                              else float("inf"))
        out[backend] = row
    return out


def in_process(report: Report, opts: Options, directories: dict[str, Directory],
               fps: list[str], cluster: PostgresCluster, pems: CertFactory) -> dict[str, Any]:
    rng = random.Random(21)  # noqa: S311 - which viewer to look up, not a secret
    names = [f"cam{i:02d}" for i in range(opts.cameras)]

    def pick() -> str:
        return fps[rng.randrange(len(fps))]

    def camera_list(d: Directory) -> None:
        viewer = d.viewer(pick())
        assert viewer is not None
        d.cameras(include_removed=True)

    ops: dict[str, dict[str, Callable[[], object]]] = {
        "login: viewer(fp)": {b: (lambda d=d: d.viewer(pick())) for b, d in directories.items()},
        "camera list: viewer(fp) + cameras()": {
            b: (lambda d=d: camera_list(d)) for b, d in directories.items()},
        "segment: camera(name)": {
            b: (lambda d=d: d.camera(names[rng.randrange(len(names))]))
            for b, d in directories.items()},
    }
    results: dict[str, Any] = {}
    for label, calls in ops.items():
        results[label] = _timed(calls, opts.calls, 100, cluster)
        _print_op(report, label, results[label])
    label = f"authorization change reload: viewers() ({opts.viewers} viewers)"
    results[label] = _timed({b: d.viewers for b, d in directories.items()}, opts.reloads, 1,
                            cluster)
    _print_op(report, label, results[label])
    # Writes: new viewers (certificates beyond the populated ones, made and parsed before the
    # clock runs: only the directory's write is timed), then their revocation.
    fresh = {b: iter([(fingerprint(c).hex(), c.public_bytes(Encoding.DER),
                       c.subject.rfc4514_string())
                      for c in (pems.certificate(opts.viewers + 1 + i * opts.writes + k)
                                for k in range(opts.writes))])
             for i, b in enumerate(directories)}
    added: dict[str, list[str]] = {b: [] for b in directories}

    def authorize(backend: str) -> None:
        fp, der, subject = next(fresh[backend])
        directories[backend].add_viewer(fp, der, subject, int(KeyScheme.RSA_OAEP_SHA256),
                                        names[:2], int(time.time() * 1000))
        added[backend].append(fp)

    label = "authorize: add_viewer (one transaction)"
    results[label] = _timed({b: (lambda b=b: authorize(b)) for b in directories}, opts.writes,
                            20, cluster)
    _print_op(report, label, results[label])
    revokes = {b: iter(list(v)) for b, v in added.items()}
    label = "revoke: revoke_viewer (one transaction)"
    results[label] = _timed({b: (lambda b=b: directories[b].revoke_viewer(
        next(revokes[b]), int(time.time() * 1000))) for b in directories}, opts.writes, 20,
        cluster)
    _print_op(report, label, results[label])
    return results


def _print_op(report: Report, label: str, rows: dict[str, dict[str, float]]) -> None:
    parts = []
    for backend in BACKENDS:
        row = rows[backend]
        text = (f"{backend} {row['median_ms']:.3f} / {row['p95_ms']:.3f} ms, "
                f"Archiver CPU {row['client_cpu_us']:.0f} us")
        if "server_cpu_us" in row:
            text += f", server CPU {row['server_cpu_us']:.0f} us"
        parts.append(text)
    ratio = rows["postgresql"]["median_ms"] / rows["sqlite"]["median_ms"]
    report.line(f"{label:<58} median / p95: {'; '.join(parts)}; PostgreSQL/SQLite median "
                f"{ratio:.2f}x")


# --- part 2: over HTTPS through real Archivers -----------------------------------------------
def over_https(report: Report, opts: Options, workdir: Path, pg_url: str,
               sqlite_data: Path) -> dict[str, Any]:
    site_ca = SiteCa.create(workdir / "site-ca")
    servers = {
        "postgresql": production_archiver(site_ca, workdir / "site-a1",
                                          extra_args=("--directory", pg_url, *UNLIMITED),
                                          start_timeout_s=120),
        "sqlite": production_archiver(site_ca, sqlite_data, extra_args=UNLIMITED,
                                      start_timeout_s=120),
    }
    store = SoftHsmStore.create(workdir / "viewer-softhsm")
    try:
        viewer = EnrolledViewer.enrol(store.new_token(), "site-bench")
        identity = viewer.identity()
        for server in servers.values():
            server.start()
            server.add_viewer(viewer.certificate, "all")
        logins: dict[str, list[float]] = {b: [] for b in servers}
        for i in range(opts.logins):
            for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
                server = servers[backend]
                w0 = time.perf_counter()
                login(server.url, identity, verify=server.verify)
                logins[backend].append(time.perf_counter() - w0)
        lists: dict[str, list[float]] = {b: [] for b in servers}
        clients = {b: httpx.Client(verify=s.verify, timeout=60) for b, s in servers.items()}
        try:
            sessions = {b: login(s.url, identity, verify=s.verify) for b, s in servers.items()}
            for i in range(opts.lists):
                for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
                    w0 = time.perf_counter()
                    response = clients[backend].get(
                        f"{servers[backend].url}/v1/cameras",
                        headers={"Authorization": f"Bearer {sessions[backend]}"})
                    lists[backend].append(time.perf_counter() - w0)
                    if response.status_code != 200 or len(response.json()) != opts.cameras:
                        raise RuntimeError(f"GET /v1/cameras on {backend}: HTTP "
                                           f"{response.status_code} {response.text[:300]}")
        finally:
            for client in clients.values():
                client.close()
    finally:
        for server in servers.values():
            server.stop()
        store.close()
    result = {"login (SoftHSM viewer, new TLS connection)": {b: _stats(v)
                                                             for b, v in logins.items()},
              "GET /v1/cameras (kept session)": {b: _stats(v) for b, v in lists.items()}}
    for label, rows in result.items():
        report.line(f"{label:<58} median / p95: " + "; ".join(
            f"{b} {rows[b]['median_ms']:.2f} / {rows[b]['p95_ms']:.2f} ms" for b in BACKENDS)
            + f"; PostgreSQL/SQLite median "
            f"{rows['postgresql']['median_ms'] / rows['sqlite']['median_ms']:.2f}x")
    return result


# --- part 3: ingest CPU per MB, site against standalone ---------------------------------------
@dataclass
class CliServer(BenchServer):
    """The product's own ``serve`` (not bench.server: the site needs --directory), over HTTP
    on loopback for the load generator, nothing expiring under the benchmark."""

    directory_url: str | None = None

    def command(self) -> list[str]:
        args = [*ArchiverServer.command(self), "--retention-days", "36500", "--min-free-mib", "0"]
        return [*args, *(["--directory", self.directory_url] if self.directory_url else [])]


def ingest(report: Report, opts: Options, workdir: Path,
           cluster: PostgresCluster) -> dict[str, Any]:
    servers = {"postgresql": CliServer(workdir / "ingest-site", key_period_s=60,
                                       directory_url=cluster.create_database()),
               "sqlite": CliServer(workdir / "ingest-standalone", key_period_s=60)}
    params = Params(cameras=opts.ingest_cameras, concurrency=8, sizes=[1 * MiB, 2 * MiB],
                    warmup=1.0)
    names = [f"ing{i:03d}" for i in range(opts.ingest_cameras)]
    rows: dict[str, list[dict[str, Any]]] = {b: [] for b in servers}
    try:
        files = {}
        for backend, server in servers.items():
            server.start()
            files[backend] = workdir / f"{backend}-cameras.json"
            files[backend].write_text(json.dumps(server.add_cameras(names)))
        for i in range(opts.ingest_windows):
            for backend in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
                s0 = postgres_cpu(cluster)
                row = window(servers[backend], files[backend], params, opts.ingest_seconds)
                row["postgres_cpu_ms_per_mb"] = ((postgres_cpu(cluster) - s0) * 1000
                                                 / (row["bytes"] / MB or 1))
                rows[backend].append(row)
                report.line(f"ingest window {i + 1} {backend:<10} {row['bytes'] / MB:7.0f} MB "
                            f"in {row['seconds']:.0f} s, {row['segments']} segments: "
                            f"Archiver {row.get('server_cpu_ms_per_mb', float('nan')):.2f} ms "
                            f"CPU/MB, PostgreSQL {row['postgres_cpu_ms_per_mb']:.2f} ms CPU/MB")
    finally:
        for server in servers.values():
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
    summary: dict[str, Any] = {"windows": rows}
    for backend in BACKENDS:
        cpu = [r["server_cpu_ms_per_mb"] for r in rows[backend] if "server_cpu_ms_per_mb" in r]
        summary[backend] = {"archiver_cpu_ms_per_mb": statistics.mean(cpu),
                            "postgres_cpu_ms_per_mb": statistics.mean(
                                r["postgres_cpu_ms_per_mb"] for r in rows[backend]),
                            "segments": sum(r["segments"] for r in rows[backend]),
                            "mb": sum(r["bytes"] for r in rows[backend]) / MB,
                            # Closed-loop throughput: noisy on a shared machine, hence CPU/MB.
                            "mb_per_s": sum(r["bytes"] for r in rows[backend]) / MB
                            / sum(r["seconds"] for r in rows[backend])}
    site, alone = summary["postgresql"], summary["sqlite"]
    summary["ratio_archiver"] = site["archiver_cpu_ms_per_mb"] / alone["archiver_cpu_ms_per_mb"]
    summary["ratio_with_postgres"] = ((site["archiver_cpu_ms_per_mb"]
                                       + site["postgres_cpu_ms_per_mb"])
                                      / alone["archiver_cpu_ms_per_mb"])
    summary["ratio_throughput"] = site["mb_per_s"] / alone["mb_per_s"]
    report.line(f"ingest acknowledged: site {site['mb_per_s']:.1f} MB/s, standalone "
                f"{alone['mb_per_s']:.1f} MB/s ({summary['ratio_throughput']:.2f}x)")
    report.line(f"ingest CPU per MB (mean of {opts.ingest_windows} windows each): site "
                f"{site['archiver_cpu_ms_per_mb']:.2f} ms (+ PostgreSQL "
                f"{site['postgres_cpu_ms_per_mb']:.3f} ms), standalone "
                f"{alone['archiver_cpu_ms_per_mb']:.2f} ms; site/standalone "
                f"{summary['ratio_archiver']:.3f}x (Archiver), "
                f"{summary['ratio_with_postgres']:.3f}x (with PostgreSQL's share)")
    return summary


# --- on paper ---------------------------------------------------------------------------------
def on_paper(report: Report, results: dict[str, Any]) -> dict[str, Any]:
    """Directory queries a site makes, against what one PostgreSQL core answers (measured).
    Conservative: the PostgreSQL CPU a segment costs is the larger of the in-process token
    check and what the whole cluster used per segment during the site's ingest windows."""
    ops = results["in_process"]
    seg = ops["segment: camera(name)"]["postgresql"]
    log = ops["login: viewer(fp)"]["postgresql"]
    lst = ops["camera list: viewer(fp) + cameras()"]["postgresql"]
    per_segment_ms = seg["server_cpu_us"] / 1000
    ingest_rows = results.get("ingest", {}).get("windows", {}).get("postgresql", [])
    if ingest_rows:
        used_s = sum(r["postgres_cpu_ms_per_mb"] * r["bytes"] / MB for r in ingest_rows) / 1000
        per_segment_ms = max(per_segment_ms,
                             used_s * 1000 / sum(r["segments"] for r in ingest_rows))
    # docs/benchmarks.md "Cameras per Archiver": 250 RTSP cameras (1 Mbit/s, 2 s segments) per
    # 2-core Archiver.
    cameras_per_archiver = 250
    segments_per_s = cameras_per_archiver / 2.0
    cores_per_archiver = segments_per_s * per_segment_ms / 1000
    archivers_per_core = 1 / cores_per_archiver
    paper = {
        "cameras_per_archiver": cameras_per_archiver,
        "segments_per_s_per_archiver": segments_per_s,
        "postgres_cpu_ms_per_segment": per_segment_ms,
        "postgres_cores_per_archiver": cores_per_archiver,
        "archivers_per_postgres_core": archivers_per_core,
        "cameras_per_postgres_core": archivers_per_core * cameras_per_archiver,
        "logins_per_postgres_core_s": log["calls_per_server_core_s"],
        "camera_lists_per_postgres_core_s": lst["calls_per_server_core_s"],
        # Each Archiver's psycopg pool holds up to 16 connections (archiver/directory/engine.py);
        # PostgreSQL's default max_connections is 100.
        "archivers_per_100_connections": 100 // 16,
    }
    report.line(
        f"on paper: {cameras_per_archiver} cameras per Archiver (RTSP figure) = "
        f"{segments_per_s:.0f} segments/s, each costing PostgreSQL {per_segment_ms:.2f} ms CPU "
        f"(measured, whole cluster): {cores_per_archiver:.3f} PostgreSQL cores per Archiver, "
        f"{archivers_per_core:.0f} Archivers ({archivers_per_core * cameras_per_archiver:.0f} "
        f"cameras) per PostgreSQL core; a core also answers "
        f"{log['calls_per_server_core_s']:.0f} logins/s or "
        f"{lst['calls_per_server_core_s']:.0f} camera lists/s; connections: 16 per Archiver's "
        f"pool, {100 // 16} Archivers at PostgreSQL's default max_connections=100")
    return paper


def run(report: Report, workdir: Path, opts: Options) -> dict[str, Any]:
    result = report.section("site directory", {
        "viewers": opts.viewers, "cameras": opts.cameras, "calls": opts.calls,
        "reloads": opts.reloads, "writes": opts.writes, "https_logins": opts.logins,
        "https_lists": opts.lists, "ingest_windows": opts.ingest_windows,
        "ingest_seconds": opts.ingest_seconds, "ingest_cameras": opts.ingest_cameras})
    cluster = PostgresCluster.start()
    directories: dict[str, Directory] = {}
    try:
        pg_url = cluster.create_database()
        sqlite_data = workdir / "standalone"
        sqlite_data.mkdir(parents=True)
        Database(sqlite_data / "archiver.sqlite3").close()  # the legacy index first, as serve
        directories["postgresql"] = open_directory(pg_url, workdir / "pg-unused")
        directories["sqlite"] = open_directory(None, sqlite_data)
        pems = CertFactory()
        t0 = time.perf_counter()
        # The same certificates in both (a certificate's validity starts at its making).
        certs = [pems.certificate(i) for i in range(opts.viewers)]
        fps = []
        for backend in BACKENDS:
            fps = populate(directories[backend], certs, opts.cameras)
        report.line(f"{opts.viewers} viewers and {opts.cameras} cameras in each directory in "
                    f"{time.perf_counter() - t0:.0f} s (bulk insert)")
        directories["postgresql"].viewers()  # warm both caches alike before timing
        directories["sqlite"].viewers()
        result["in_process"] = in_process(report, opts, directories, fps, cluster, pems)
        for directory in directories.values():
            directory.close()
        directories.clear()
        if not opts.skip_http:
            result["https"] = over_https(report, opts, workdir, pg_url, sqlite_data)
        if not opts.skip_ingest:
            result["ingest"] = ingest(report, opts, workdir, cluster)
        result["on_paper"] = on_paper(report, result)
    finally:
        for directory in directories.values():
            directory.close()
        cluster.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    return run_bench("site_directory", __doc__, Options(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
