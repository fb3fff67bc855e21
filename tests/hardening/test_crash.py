"""Crash consistency: SIGKILL the Archiver at random moments of heavy concurrent ingest.

After every restart: each acknowledged (201) segment is there and decrypts for its viewer, a
torn or unacknowledged tail was cut, the index matches the files record for record, the
manifest chains are unbroken, and a minute key never outlives a restart (so the sequence
numbers reused after a cut tail never meet the same key twice).

CI runs a few kills; ``python -m tests.hardening.longrun crash`` runs >= 20.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.fixtures.viewer import login
from tests.hardening.conftest import (
    Uploader,
    WrappedServer,
    assert_nonces_unique,
    check_archive,
    check_played,
    open_index_copy,
    play_camera,
    scale,
    wait_for,
)

CAMERAS = 6


def _recoveries(data_dir: Path) -> list[list[str]]:
    """The recovery actions the Archiver reported at each start (its audit log)."""
    entries = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
    return [e.get("recovery", []) for e in entries if e["action"] == "start"]


def _segment_keys(data_dir: Path) -> dict[tuple[str, int], bytes]:
    db = open_index_copy(data_dir)
    try:
        return {(cam, seq): key for cam, seq, key in
                db.execute("SELECT camera, seq, key_id FROM segments")}
    finally:
        db.close()


def test_sigkill_during_concurrent_ingest_loses_nothing_acknowledged(tmp_path: Path,
                                                                     make_viewer) -> None:
    cycles = scale("CRASH_CYCLES", 3)
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    print(f"crash test: {cycles} kills, seed {seed}")
    viewer = make_viewer("crash-viewer")
    server = WrappedServer(tmp_path / "archiver").start()
    tokens = {f"cam{i}": server.add_camera(f"cam{i}") for i in range(CAMERAS)}
    server.add_viewer(viewer.pem, "all")
    uploaders: dict[str, list[Uploader]] = {cam: [] for cam in tokens}
    seen_keys: dict[tuple[str, int], bytes] = {}
    cut_tails = 0
    try:
        for cycle in range(cycles):
            # Two uploaders on cam0 (contention on one camera), one on each other camera.
            running = [Uploader(server.url, cam, token, number=cycle * 10 + n).start()
                       for cam, token in tokens.items() for n in range(2 if cam == "cam0" else 1)]
            for uploader in running:
                uploaders[uploader.camera].append(uploader)
            # A random point of the ingest, counted from its first acknowledgement: on a loaded
            # machine the first segments (every chain starting, the token signing) can take
            # longer than the shortest draw, and a kill before any ack tests nothing.
            wait_for(lambda: any(u.acked for u in running), 60, "a first segment acknowledged")
            time.sleep(rng.uniform(0.3, 2.5))
            server.kill()
            for uploader in running:
                uploader.stop()

            server = WrappedServer(server.data_dir, port=server.port).start()
            # Nothing to repair by hand: the server restarted by itself, and the files and the
            # index agree record for record.
            recovery = _recoveries(server.data_dir)[-1]
            assert not [a for a in recovery if "DAMAGED" in a], recovery
            cut_tails += bool(recovery)
            report = check_archive(server.data_dir)
            assert_nonces_unique(report)
            # Every segment archived after a restart uses a minute key never seen before it.
            keys = _segment_keys(server.data_dir)
            before = set(seen_keys.values())
            new = {k: v for k, v in keys.items() if k not in seen_keys}
            assert not {v for v in new.values()} & before, "a minute key survived a restart"
            assert all(keys[k] == v for k, v in seen_keys.items())
            seen_keys = keys

            session = login(server.url, viewer.identity)
            for cam in tokens:
                if not any(u.acked for u in uploaders[cam]):
                    continue  # killed before this camera's first answer: nothing to check yet
                played = play_camera(server.url, viewer.identity, cam, session)
                check_played(played, uploaders[cam])
                assert played.ended
        acked = sum(len(u.acked) for us in uploaders.values() for u in us)
        print(f"crash test: {cycles} kills, {acked} acknowledged segments all present, "
              f"{report.segments} segments in the archive, {cut_tails} restarts cut a tail")
        # Ingest works after the last restart.
        assert server.put_segment("cam1", tokens["cam1"], b"after the crashes") == 201
    finally:
        server.stop()


def test_a_torn_tail_is_cut_and_reported(tmp_path: Path, make_viewer) -> None:
    """Power loss can leave half a record at the end of a file (a crash of the process alone
    cannot: the kernel finishes its writes). Simulated by appending one: the restart cuts it
    back to the last acknowledged byte, says so in the audit log, and serves everything."""
    viewer = make_viewer("torn-viewer")
    server = WrappedServer(tmp_path / "archiver").start()
    try:
        token = server.add_camera("cam1")
        server.add_viewer(viewer.pem, ["cam1"])
        for i in range(3):
            assert server.put_segment("cam1", token, bytes([i]) * 5000) == 201
    finally:
        server.kill()
    (path,) = (server.data_dir / "archive" / "cam1").glob("*.fsa")
    size = path.stat().st_size
    # The start of a segment record claiming 100 000 bytes, of which 37 made it to the disk.
    with open(path, "ab") as fh:
        fh.write(bytes([4]) + (100_000).to_bytes(4, "big") + b"\x07" * 37)
    server = WrappedServer(server.data_dir, port=server.port).start()
    try:
        assert path.stat().st_size == size
        assert _recoveries(server.data_dir)[-1] == [
            f"cut 42 unacknowledged bytes from the end of {path.relative_to(server.data_dir / 'archive')}"]
        check_archive(server.data_dir)
        assert server.put_segment("cam1", token, b"\x09" * 5000) == 201
        played = play_camera(server.url, viewer.identity, "cam1")
        assert [p.data[0] for p in played.plaintexts] == [0, 1, 2, 9] and played.ended
    finally:
        server.stop()
