"""The index's concurrency (issue 12, finding 6): reads do not serialize behind the writer's
lock, so a slow viewer query cannot hold up ingest's writes (16 parallel empty-range queries
pushed other cameras' upload latency from 6 ms to 2.5 s when one lock served both)."""

from __future__ import annotations

import threading
from pathlib import Path

from archiver.db import Database, HealthRow


def test_a_read_in_progress_does_not_hold_up_a_write(tmp_path: Path) -> None:
    db = Database(tmp_path / "index.sqlite3")
    reading = threading.Event()
    written = threading.Event()
    result: list[object] = []

    def slow_read() -> None:
        # A query that cannot finish until the write has happened: with one connection behind
        # one lock, the write would wait for it forever (the join below would time out).
        conn = db._reader()  # this thread's read connection
        conn.create_function("wait_for_write", 0, lambda: (reading.set(), written.wait(20))[1])
        result.append(db._query("SELECT wait_for_write(), COUNT(*) FROM camera_health"))

    reader = threading.Thread(target=slow_read)
    reader.start()
    assert reading.wait(20)
    writer = threading.Thread(target=lambda: (db.save_camera_health(
        [HealthRow("cam1", "recording", "", None, 1)]), written.set()))
    writer.start()
    writer.join(20)
    assert written.is_set(), "the write waited for a read in progress"
    reader.join(20)
    # The read saw the snapshot it started with (WAL): consistent, not half a write.
    assert result == [[(1, 0)]]
    assert [h.camera for h in db.camera_health()] == ["cam1"]
    db.close()


def test_each_thread_reads_through_its_own_connection(tmp_path: Path) -> None:
    db = Database(tmp_path / "index.sqlite3")
    seen: list[object] = []  # the connections themselves: kept alive, their ids stay unique
    threads = [threading.Thread(target=lambda: seen.append(db._reader())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(c) for c in seen}) == 4 and all(db._reader() is not c for c in seen)
    db.close()
