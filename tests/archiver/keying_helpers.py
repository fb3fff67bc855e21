"""The KeyManager in process, for the key tests (tests/archiver/test_revocation_keys.py,
tests/archiver/test_chain_starts.py): a real SQLite index and site directory, the vectors'
viewer certificates (their private keys open what is wrapped for them) and an injected clock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
from archiver.directory import open_directory
from archiver.keying import KeyManager
from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    max_ratchet_index,
    open_epoch_opener,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.format import ChainRecord, EpochOpener, decode_record
from keyservice.identity import OaepHash, fingerprint
from tests.vectors import generate as vectors

KEYS = Path(__file__).parents[1] / "vectors" / "keys"
DAY_MS = 86_400_000
PERIOD_MS = 60_000
T0 = 40 * DAY_MS  # a UTC day's start
CAMERAS = ["cam0", "cam1", "cam2"]
PREPARE_THREAD = "fusion-chain-prepare"


class Index(Database):
    """The index and the site directory on one file, as an Archiver without --directory has
    them: key material in one, the viewers in the other."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / "archiver.sqlite3")
        self.directory = open_directory(None, data_dir)

    def close(self) -> None:
        self.directory.close()
        super().close()


def add_viewers(db: Index) -> tuple[str, str]:
    fps = []
    for name in ("a", "b"):
        cert = x509.load_pem_x509_certificate(
            (KEYS / f"TEST-ONLY-viewer-{name}.cert.pem").read_bytes())
        fps.append(fingerprint(cert).hex())
        db.directory.add_viewer(fps[-1], cert.public_bytes(Encoding.DER), f"viewer-{name}",
                                int(OaepHash.SHA256), None, 0)
    return fps[0], fps[1]


def manager(tmp_path: Path, clock: list[int],
            journal: Callable[[str, int, list[bytes]], None] | None = None
            ) -> tuple[KeyManager, Index, str, str]:
    """A KeyManager (with its preparation process) on a fresh index, an injected clock and
    the vectors' viewers a and b authorized on every camera: (keys, index, a, b)."""
    db = Index(tmp_path)
    revoked, kept = add_viewers(db)
    return KeyManager(db, 60, journal=journal, clock=lambda: clock[0],
                      directory=db.directory), db, revoked, kept


def chain_of(key_id: bytes) -> bytes:
    return split_key_id(key_id)[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    done = threading.Event()
    for _ in range(int(timeout * 20)):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def opens(db: Index, name: str, fp: str, key_id: bytes, key: bytes) -> bool:
    """Whether viewer ``name`` (the vectors' private key) derives ``key`` from its record."""
    chain_id, step = split_key_id(key_id)
    found = db.chain_record(fp, chain_id)
    if found is None:
        return False
    record = decode_record(found[1])
    opener = decode_record(db.epoch_opener(found[0]) or b"")
    assert isinstance(record, ChainRecord) and isinstance(opener, EpochOpener)
    identity = vectors.load_identity(name)
    kek = KekRatchet(found[0], open_epoch_opener(identity, opener)).kek_at(record.ratchet_index)
    deriver = ChainDeriver(record, unwrap_chain_record(kek, record, bytes.fromhex(fp)),
                           max_ratchet_index(60))
    return deriver.key(step) == key
