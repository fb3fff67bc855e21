"""KeyManager in process: rotation, epochs and the order of clock readings.

Viewer certificates here are the test-only software ones of tests/vectors/keys: the Archiver
only ever handles public certificates, so no token is involved on this side.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.db import Database
from archiver.keying import KeyManager
from keyservice.format import DataStream
from keyservice.identity import OaepHash, fingerprint

KEYS = Path(__file__).parents[1] / "vectors" / "keys"
DAY_MS = 86_400_000


def _manager(tmp_path: Path, period_s: int = 60) -> tuple[KeyManager, Database, str]:
    db = Database(tmp_path / "index.sqlite3")
    cert = x509.load_pem_x509_certificate((KEYS / "TEST-ONLY-viewer-a.cert.pem").read_bytes())
    fp = fingerprint(cert).hex()
    db.add_viewer(fp, cert.public_bytes(Encoding.DER), "viewer-a", int(OaepHash.SHA256), None, 0)
    return KeyManager(db, period_s), db, fp


def test_a_late_clock_reading_after_a_newer_rotation_still_gets_a_key(tmp_path: Path) -> None:
    # Segments read the clock before they wait for the key lock, so a segment of the previous
    # period can rotate after one of the next period did. The viewer's KEK ratchet has already
    # moved past it (older KEKs are erased), so a new epoch must start instead of failing.
    keys, db, fp = _manager(tmp_path)
    t = 10 * DAY_MS + 59_900
    newer = keys.key_for("a", DataStream.VIDEO, t + 200)
    older = keys.key_for("b", DataStream.VIDEO, t)
    assert newer.key_id != older.key_id
    assert db.key_record(fp, older.key_id) is not None
    assert keys.epochs_started == 2


def test_one_epoch_per_day_and_a_new_one_on_authorization_change(tmp_path: Path) -> None:
    keys, db, fp = _manager(tmp_path, period_s=60)
    start = 20 * DAY_MS
    for minute in range(30):
        keys.key_for("cam", DataStream.VIDEO, start + minute * 60_000)
    assert keys.rotations == 30 and keys.key_records_written == 30
    assert keys.epochs_started == 1  # one RSA-OAEP opener for 30 minutes
    keys.key_for("cam", DataStream.VIDEO, start + DAY_MS)
    assert keys.epochs_started == 2  # the UTC day boundary ends the epoch
    keys.authorization_changed(fp, None)
    keys.key_for("cam", DataStream.VIDEO, start + DAY_MS + 1)
    assert keys.epochs_started == 3 and keys.rotations == 32
    db.revoke_viewer(fp, start + DAY_MS + 2, delete_key_streams=False)
    keys.authorization_changed(fp, None)
    revoked_key = keys.key_for("cam", DataStream.VIDEO, start + DAY_MS + 3)
    assert db.key_record(fp, revoked_key.key_id) is None


def test_an_expired_certificate_gets_no_key_and_is_reported_once(tmp_path: Path) -> None:
    """Expiry is checked at every key wrap, with the clock the key is made at."""
    keys, db, fp = _manager(tmp_path)
    cert = x509.load_der_x509_certificate(db.viewer(fp).certificate)
    end_ms = int(cert.not_valid_after_utc.timestamp() * 1000)
    reported: list[tuple[str, int]] = []
    keys.on_expired = lambda fingerprint, not_after: reported.append((fingerprint, not_after))
    last = keys.key_for("a", DataStream.VIDEO, end_ms - 60_000)
    assert db.key_record(fp, last.key_id) is not None
    for offset in (60_000, 120_000):
        after = keys.key_for("a", DataStream.VIDEO, end_ms + offset)
        assert db.key_record(fp, after.key_id) is None
    assert reported == [(fp, end_ms)]
