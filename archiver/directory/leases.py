"""The fast half of a camera's lease (issue 22): one PostgreSQL session-level advisory lock per
camera with standbys, held by the Archiver recording it on a connection of its own.

PostgreSQL frees a session's advisory locks the moment the session ends: an Archiver killed
(SIGKILL) has its socket closed by the kernel, its server process sees the end of the stream and
exits, and the lock is free within milliseconds. A standby that looks at ``pg_locks`` every half
second sees it; nothing home-made decides who is alive. A link cut without a closed socket (a
black hole) is caught by TCP keepalives on both ends of this session (libpq's ``keepalives_*``
here, the server's ``tcp_keepalives_*`` and ``tcp_user_timeout`` set on the session), and by the
lease row's expiry (archiver/registry.py) behind them.

Only a site on PostgreSQL has leases (an SQLite directory is a site of one). The lock is a
signal, not the authority: ``cameras.archiver``, changed with the lease row in one transaction
(``Directory.take_over``), says who records.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from archiver.directory.engine import POSTGRES_SCHEMES

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("archiver.site")

# A dead peer on this session is noticed within about idle + interval * count seconds.
KEEPALIVE_IDLE_S = 2
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_COUNT = 3
CONNECT_TIMEOUT_S = 5


def lock_key(camera: str) -> int:
    """The camera's 64-bit advisory lock key (namespaced: other users of advisory locks in the
    database, Alembic's migration lock, never collide with it in practice)."""
    digest = hashlib.sha256(b"fusion-camera-lease\0" + camera.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _halves(key: int) -> tuple[int, int]:
    """How ``pg_locks`` shows a bigint key: (classid, objid), its high and low 32 bits."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def _conninfo(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.split("+", 1)[0] in POSTGRES_SCHEMES else url


class LeaseLocks:
    """This Archiver's lock session. Thread-safe; every method may raise psycopg's errors when
    PostgreSQL cannot be reached (then the session is dropped, its locks are gone, and the next
    call connects again)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None  # made on first use
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def _connection(self) -> psycopg.Connection[Any]:
        import psycopg  # only a site's Archiver needs it

        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._held.clear()  # a new session holds nothing
        conn = psycopg.connect(
            _conninfo(self._url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
            keepalives=1, keepalives_idle=KEEPALIVE_IDLE_S,
            keepalives_interval=KEEPALIVE_INTERVAL_S, keepalives_count=KEEPALIVE_COUNT,
            application_name="fusion-archiver leases")
        # The server end too: a holder whose link is cut must lose its locks, so its standby
        # can take over; without this the server keeps the idle session for hours.
        for setting, value in (("tcp_keepalives_idle", KEEPALIVE_IDLE_S),
                               ("tcp_keepalives_interval", KEEPALIVE_INTERVAL_S),
                               ("tcp_keepalives_count", KEEPALIVE_COUNT),
                               ("tcp_user_timeout", 1000 * (KEEPALIVE_IDLE_S
                                                            + KEEPALIVE_INTERVAL_S
                                                            * KEEPALIVE_COUNT))):
            conn.execute(f"SET {setting} = {int(value)}")
        self._conn = conn
        return conn

    def _run(self, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        try:
            cur = self._connection().execute(query, params)
            return cur.fetchall() if cur.description else []
        except Exception:
            self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # already broken: nothing more to free
                log.debug("closing the lease session: %s", exc)

    def try_lock(self, camera: str) -> bool:
        """Take ``camera``'s lock (True), or False if another session holds it."""
        with self._lock:
            if camera in self._held and self._conn is not None and not self._conn.closed:
                return True  # advisory locks stack: never take one twice
            got = bool(self._run("SELECT pg_try_advisory_lock(%s)", (lock_key(camera),))[0][0])
            if got:
                self._held.add(camera)
            return got

    def unlock(self, camera: str) -> None:
        with self._lock:
            if camera in self._held and self._conn is not None:
                self._held.discard(camera)
                self._run("SELECT pg_advisory_unlock(%s)", (lock_key(camera),))

    def held(self) -> frozenset[str]:
        """The cameras whose lock this session holds (empty after a lost session)."""
        with self._lock:
            return frozenset(self._held) if self._conn is not None else frozenset()

    def locked(self, cameras: Iterable[str]) -> set[str]:
        """Those of ``cameras`` whose lock some session of this database holds (this one's
        included)."""
        wanted = {_halves(lock_key(name)): name for name in cameras}
        if not wanted:
            return set()
        with self._lock:
            rows = self._run(
                "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = "
                "'advisory' AND objsubid = 1 AND granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())")
        return {wanted[(int(c), int(o))] for c, o in rows if (int(c), int(o)) in wanted}

    def close(self) -> None:
        with self._lock:
            self._drop()
