"""A TCP proxy a test puts between an Archiver and PostgreSQL, to cut the link between them
(issue 22): ``cut()`` closes the listening socket and every connection through it (both ends see
the link go: what a crashed router or a pulled cable with a reset looks like), ``restore()``
listens again on the same port; ``black_hole()`` stops forwarding but keeps every socket open
(a link that silently drops packets: only keepalives tell).

An asyncio loop in a thread of the test's process; nothing is sent anywhere but ``target``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from urllib.parse import urlsplit

__all__ = ["TcpProxy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or _free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self.connections = 0  # accepted since the start

    @classmethod
    def to_postgres(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        return cls(parts.hostname, parts.port)

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` through this proxy."""
        parts = urlsplit(postgres_url)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{self.port}"
        return parts._replace(netloc=netloc).geturl()

    # --- control (from the test's thread) -------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def restore(self) -> None:
        """Listen (again) and forward."""
        self._forwarding.set()
        self._call(self._listen())

    def cut(self) -> None:
        """The link goes: no new connection is accepted (refused) and every open one is
        closed at both ends."""
        self._call(self._close_all())

    def black_hole(self) -> None:
        """Stop forwarding bytes, keep every socket open."""
        self._forwarding.clear()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._close_all())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    # --- the loop's side ------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                # A reset, not a FIN: both ends learn at once that the link is gone.
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while not self._forwarding.is_set():  # black hole: hold it, keep the socket
                    await asyncio.sleep(0.1)
                    if writer not in self._writers:
                        return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
