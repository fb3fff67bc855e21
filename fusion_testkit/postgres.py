"""A real PostgreSQL server for tests: a throwaway cluster (initdb, pg_ctl) on 127.0.0.1 and a
free port, a database per test, stopped and removed at the end.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster is made and run as
the ``postgres`` system user (``runuser -u postgres --``) in a directory that user owns;
otherwise as the current user. Password authentication (SCRAM) on TCP only, so a test's URL
carries a password like a site's does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

__all__ = ["PostgresCluster", "PostgresFailed", "PostgresUnavailable", "find_postgres_bin"]

_SEARCH = Path("/usr/lib/postgresql")
SUPERUSER = "fusion"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) on this machine."""


class PostgresFailed(RuntimeError):
    """initdb or pg_ctl failed; the message carries what it said."""


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb (Debian's layout), else initdb on PATH."""
    versions = sorted((p for p in _SEARCH.glob("*/bin") if (p / "initdb").is_file()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresCluster:
    root: Path
    bin_dir: Path
    port: int
    password: str
    run_as: str | None  # the system user running the server (None: the current user)

    @classmethod
    def start(cls, bin_dir: Path | None = None, timeout_s: int = 120) -> PostgresCluster:
        bin_dir = bin_dir or find_postgres_bin()
        if bin_dir is None:
            raise PostgresUnavailable("PostgreSQL's initdb was not found (Debian package "
                                      "'postgresql').")
        if not stat.S_ISCHR(os.stat(os.devnull).st_mode):
            # initdb's shell redirects to it; as the postgres user, a regular file left there
            # (something renamed a file over the device) cannot be written.
            raise PostgresFailed(f"{os.devnull} is not the null device but a regular file; "
                                 "restore it (mknod -m 666 /dev/null c 1 3) to run PostgreSQL.")
        run_as = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="fusion-pg-"))  # in /tmp: the postgres user can reach it
        password = secrets.token_urlsafe(18)
        (root / "pwfile").write_text(password + "\n")
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            for path in (root, root / "pwfile"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        cluster = cls(root, bin_dir, 0, password, run_as)
        try:
            cluster._run("initdb", "-D", str(root / "data"), "-U", SUPERUSER,
                         "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                         f"--pwfile={root / 'pwfile'}", "--no-sync", "-E", "UTF8",
                         "--locale=C", timeout=timeout_s)
            for _ in range(5):  # a free port can be taken between the probe and the bind
                cluster.port = _free_port()
                try:
                    cluster._pg_ctl_start(timeout_s)
                    break
                except PostgresFailed:
                    if "already in use" not in cluster.log():
                        raise
            else:
                raise RuntimeError("PostgreSQL found no free port")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _pg_ctl_start(self, timeout_s: int) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                  "-w", "-t", str(timeout_s), "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} "
                  f"-c unix_socket_directories={self.root} -c fsync=off "
                  "-c max_connections=200", "start", timeout=timeout_s + 10)

    def pause(self, timeout_s: int = 60) -> None:
        """Stop the server as an outage does (``pg_ctl stop -m fast``: clients are cut off,
        new connections refused), keeping its data and port for ``resume``. Only on a
        cluster of a test's own: every database of the cluster goes down."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "-t",
                  str(timeout_s), "stop", timeout=timeout_s + 10)

    def resume(self, timeout_s: int = 60) -> None:
        """Start a paused server again on the same port (returns once it accepts)."""
        self._pg_ctl_start(timeout_s)

    def _run(self, tool: str, *args: str, timeout: int) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            # What PostgreSQL said, in the failure: "initdb failed" alone helps nobody.
            said = " ".join(done.stderr.decode(errors="replace").split())[-1500:]
            raise PostgresFailed(f"PostgreSQL's {tool} failed (exit {done.returncode}): {said}")

    def log(self) -> str:
        try:
            return (self.root / "log").read_text(errors="replace")
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return (f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@127.0.0.1:"
                f"{self.port}/{database}")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name of ours, hex only
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (immediately: test data) and remove its directory."""
        if (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, PostgresFailed):
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w",
                          "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
