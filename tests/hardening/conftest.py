"""Shared parts of the hardening tests: a server that can run under a wrapper (a private mount
namespace), an independent checker of the archive against its index, camera uploaders that
remember exactly what was acknowledged, and memory readings from /proc.

The checker re-implements nothing of the Archiver: it reads the SQLite index and the archive
files with the wire-format decoder only, so a bug in the Archiver's own bookkeeping cannot hide.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from keyservice.crypto import chain_key_id, segment_nonce
from keyservice.format import (
    RECORD_HEADER_LEN,
    ChainRecipients,
    Manifest,
    Segment,
    decode_record,
    segment_digest,
)
from keyservice.identity import Identity
from keyservice.token import Token, TokenIdentity
from tests.archiver.conftest import make_viewer  # noqa: F401  (fixture, re-exported)
from tests.fixtures.server import ArchiverServer
from tests.fixtures.tokens import TokenHandle, enroll_viewer
from tests.fixtures.viewer import Played, fetch, login, play

ZERO_HASH = bytes(32)


def scale(name: str, default: int) -> int:
    """CI runs the short versions; tests.hardening.longrun raises these through the environment."""
    return int(os.environ.get(f"FUSION_HARDENING_{name}", default))


# --- the server ---------------------------------------------------------------------------------
@dataclass
class WrappedServer(ArchiverServer):
    """ArchiverServer, optionally started under a wrapper command (e.g. ``unshare --mount``)
    and a setup script run just before it (e.g. mounting a small tmpfs on the data directory).
    ``path()`` is where this process sees the server's files: through /proc/PID/root when the
    server lives in its own mount namespace."""

    wrapper: tuple[str, ...] = ()
    setup_script: str = ""

    def command(self) -> list[str]:
        if not self.wrapper:
            return super().command()
        # exec: the wrapper's pid becomes the server's pid (memory readings, kill).
        script = f'{self.setup_script}\nexec "$@"'
        return [*self.wrapper, "sh", "-ec", script, "sh", *super().command()]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def admin_token(self) -> str:
        return self.path("admin-token").read_text().strip()

    def path(self, relative: str = "") -> Path:
        """A path of the server's data directory as this process can reach it."""
        base = Path(f"/proc/{self.pid}/root{self.data_dir}") if self.wrapper else self.data_dir
        return base / relative if relative else base


def memory_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# --- viewers --------------------------------------------------------------------------------------
@dataclass
class TokenViewer:
    name: str
    pem: Path
    identity: TokenIdentity


def enroll_many(token: TokenHandle, names: list[str]) -> list[TokenViewer]:
    """Several viewer identities on one SoftHSM token (one token init instead of many)."""
    viewers = []
    for name in names:
        pem = enroll_viewer(token, name, bits=2048)
        viewers.append(TokenViewer(name, pem, Token.open(token.uri).identity(name)))
    return viewers


def play_camera(url: str, identity: Identity, camera: str, session: str | None = None) -> Played:
    session = session or login(url, identity)
    response = fetch(url, session, camera)
    assert response.status_code == 200, response.text
    return play(identity, response.content)


# --- cameras that remember what was acknowledged ------------------------------------------------
def payload(camera: str, uploader: int, number: int, size: int) -> bytes:
    """Unique, self-describing segment content; the random tail keeps it incompressible."""
    head = f"{camera}/{uploader}/{number}/".encode()
    return head + os.urandom(max(0, size - len(head)))


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class Uploader:
    """One camera uploader (a thread): PUTs segments one after the other and records, in send
    order, each one's fate: acknowledged (201), refused (other status), or unknown (no answer,
    e.g. the server was killed while it was in flight)."""

    url: str
    camera: str
    token: str
    number: int = 0
    sizes: tuple[int, int] = (1_000, 200_000)
    interval_s: float = 0.0
    stop_on_connection_error: bool = True
    sent: list[tuple[bytes, str]] = field(default_factory=list)   # (digest, fate) in send order
    statuses: Counter[int] = field(default_factory=Counter)
    error_bodies: list[str] = field(default_factory=list)
    max_put_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def acked(self) -> list[bytes]:
        return [d for d, fate in self.sent if fate == "acked"]

    @property
    def unknown(self) -> list[bytes]:
        return [d for d, fate in self.sent if fate == "unknown"]

    def start(self) -> Uploader:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"upload-{self.camera}-{self.number}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), f"uploader {self.camera} hung"

    def put_one(self, client: httpx.Client, size: int | None = None) -> int | None:
        index = len(self.sent)
        low, high = self.sizes
        size = size or low + int.from_bytes(os.urandom(4)) % (high - low + 1)
        data = payload(self.camera, self.number, index, size)
        started = time.monotonic()
        try:
            response = client.put(f"{self.url}/ingest/{self.camera}/s{index}.ts", content=data,
                                  headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError:
            self.sent.append((digest(data), "unknown"))
            return None
        self.max_put_s = max(self.max_put_s, time.monotonic() - started)
        self.statuses[response.status_code] += 1
        if response.status_code == 201:
            self.sent.append((digest(data), "acked"))
        else:
            self.sent.append((digest(data), "refused"))
            if len(self.error_bodies) < 5:
                self.error_bodies.append(response.text)
        return response.status_code

    def _run(self) -> None:
        # Generous timeout: it only bounds a hang, it does not measure speed.
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                status = self.put_one(client)
                if status is None and self.stop_on_connection_error:
                    return
                if self.interval_s:
                    self._stop.wait(self.interval_s)


def check_played(played: Played, uploaders: list[Uploader]) -> None:
    """What a viewer decrypted from a camera is exactly what was sent to it: every acknowledged
    segment, in each uploader's order, nothing twice, nothing refused; a segment whose answer
    was lost in a crash may be there or not."""
    got = [digest(p.data) for p in played.plaintexts]
    assert len(set(got)) == len(got), "a segment was archived twice"
    position = {d: i for i, d in enumerate(got)}
    for uploader in uploaders:
        missing = [d for d in uploader.acked if d not in position]
        assert not missing, f"{len(missing)} acknowledged segments of {uploader.camera} are lost"
        mine = [position[d] for d, _ in uploader.sent if d in position]
        assert mine == sorted(mine), f"segments of {uploader.camera} are out of order"
        refused = [d for d, fate in uploader.sent if fate == "refused" and d in position]
        assert not refused, "a refused segment was archived"
    known = {d for u in uploaders for d, _ in u.sent}
    assert set(got) <= known, "the archive holds a segment nobody sent"


# --- the archive against its index ----------------------------------------------------------------
@dataclass
class ArchiveReport:
    files: dict[str, int]
    segments: int
    manifests: int
    # (key id, nonce, camera, stream) of every segment in the files.
    nonces: list[tuple[bytes, bytes, str, int]]
    key_ids: set[bytes]


_HEADER = struct.Struct(">BI")


class _IndexCopy(sqlite3.Connection):
    directory: Path

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.directory, ignore_errors=True)


def open_index_copy(data_dir: Path) -> sqlite3.Connection:
    """A private copy of the SQLite index (with its WAL), taken while the server is idle;
    close it when done. A copy, because SQLite resolves symbolic links in paths, and
    /proc/PID/root (how this process reaches a server in its own mount namespace) would
    resolve to the wrong place."""
    copy = Path(tempfile.mkdtemp(prefix="index-copy-"))
    for suffix in ("", "-wal"):
        source = data_dir / f"archiver.sqlite3{suffix}"
        if source.exists():
            shutil.copyfile(source, copy / source.name)
    connection = sqlite3.connect(copy / "archiver.sqlite3", factory=_IndexCopy)
    connection.directory = copy
    return connection


def check_archive(data_dir: Path) -> ArchiveReport:
    """The index matches the files exactly, with nothing to repair by hand:
    - every archive file is a sequence of complete, well-formed records (no torn tail);
    - every record is indexed at its offset, and every index row points at a record of its kind
      carrying the same camera, stream, sequence number, capture time and key id;
    - each camera's manifests form one unbroken hash chain from sequence 0.
    On a failure, the index files are kept as evidence and the check is repeated once, and
    both results are reported (the test fails either way)."""
    try:
        return _check_archive_once(data_dir)
    except AssertionError as first:
        evidence = Path(tempfile.mkdtemp(prefix="archive-check-evidence-"))
        for suffix in ("", "-wal", "-shm"):
            source = data_dir / f"archiver.sqlite3{suffix}"
            if source.exists():
                shutil.copyfile(source, evidence / source.name)
        try:
            _check_archive_once(data_dir)
            verdict = "a second check right after passed"
        except AssertionError as second:
            verdict = f"a second check failed too: {second}"
        raise AssertionError(f"{first}\n({verdict}; index files kept in {evidence})") from None


def _check_archive_once(data_dir: Path) -> ArchiveReport:
    """One pass of check_archive."""
    db = open_index_copy(data_dir)
    try:
        # Named columns: the schema may grow.
        segments = {(r[0], r[1]): r[2:] for r in db.execute(
            "SELECT file, offset, camera, stream, seq, capture_ms, key_id, length, digest"
            " FROM segments")}
        manifests = {(r[0], r[1]): r[2:] for r in db.execute(
            "SELECT file, offset, camera, manifest_seq, length, hash FROM manifests")}
        grants = {(r[0], r[1]): r[2:] for r in db.execute(
            "SELECT file, offset, camera, key_id, length FROM chain_recipients")}
        chains = {}
        for camera, seq, hash_ in db.execute(
                "SELECT camera, manifest_seq, hash FROM manifests ORDER BY camera, manifest_seq"):
            chains.setdefault(camera, []).append((seq, hash_))
    finally:
        db.close()
    report = ArchiveReport({}, 0, 0, [], set())
    prev_hashes: dict[tuple[str, int], bytes] = {}
    archive = data_dir / "archive"
    for path in sorted(archive.glob("*/*.fsa")):
        rel = path.relative_to(archive).as_posix()
        data = path.read_bytes()
        report.files[rel] = len(data)
        pos = 0
        while pos < len(data):
            assert len(data) - pos >= RECORD_HEADER_LEN, f"torn record header at {rel}:{pos}"
            _, length = _HEADER.unpack_from(data, pos)
            end = pos + RECORD_HEADER_LEN + length
            assert end <= len(data), f"torn record at the end of {rel} (offset {pos})"
            record = decode_record(data[pos:end])
            if isinstance(record, Segment):
                row = segments.pop((rel, pos), None)
                assert row is not None, f"unindexed segment in {rel} at {pos}"
                assert (record.camera, int(record.stream), record.seq, record.capture_ms,
                        record.key_id, end - pos, segment_digest(record)) == row, (
                    f"index row differs at {rel}:{pos}")
                report.nonces.append((record.key_id, segment_nonce(record.seq), record.camera,
                                      int(record.stream)))
                report.key_ids.add(record.key_id)
                report.segments += 1
            elif isinstance(record, Manifest):
                row = manifests.pop((rel, pos), None)
                assert row is not None, f"unindexed manifest in {rel} at {pos}"
                assert row == (record.camera, record.manifest_seq, end - pos,
                               hashlib.sha256(data[pos:end]).digest()), (
                    f"index row differs at {rel}:{pos}")
                prev_hashes[(record.camera, record.manifest_seq)] = record.prev_hash
                report.manifests += 1
            elif isinstance(record, ChainRecipients):
                row = grants.pop((rel, pos), None)
                assert row == (record.camera, chain_key_id(record.chain_id, record.part),
                               end - pos), (
                    f"chain recipients in {rel} at {pos} not indexed as it is")
            else:
                raise AssertionError(f"unexpected {type(record).__name__} record in {rel}")
            pos = end
    assert not segments, f"{len(segments)} indexed segments are missing from the files"
    assert not manifests, f"{len(manifests)} indexed manifests are missing from the files"
    assert not grants, f"{len(grants)} indexed chain recipients are missing from the files"
    for camera, links in chains.items():
        assert [seq for seq, _ in links] == list(range(len(links))), f"gap in {camera}'s chain"
        previous = ZERO_HASH
        for seq, hash_ in links:
            assert prev_hashes[(camera, seq)] == previous, f"{camera}'s chain breaks at {seq}"
            previous = hash_
    return report


def assert_nonces_unique(report: ArchiveReport) -> None:
    """AES-GCM's one rule: a (key, nonce) pair never seals two segments; and a key serves
    exactly one camera data stream."""
    pairs = Counter((key_id, nonce) for key_id, nonce, _, _ in report.nonces)
    repeated = [pair for pair, count in pairs.items() if count > 1]
    assert not repeated, f"{len(repeated)} (key id, nonce) pairs repeat"
    owners: dict[bytes, set[tuple[str, int]]] = {}
    for key_id, _, camera, stream in report.nonces:
        owners.setdefault(key_id, set()).add((camera, stream))
    shared = [k for k, v in owners.items() if len(v) > 1]
    assert not shared, "a minute key sealed segments of two camera streams"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until condition holds; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
