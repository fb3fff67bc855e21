"""KeyManager in process: key chains, epochs and the order of clock readings.

Viewer certificates here are the test-only software ones of tests/vectors/keys: the Archiver
only ever handles public certificates, so no token is involved on this side.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.keying import KeyManager
from keyservice.crypto import split_key_id
from keyservice.format import DataStream
from keyservice.identity import OaepHash, fingerprint
from tests.archiver.keying_helpers import Index

KEYS = Path(__file__).parents[1] / "vectors" / "keys"
DAY_MS = 86_400_000


def _manager(tmp_path: Path, period_s: int = 60) -> tuple[KeyManager, Index, str]:
    db = Index(tmp_path)
    cert = x509.load_pem_x509_certificate((KEYS / "TEST-ONLY-viewer-a.cert.pem").read_bytes())
    fp = fingerprint(cert).hex()
    db.directory.add_viewer(fp, cert.public_bytes(Encoding.DER), "viewer-a",
                            int(OaepHash.SHA256), None, 0)
    return KeyManager(db, period_s, directory=db.directory), db, fp


def test_a_late_clock_reading_after_a_newer_rotation_still_gets_a_key(tmp_path: Path) -> None:
    # Segments read the clock before they wait for the key lock, so a segment of the previous
    # period can rotate after one of the next period did. The viewer's KEK ratchet has already
    # moved past it (older KEKs are erased), so a new epoch must start instead of failing.
    keys, db, fp = _manager(tmp_path)
    t = 10 * DAY_MS + 59_900
    newer = keys.key_for("a", DataStream.VIDEO, t + 200)
    older = keys.key_for("b", DataStream.VIDEO, t)
    assert newer.key_id != older.key_id
    assert db.chain_record(fp, split_key_id(older.key_id)[0]) is not None
    assert keys.epochs_started == 2
    # The same on one camera: its chain's state is past the late period, so a new chain starts.
    again = keys.key_for("a", DataStream.VIDEO, t)
    assert split_key_id(again.key_id)[0] != split_key_id(newer.key_id)[0]
    assert keys.chains_started == 3


def test_one_chain_per_day_and_a_new_one_on_authorization_change(tmp_path: Path) -> None:
    keys, db, fp = _manager(tmp_path, period_s=60)
    start = 20 * DAY_MS
    made = [keys.key_for("cam", DataStream.VIDEO, start + minute * 60_000)
            for minute in range(30)]
    # A new minute key every period, all of one chain: one chain record for 30 minutes.
    assert keys.rotations == 30 and len({k.key for k in made}) == 30
    assert {split_key_id(k.key_id)[0] for k in made} == {split_key_id(made[0].key_id)[0]}
    assert [split_key_id(k.key_id)[1] for k in made] == list(range(30))
    assert keys.chains_started == 1 and keys.key_records_written == 1
    assert keys.epochs_started == 1  # one RSA-OAEP opener for 30 minutes
    next_day = keys.key_for("cam", DataStream.VIDEO, start + DAY_MS)
    assert keys.epochs_started == 2 and keys.chains_started == 2  # the UTC day boundary
    assert split_key_id(next_day.key_id)[1] == 0
    keys.authorization_changed(fp, None)
    keys.key_for("cam", DataStream.VIDEO, start + DAY_MS + 1)
    assert keys.epochs_started == 3 and keys.chains_started == 3 and keys.rotations == 32
    assert keys.key_records_written == 3
    db.directory.revoke_viewer(fp, start + DAY_MS + 2)
    keys.authorization_changed(fp, None)
    revoked_key = keys.key_for("cam", DataStream.VIDEO, start + DAY_MS + 3)
    assert db.chain_record(fp, split_key_id(revoked_key.key_id)[0]) is None
    assert keys.chains_started == 4 and keys.key_records_written == 3


def test_chain_records_per_viewer_per_camera_per_day(tmp_path: Path) -> None:
    """Issue 14: ~1 chain record per viewer per camera per day (+1 per authorization change),
    counted in the database, over a whole simulated day of 5 cameras with 60 s periods."""
    keys, db, fp = _manager(tmp_path, period_s=60)
    start = 30 * DAY_MS
    cameras = [f"cam{i}" for i in range(5)]
    for minute in range(1440):
        if minute == 600:  # one authorization change, on cam0 only
            keys.authorization_changed(fp, ["cam0"])
        for camera in cameras:
            keys.key_for(camera, DataStream.VIDEO, start + minute * 60_000 + 10)
    rows = db._query("SELECT camera, COUNT(*) FROM chain_records JOIN chains USING (chain_id)"
                     " WHERE fingerprint=? GROUP BY camera", (fp,))
    assert dict(rows) == {"cam0": 2, "cam1": 1, "cam2": 1, "cam3": 1, "cam4": 1}
    assert keys.rotations == 1440 * 5 and keys.epochs_started == 2


def test_an_expired_certificate_gets_no_key_and_is_reported_once(tmp_path: Path) -> None:
    """Expiry is checked at every chain start, with the clock the chain starts at, and a chain
    ends when a recipient's certificate expires."""
    keys, db, fp = _manager(tmp_path)
    cert = x509.load_der_x509_certificate(db.directory.viewer(fp).certificate)
    end_ms = int(cert.not_valid_after_utc.timestamp() * 1000)
    reported: list[tuple[str, int]] = []
    keys.on_expired = lambda fingerprint, not_after: reported.append((fingerprint, not_after))
    last = keys.key_for("a", DataStream.VIDEO, end_ms - 60_000)
    assert db.chain_record(fp, split_key_id(last.key_id)[0]) is not None
    for offset in (60_000, 120_000):
        # The chain ends with its first recipient's certificate: the next one leaves it out.
        after = keys.key_for("a", DataStream.VIDEO, end_ms + offset)
        assert db.chain_record(fp, split_key_id(after.key_id)[0]) is None
    assert reported == [(fp, end_ms)]
