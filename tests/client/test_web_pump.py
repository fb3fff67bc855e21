"""The browser viewer's pump (client/web/server.py): a stream thread that finishes after the
viewer's event loop has closed (Ctrl-C while a tile waits for a camera) ends quietly. Before,
its last event raised "Event loop is closed" in the thread, and the viewer printed a
traceback on a clean Ctrl-C (seen once in a loaded run of tests/client/test_web.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from client.web.backend import TileRequest
from client.web.server import pump


class _PageThatLeaves:
    """The page's side of the websocket: it is gone at once."""

    async def receive(self) -> dict[str, str]:
        return {"type": "websocket.disconnect"}

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


class _StreamOutlivingTheLoop:
    """A backend whose stream sees the stop, then needs a moment (a live request in flight)
    and still has an event to give when it ends."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ended = threading.Event()

    def stream(self, request: TileRequest, emit: Callable[[Any], None],
               stopped: threading.Event, on_session: Callable[[Any], None]) -> None:
        try:
            stopped.wait(30)
            self.release.wait(30)
            emit({"type": "status", "text": "late"})
        finally:
            self.ended.set()


def test_a_stream_ending_after_the_viewer_stopped_raises_nothing() -> None:
    failures: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = failures.append
    try:
        backend = _StreamOutlivingTheLoop()
        asyncio.run(pump(_PageThatLeaves(), backend,  # type: ignore[arg-type]
                         TileRequest("lobby", live=True)))
        # The loop is closed now; the stream thread ends after it.
        stream = next(t for t in threading.enumerate() if t.name == "stream-lobby")
        backend.release.set()
        stream.join(30)
        assert backend.ended.is_set() and not stream.is_alive()
    finally:
        threading.excepthook = previous
    assert [str(f.exc_value) for f in failures] == []
