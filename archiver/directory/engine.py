"""The site directory's connection: an SQLAlchemy engine over SQLite (a file in the data
directory, the embedded default) or PostgreSQL (psycopg 3 and psycopg_pool's pool).

SQLite: the driver's own transaction handling is off; a write transaction starts with BEGIN
IMMEDIATE (a read-then-write never fails on a lock upgrade while the Archiver's index writer
holds the file), reads that must agree with each other with BEGIN, a single read with none;
synchronous FULL and secure_delete like the index, and a busy timeout: the index
(archiver/db.py) writes the same file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import NullPool

from keyservice.errors import UsageError

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

WRITE = "fusion_write"  # execution option: this connection's transaction writes
SNAPSHOT = "fusion_snapshot"  # execution option: several reads that must see one commit
POSTGRES_SCHEMES = ("postgresql", "postgres")
SQLITE_FILE = "archiver.sqlite3"  # the embedded directory shares the index's file


def is_postgres(url: str) -> bool:
    return urlsplit(url).scheme.split("+", 1)[0] in POSTGRES_SCHEMES


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_url(url: str) -> str:
    """A directory URL the Archiver can use, or a UsageError saying what to give."""
    parts = urlsplit(url)
    if not is_postgres(url) or (not parts.hostname and "host=" not in parts.query):
        raise UsageError(f"'{redacted(url)}' is not a PostgreSQL URL.",
                         "Give --directory postgresql://USER:PASSWORD@HOST:PORT/DATABASE, or "
                         "leave it out for the SQLite directory in the data directory.")
    return url


def sqlite_engine(path: Path) -> Engine:
    # Created 0600 before SQLite does (it would use the umask), and only if absent: closing a
    # descriptor of a file drops every POSIX lock this process holds on it, and the index's
    # connections to the same file hold theirs (SQLite then reads a WAL it no longer
    # guards: "disk I/O error").
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # Connections are cheap on SQLite: enough for every worker thread of the server (anyio
    # runs up to 40), so a burst of logins waits on SQLite's locks, not on the pool.
    engine = create_engine(f"sqlite+pysqlite:///{path}", pool_size=8, max_overflow=56,
                           pool_timeout=30,
                           connect_args={"timeout": 30, "check_same_thread": False,
                                         "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _connect(dbapi: sqlite3.Connection, _record: Any) -> None:
        dbapi.execute("PRAGMA synchronous=FULL")
        dbapi.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten (a revoked viewer's row is not secret, but the index
        # on the same file relies on it for crypto-shredding).
        dbapi.execute("PRAGMA secure_delete=ON")

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # A single read needs no transaction of its own (each statement is one, in
        # autocommit): no BEGIN, no ROLLBACK, on the paths every segment and login takes.
        options = conn.get_execution_options()
        if options.get(WRITE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif options.get(SNAPSHOT):
            conn.exec_driver_sql("BEGIN")

    return engine


class PoolSwitch:
    """psycopg_pool's pool behind the engine, replaceable: after an outage (snapshot.py's
    watch saw the server answer again) ``renew()`` puts a fresh pool in, instead of waiting
    for the old one's reconnection back-off (up to tens of seconds after a 20 s outage)."""

    def __init__(self, url: str, max_size: int, timeout_s: float) -> None:
        self._url = url
        self._max_size = max_size
        self._timeout_s = timeout_s
        self.pool = self._open()

    def _open(self) -> ConnectionPool:
        from psycopg_pool import ConnectionPool  # only a site's Archiver needs it

        pool = ConnectionPool(_conninfo(self._url), min_size=1, max_size=self._max_size,
                              open=False, close_returns=True, timeout=self._timeout_s,
                              name="fusion-directory")
        try:
            # Wait for the first connection: a wrong URL or password is said at start, once.
            pool.open(wait=True, timeout=self._timeout_s)
        except Exception:
            pool.close()
            raise
        return pool

    def getconn(self) -> Any:
        return self.pool.getconn()

    def probe(self, timeout_s: float = 2.0) -> None:
        """One connection of its own (raises what libpq said): whether the server answers
        and takes writes, without touching the pool. A read-only server (a standby, a demoted
        leader) is not back: the directory's writes would fail there."""
        import psycopg

        with psycopg.connect(_conninfo(self._url), connect_timeout=max(1, int(timeout_s)),
                             autocommit=True) as conn:
            row = conn.execute("SHOW transaction_read_only").fetchone()
            if row is not None and row[0] == "on":
                raise ConnectionError("the server is read-only (a standby?)")

    def renew(self) -> None:
        """A new pool (connected) in place of the old one, closed without waiting: a
        connection still out goes when it is given back."""
        fresh = self._open()
        old, self.pool = self.pool, fresh
        # Closed in the background: its workers may be in a reconnection back-off.
        threading.Thread(target=_close_quietly, args=(old,), daemon=True,
                         name="fusion-directory-old-pool").start()

    def close(self) -> None:
        self.pool.close()


def _close_quietly(pool: ConnectionPool) -> None:
    with contextlib.suppress(Exception):
        pool.close(timeout=10)


def postgres_engine(url: str, *, max_size: int = 16,
                    timeout_s: float = 10.0) -> tuple[Engine, PoolSwitch]:
    """An engine whose connections come from psycopg_pool's pool: SQLAlchemy's own pool is off
    (NullPool), and closing a connection gives it back to psycopg's pool (close_returns), which
    checks and resets it. The caller closes the pool after disposing of the engine.
    ``timeout_s``: how long a request waits for a connection while the server is away, before
    it is answered 503 (short: requests must not pile up behind an outage)."""
    import psycopg

    # One connection first: a wrong URL, password or port is said at once and precisely (the
    # pool would retry until its timeout and report only that).
    psycopg.connect(_conninfo(url), connect_timeout=max(1, int(timeout_s))).close()
    pools = PoolSwitch(url, max_size, timeout_s)
    # Through the switch, not a bound method of one pool: renew() must reach new connections.
    engine = create_engine("postgresql+psycopg://", creator=pools.getconn, poolclass=NullPool)
    return engine, pools


def where(url: str) -> str:
    """``host:port`` of a directory URL, for sentences (several for a multi-host URL; never
    the user or password)."""
    netloc = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if netloc:
        return netloc
    query = urlsplit(url).query  # postgresql:///db?host=...&port=...
    found = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    return f"{found.get('host', 'localhost')}:{found.get('port', '5432')}"


def _conninfo(url: str) -> str:
    """libpq takes postgresql:// URLs as they are; a SQLAlchemy dialect suffix is dropped."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.split("+", 1)[0] in POSTGRES_SCHEMES else url
