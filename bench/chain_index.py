"""The index write of a revocation at scale, alone (issue 23 item 2, third step): C chains of V
viewers' chain records written R times into one SQLite index, in transactions of B chains, for
each table layout compared; CPU per million records of each round.

The rows are what the Archiver writes (a 64-character hex fingerprint, a 12-byte chain id, a
16-byte epoch id, one per viewer per day, a ~150-byte chain record), with the Archiver's
pragmas (WAL, synchronous=FULL, secure_delete, a 64 MiB page cache). Nothing else runs in
the process: this is SQLite's part of ``bench.revocation``'s "index" figure.

    python -m bench.chain_index --chains 100 --viewers 10000 --rounds 3
    python -m bench.chain_index --migration --rounds 3   # an upgrade's start with them
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from archiver.db import Database
from archiver.migrations import MIGRATIONS
from bench.common import in_workdir

Row = tuple[str, bytes, str, bytes, int, bytes]  # store_key_rows's: fp, chain, camera, epoch, ms, record

# Version 7's table (archiver/migrations.py _migrate_7): a rowid table keyed by fingerprint.
V7 = """
CREATE TABLE chain_records (fingerprint TEXT NOT NULL, chain_id BLOB NOT NULL, camera TEXT NOT NULL,
    epoch_id BLOB NOT NULL, valid_from_ms INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (fingerprint, chain_id));
CREATE INDEX chain_records_by_camera ON chain_records (camera, valid_from_ms);
CREATE INDEX chain_records_by_epoch ON chain_records (epoch_id);
"""

_CHAINS = """
CREATE TABLE chains (chain_id BLOB PRIMARY KEY, camera TEXT NOT NULL,
    valid_from_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX chains_by_camera ON chains (camera, valid_from_ms);
"""

# A chain's records together (WITHOUT ROWID: the table is the primary key's B-tree), the
# per-chain facts once per chain.
V8_CLUSTERED = _CHAINS + """
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_id BLOB NOT NULL, record BLOB NOT NULL, PRIMARY KEY (chain_id, fingerprint)) WITHOUT ROWID;
CREATE INDEX chain_records_by_epoch ON chain_records (epoch_id);
"""

# The same in a rowid table (appended), the key a unique index beside it.
V8_ROWID = _CHAINS + """
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_id BLOB NOT NULL, record BLOB NOT NULL, UNIQUE (chain_id, fingerprint));
CREATE INDEX chain_records_by_epoch ON chain_records (epoch_id);
"""

# What the epoch index costs: the clustered layout without it.
V8_NO_EPOCH_INDEX = _CHAINS + """
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_id BLOB NOT NULL, record BLOB NOT NULL, PRIMARY KEY (chain_id, fingerprint)) WITHOUT ROWID;
"""


# The epoch index keyed by a number given in the epochs' order of creation (a day's epochs
# are then together at the index's end) instead of the random 16-byte epoch id.
_EPOCHS_NUMBERED = """
CREATE TABLE epochs (epoch_no INTEGER PRIMARY KEY AUTOINCREMENT, epoch_id BLOB NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL, created_ms INTEGER NOT NULL, record BLOB NOT NULL);
"""
V8_EPOCHNO_CLUSTERED = _CHAINS + _EPOCHS_NUMBERED + """
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_no INTEGER NOT NULL, record BLOB NOT NULL, PRIMARY KEY (chain_id, fingerprint)) WITHOUT ROWID;
CREATE INDEX chain_records_by_epoch ON chain_records (epoch_no);
"""
V8_EPOCHNO_ROWID = _CHAINS + _EPOCHS_NUMBERED + """
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_no INTEGER NOT NULL, record BLOB NOT NULL, UNIQUE (chain_id, fingerprint));
CREATE INDEX chain_records_by_epoch ON chain_records (epoch_no);
"""


def _write_chains(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """One ``chains`` row per chain of ``rows`` (its camera and start): the version-8 layouts'."""
    chains: dict[bytes, tuple[str, int]] = {}
    for row in rows:
        chains.setdefault(row[1], (row[2], row[4]))
    conn.executemany("INSERT OR IGNORE INTO chains (chain_id, camera, valid_from_ms)"
                     " VALUES (?,?,?)", [(c, cam, ms) for c, (cam, ms) in chains.items()])


def _write_v8_epochno(conn: sqlite3.Connection, rows: list[Row]) -> None:
    _write_chains(conn, rows)
    conn.executemany("INSERT OR IGNORE INTO epochs (epoch_id, fingerprint, created_ms, record)"
                     " VALUES (?,?,0,x'00')", list({(r[3], r[0]) for r in rows}))
    conn.executemany("INSERT INTO chain_records (chain_id, fingerprint, epoch_no, record)"
                     " VALUES (?,?,(SELECT epoch_no FROM epochs WHERE epoch_id=?),?)",
                     sorted((r[1], r[0], r[3], r[5]) for r in rows))


# No per-record epoch index: each epoch opener counts the chain records under it (kept by
# triggers, so every insert and delete path counts), and shredding takes the openers at 0.
V8_COUNTED = _CHAINS + """
CREATE TABLE epochs (epoch_id BLOB PRIMARY KEY, fingerprint TEXT NOT NULL,
    created_ms INTEGER NOT NULL, record BLOB NOT NULL, records INTEGER NOT NULL DEFAULT 0);
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_id BLOB NOT NULL, record BLOB NOT NULL, PRIMARY KEY (chain_id, fingerprint)) WITHOUT ROWID;
CREATE TRIGGER chain_records_counted AFTER INSERT ON chain_records BEGIN
    UPDATE epochs SET records = records + 1 WHERE epoch_id = NEW.epoch_id; END;
CREATE TRIGGER chain_records_uncounted AFTER DELETE ON chain_records BEGIN
    UPDATE epochs SET records = records - 1 WHERE epoch_id = OLD.epoch_id; END;
"""  # noqa: S608 (a schema, not a query)
# The same, the counts in a narrow table of their own.
V8_COUNTED_NARROW = _CHAINS + """
CREATE TABLE epoch_uses (epoch_id BLOB PRIMARY KEY, records INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE chain_records (chain_id BLOB NOT NULL, fingerprint TEXT NOT NULL,
    epoch_id BLOB NOT NULL, record BLOB NOT NULL, PRIMARY KEY (chain_id, fingerprint)) WITHOUT ROWID;
CREATE TRIGGER chain_records_counted AFTER INSERT ON chain_records BEGIN
    INSERT INTO epoch_uses (epoch_id, records) VALUES (NEW.epoch_id, 1)
    ON CONFLICT (epoch_id) DO UPDATE SET records = records + 1; END;
"""  # noqa: S608 (a schema, not a query)


def _write_v8_counted(conn: sqlite3.Connection, rows: list[Row]) -> None:
    conn.executemany("INSERT OR IGNORE INTO epochs (epoch_id, fingerprint, created_ms, record)"
                     " VALUES (?,?,0,?)", [(e, fp, OPENER) for e, fp in {(r[3], r[0]) for r in rows}])
    _write_v8(conn, rows)


OPENER = os.urandom(300)


def _write_v7(conn: sqlite3.Connection, rows: list[Row]) -> None:
    conn.executemany("INSERT INTO chain_records (fingerprint, chain_id, camera, epoch_id,"
                     " valid_from_ms, record) VALUES (?,?,?,?,?,?)", sorted(rows))


def _write_v8(conn: sqlite3.Connection, rows: list[Row]) -> None:
    _write_chains(conn, rows)
    conn.executemany("INSERT INTO chain_records (chain_id, fingerprint, epoch_id, record)"
                     " VALUES (?,?,?,?)",
                     sorted((r[1], r[0], r[3], r[5]) for r in rows))


LAYOUTS: dict[str, tuple[str, Callable[[sqlite3.Connection, list[Row]], None]]] = {
    "v7": (V7, _write_v7),
    # "v8": the Archiver's own Database.store_key_rows on schema version 8 (below).
    "v8-clustered": (V8_CLUSTERED, _write_v8),
    "v8-rowid": (V8_ROWID, _write_v8),
    "v8-no-epoch-index": (V8_NO_EPOCH_INDEX, _write_v8),
    "v8-epochno-clustered": (V8_EPOCHNO_CLUSTERED, _write_v8_epochno),
    "v8-epochno-rowid": (V8_EPOCHNO_ROWID, _write_v8_epochno),
    "v8-counted": (V8_COUNTED, _write_v8_counted),
    "v8-counted-narrow": (V8_COUNTED_NARROW, _write_v8),
}


def _store_rows(db: Database) -> Callable[[sqlite3.Connection, list[Row]], None]:
    def write(_: sqlite3.Connection, rows: list[Row]) -> None:
        db.store_key_rows([], rows)
    return write


def _batches(chains: int, per_batch: int, day: int, fps: list[str],
             epochs: list[bytes]) -> Iterator[list[Row]]:
    record = os.urandom(150)
    for first in range(0, chains, per_batch):
        rows = []
        for c in range(first, min(chains, first + per_batch)):
            chain_id = os.urandom(12)
            camera = f"cam{c:04d}"
            rows.extend((fp, chain_id, camera, epochs[v], day * 1000 + c, record)
                        for v, fp in enumerate(fps))
        yield rows


def _open(path: Path, schema: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA cache_size=-65536")
    conn.executescript(schema)
    return conn


def run(workdir: Path, layouts: list[str], chains: int, viewers: int, rounds: int,
        per_batch: int) -> dict[str, Any]:
    fps = sorted(os.urandom(32).hex() for _ in range(viewers))
    # One epoch per viewer per UTC day, as the Archiver's: the rounds are one day's chains (a
    # day's start, then revocations), all under the same epochs.
    epochs = [os.urandom(16) for _ in fps]
    result: dict[str, Any] = {"chains": chains, "viewers": viewers, "rounds": rounds,
                              "chains_per_transaction": per_batch, "layouts": {}}
    for name in layouts:
        path = workdir / f"{name}.sqlite3"
        db: Database | None = None
        if name == "v8":
            db = Database(path)
            write = _store_rows(db)
            conn = sqlite3.connect(workdir / "unused.sqlite3", isolation_level=None)
        else:
            schema, write = LAYOUTS[name]
            conn = _open(path, schema)
        figures = []
        for day in range(rounds):
            cpu = 0.0
            records = 0
            wall0 = time.perf_counter()
            for rows in _batches(chains, per_batch, day, fps, epochs):
                cpu0 = time.process_time()
                if db is not None:  # its own transaction
                    write(conn, rows)
                else:
                    conn.execute("BEGIN IMMEDIATE")
                    write(conn, rows)
                    conn.execute("COMMIT")
                cpu += time.process_time() - cpu0
                records += len(rows)
            if db is not None:
                db.checkpoint()
            else:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            figures.append({"records": records, "cpu_s": cpu,
                            "cpu_s_per_million": cpu / records * 1e6,
                            "wall_s": time.perf_counter() - wall0,
                            "file_mb": path.stat().st_size / 1e6})
            print(f"{name}: round {day + 1}: {records} records, CPU {cpu:.2f} s "
                  f"({cpu / records * 1e6:.2f} s per million), file "
                  f"{path.stat().st_size / 1e6:.0f} MB", flush=True)
        conn.close()
        if db is not None:
            db.close()
        path.unlink()
        result["layouts"][name] = figures
    return result


def migration(workdir: Path, chains: int, viewers: int, rounds: int,
              per_batch: int) -> dict[str, Any]:
    """An index at schema version 7 (made by the shipped migrations) with ``rounds`` x
    ``chains`` x ``viewers`` chain records, then opened by this Archiver's ``Database``, which
    backs it up and migrates it: the time an upgrade's start takes for them."""
    path = workdir / "v7.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, step in enumerate(MIGRATIONS[:7], start=1):
        conn.execute("BEGIN")
        step(conn)
        conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
    fps = sorted(os.urandom(32).hex() for _ in range(viewers))
    epochs = [os.urandom(16) for _ in fps]
    records = 0
    for day in range(rounds):
        for rows in _batches(chains, per_batch, day, fps, epochs):
            conn.execute("BEGIN")
            _write_v7(conn, rows)
            conn.execute("COMMIT")
            records += len(rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    before_mb = path.stat().st_size / 1e6
    cpu0, wall0 = time.process_time(), time.perf_counter()
    db = Database(path)
    result = {"records": records, "cpu_s": time.process_time() - cpu0,
              "wall_s": time.perf_counter() - wall0, "migrated_from": db.migrated_from,
              "index_mb_before": before_mb,
              "wal_mb_after": Path(f"{path}-wal").stat().st_size / 1e6,
              "backup_mb": db.backup.stat().st_size / 1e6 if db.backup else 0.0}
    db.close()
    result["index_mb_after"] = path.stat().st_size / 1e6
    print(f"migration 7 -> 8 of {records} chain records (with the backup): CPU "
          f"{result['cpu_s']:.1f} s, wall {result['wall_s']:.1f} s; index "
          f"{before_mb:.0f} MB -> {result['index_mb_after']:.0f} MB, backup "
          f"{result['backup_mb']:.0f} MB, WAL after it {result['wal_mb_after']:.0f} MB",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chain_index", description=__doc__)
    parser.add_argument("--chains", type=int, default=100)
    parser.add_argument("--viewers", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chains-per-transaction", type=int, default=10)
    parser.add_argument("--layouts", default="v7,v8",
                        help=f"of v8 (this Archiver's), {', '.join(LAYOUTS)}")
    parser.add_argument("--migration", action="store_true",
                        help="time the migration of a version-7 index of that many records")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.migration:
        in_workdir("bench-chain-index-", lambda workdir: migration(
            workdir, args.chains, args.viewers, args.rounds, args.chains_per_transaction),
            args.json)
    else:
        in_workdir("bench-chain-index-", lambda workdir: run(
            workdir, args.layouts.split(","), args.chains, args.viewers, args.rounds,
            args.chains_per_transaction), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
