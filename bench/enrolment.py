"""Batch enrolment: how long authorizing many viewers takes, one request each and in batches.

    python -m bench.enrolment [--viewers 10000] [--one-by-one 500] [--cameras 100]
        [--results FILE]

A real Archiver in production mode (``fusion-archiver serve`` in a subprocess, HTTPS with a
certificate of a site CA, its data directory) with ``--cameras`` cameras. The viewers are
certificates of distinct subjects for one software key (bench.common.CertFactory: the Archiver
only ever sees public keys). Measured in the same run, in this order:

1. ``--one-by-one`` viewers, one ``POST /v1/admin/viewers`` each (``AdminClient.add_viewer``
   over one kept-alive connection): what enrolling a site cost before batches;
2. ``--viewers`` viewers in batches (``AdminClient.add_viewers``, cut by ``viewer_batches``);
3. ``--one-by-one`` more viewers through ``fusion-archiver viewers add FILES...``, the whole
   command: its start, reading the files, the batches.

Printed: milliseconds per viewer and the ratio to one request each. No camera records during
the run: the viewers' joins to running chains are the ingest benchmark's (``--viewers``).

``--site`` measures instead how long another Archiver of a site takes to apply a batch
enrolment made elsewhere. In this process: a real PostgreSQL directory (initdb, pg_ctl), the
site listeners of two Archivers (archiver/directory/notify.py) and the second one's key manager,
which knows ``--viewers`` viewers already. ``--viewers`` more are added through the first in
batches of 500, as ``viewers add`` makes them (one transaction, one audit fsync, the
notifications announced once the audit rows reach the directory). The second applies them one
notification at a time, then, in the same run, together (``apply_grants``). Printed: the time
from the first batch until the second Archiver's key manager knows them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from archiver.admin_client import AdminClient, viewer_batches
from archiver.directory.notify import ViewerChange
from bench.common import CertFactory, machine_line
from fusion_testkit.pki import SiteCa
from fusion_testkit.server import production_archiver


def run(viewers: int, one_by_one: int, cameras: int, workdir: Path) -> dict[str, float]:
    site_ca = SiteCa.create(workdir / "site-ca")
    server = production_archiver(site_ca, workdir / "archiver", start_timeout_s=120)
    pems = CertFactory().pems(0, 2 * one_by_one + viewers)
    single, batched, by_cli = (pems[:one_by_one], pems[one_by_one:one_by_one + viewers],
                               pems[one_by_one + viewers:])
    with server, AdminClient(server.url, server.admin_token, tls_ca=site_ca.path,
                                     timeout=300) as admin:
        for number in range(cameras):
            admin.add_camera(f"cam{number:03d}")
        figures: dict[str, float] = {}

        started = time.perf_counter()
        for pem in single:
            admin.add_viewer(pem, "all")
        figures["one_by_one_ms"] = (time.perf_counter() - started) * 1000 / one_by_one

        started = time.perf_counter()
        for batch in viewer_batches(batched, "all"):
            admin.add_viewers(batch, "all")
        figures["batches_ms"] = (time.perf_counter() - started) * 1000 / viewers

        files = workdir / "certs"
        files.mkdir()
        for number, pem in enumerate(by_cli):
            (files / f"viewer-{number:05d}.pem").write_text(pem)
        env = {k: v for k, v in os.environ.items()
               if k not in ("FUSION_ADMIN_TOKEN", "FUSION_TLS_CA")}
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "archiver", "viewers", "add",
             *sorted(map(str, files.iterdir())), "--cameras", "all", "--json",
             "--archiver", server.url, "--tls-ca", str(site_ca.path),
             "--data", str(server.data_dir)],
            capture_output=True, text=True, env=env, timeout=600, check=False)
        figures["cli_ms"] = (time.perf_counter() - started) * 1000 / one_by_one
        if done.returncode != 0:
            raise SystemExit(f"fusion-archiver viewers add failed: {done.stderr[-2000:]}")
        if len(admin.viewers()) != len(pems):
            raise SystemExit("Not every viewer was authorized.")
    return figures


def site_propagation(viewers: int, together: bool, workdir: Path) -> float:
    """Seconds from the first batch through Archiver a1 until a2's key manager applied all."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from archiver.audit import AuditLog
    from archiver.db import Database
    from archiver.directory import NewViewer, open_directory
    from archiver.directory.notify import SiteChanges
    from archiver.keying import KeyManager
    from fusion_testkit.postgres import PostgresCluster
    from keyservice.identity import fingerprint

    certificates = CertFactory()

    def new_viewers(first: int, count: int) -> list[NewViewer]:
        made = [certificates.certificate(i) for i in range(first, first + count)]
        return [NewViewer(fingerprint(c).hex(), c.public_bytes(Encoding.DER),
                          c.subject.rfc4514_string(), 1, None) for c in made]

    cluster = PostgresCluster.start()
    try:
        url = cluster.create_database()
        first, second = open_directory(url, workdir / "a1"), open_directory(url, workdir / "a2")
        first.add_viewers(new_viewers(0, viewers), 1)  # the viewers a2 knows already
        (workdir / "index").mkdir()
        keys = KeyManager(Database(workdir / "index" / "index.db"), 60, directory=second,
                          prepare_elsewhere=False)
        keys.active_viewers()  # its viewer list loaded, as a running Archiver's is
        applied: list[int] = []

        def one(change: ViewerChange) -> None:
            keys.authorization_changed(change.fingerprint, None)
            applied.append(1)

        def many(fingerprints: list[str]) -> None:
            keys.viewers_authorized(fingerprints)
            applied.extend([1] * len(fingerprints))

        a1 = SiteChanges(first, "a1", lambda change: None, url=url, poll_s=3600)
        a2 = SiteChanges(second, "a2", one, url=url, poll_s=3600,
                         apply_grants=many if together else None)
        a1.start()
        a2.start()
        audit = AuditLog(workdir / "a1-audit.jsonl", first, "a1", retry_s=0.2)
        audit.on_synced = a1.announce
        try:
            deadline = time.monotonic() + 60
            while not (a2.connected.is_set() and a2.polls == 1):
                if time.monotonic() > deadline:
                    raise SystemExit("The second Archiver never listened to the directory.")
                time.sleep(0.05)
            batches = [new_viewers(viewers + i, min(500, viewers - i))
                       for i in range(0, viewers, 500)]
            started = time.perf_counter()
            for batch in batches:
                first.add_viewers(batch, 2)
                audit.record_many("admin", "viewer.add", 2, [
                    {"fingerprint": v.fingerprint, "cameras": "all"} for v in batch])
            deadline = time.monotonic() + 600
            while len(applied) < viewers:
                if time.monotonic() > deadline:
                    raise SystemExit(f"Only {len(applied)} of {viewers} viewers were applied.")
                time.sleep(0.02)
            return time.perf_counter() - started
        finally:
            audit.close()
            a1.stop()
            a2.stop()
            first.close()
            second.close()
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.enrolment",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=10_000,
                        help="viewers authorized in batches (default 10000)")
    parser.add_argument("--one-by-one", type=int, default=500,
                        help="viewers authorized one request each, and by the CLI (default 500)")
    parser.add_argument("--cameras", type=int, default=100, help="cameras (default 100)")
    parser.add_argument("--site", action="store_true",
                        help="measure how another Archiver of a site applies a batch enrolment")
    parser.add_argument("--results", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if min(args.viewers, args.one_by_one, args.cameras) < 1:
        parser.error("--viewers, --one-by-one and --cameras must be at least 1")
    print(machine_line(), flush=True)
    if args.site:
        site: dict[str, float] = {}
        for together in (False, True):
            with tempfile.TemporaryDirectory(prefix="fusion-bench-enrolment-") as workdir:
                seconds = site_propagation(args.viewers, together, Path(workdir))
            how = "together" if together else "one notification at a time"
            site["together_s" if together else "one_by_one_s"] = seconds
            print(f"another Archiver, {args.viewers} viewers known, {args.viewers} added in "
                  f"batches: applied {how} in {seconds:.1f} s "
                  f"({seconds * 1000 / args.viewers:.2f} ms a viewer)", flush=True)
        print(f"ratio together / one at a time: {site['together_s'] / site['one_by_one_s']:.3f}")
        if args.results:
            args.results.write_text(json.dumps(site, indent=2))
        return
    print(f"parameters: {args.cameras} cameras, {args.one_by_one} viewers one request each, "
          f"{args.viewers} in batches, {args.one_by_one} by the CLI", flush=True)
    with tempfile.TemporaryDirectory(prefix="fusion-bench-enrolment-") as workdir:
        figures = run(args.viewers, args.one_by_one, args.cameras, Path(workdir))
    one = figures["one_by_one_ms"]
    print("| how | ms per viewer | ratio to one request each |")
    print(f"| one request each (`POST /v1/admin/viewers`) | {one:.2f} | 1.00 |")
    print(f"| batches (`POST /v1/admin/viewers/batch`) | {figures['batches_ms']:.2f} | "
          f"{figures['batches_ms'] / one:.3f} |")
    print(f"| `fusion-archiver viewers add FILES...`, whole command | {figures['cli_ms']:.2f} | "
          f"{figures['cli_ms'] / one:.3f} |")
    print(f"10 000 viewers: about {10_000 * one / 1000:.0f} s one request each, "
          f"{10_000 * figures['batches_ms'] / 1000:.1f} s in batches", flush=True)
    if args.results:
        args.results.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
