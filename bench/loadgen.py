"""Simulated cameras: concurrent HTTP PUTs of segments to the Archiver, in a process of its own
so it does not share the Archiver's GIL.

    python -m bench.loadgen --url http://127.0.0.1:PORT --cameras cams.json \\
        --concurrency 16 --warmup 1 --seconds 8 --sizes 1M,2M,4M

Cameras (``{"name": "token", ...}``) take turns: a worker takes the next idle camera, PUTs one
segment as ``/ingest/CAM/segNNN.ts`` and hands the camera back once the Archiver acknowledged it
(201: encrypted, fsynced, indexed), so each camera has at most one segment in flight and its
segments stay in order, as with a real camera. The HTTP client is a minimal HTTP/1.1 writer on
asyncio streams (keep-alive, Content-Length bodies sent from memory without copies): it costs
the shared CPU far less than a full client library would. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Tally:
    window_start: float = 0.0
    window_end: float = 0.0
    bytes: int = 0
    segments: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    timeline: list[int] = field(default_factory=list)  # bytes acknowledged per second


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def put(self, path: str, token: str, body: bytes) -> int:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"PUT {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: video/mp2t\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head)
        self.writer.write(body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("the Archiver closed the connection")
        status = int(status_line.split()[1])
        length = 0
        close = False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        if length:
            await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.writer = None
        return status


def make_segments(sizes: list[int], count: int, seed: int) -> list[bytes]:
    """Incompressible segments (video is), sizes drawn uniformly between min and max."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    low, high = min(sizes), max(sizes)
    return [rng.randbytes(rng.randint(low, high) if low != high else low) for _ in range(count)]


async def run(url: str, cameras: dict[str, str], concurrency: int, warmup: float, seconds: float,
              segments: list[bytes]) -> Tally:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: asyncio.Queue[str] = asyncio.Queue()
    names = list(cameras)
    random.Random(1).shuffle(names)  # noqa: S311
    for name in names:
        idle.put_nowait(name)
    counters = dict.fromkeys(cameras, 0)
    tally = Tally()
    loop = asyncio.get_running_loop()
    start = loop.time()
    tally.window_start = start + warmup
    tally.window_end = tally.window_start + seconds
    tally.timeline = [0] * max(1, int(seconds + 0.999))
    pick = random.Random(2)  # noqa: S311

    async def worker() -> None:
        conn = Connection(host, port)
        while loop.time() < tally.window_end:
            camera = await idle.get()
            body = segments[pick.randrange(len(segments))]
            path = f"/ingest/{camera}/seg{counters[camera]:06d}.ts"
            counters[camera] += 1
            sent = loop.time()
            try:
                status = await conn.put(path, cameras[camera], body)
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                status = -1
                conn.writer = None
                tally.errors[type(exc).__name__] = tally.errors.get(type(exc).__name__, 0) + 1
            done = loop.time()
            idle.put_nowait(camera)
            if status == 201:
                # A segment counts when it was acknowledged inside the window.
                if tally.window_start <= done <= tally.window_end:
                    tally.bytes += len(body)
                    tally.segments += 1
                    tally.latencies.append(done - sent)
                    second = min(len(tally.timeline) - 1, int(done - tally.window_start))
                    tally.timeline[second] += len(body)
            elif status != -1:
                tally.errors[str(status)] = tally.errors.get(str(status), 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--cameras", type=Path, required=True, help="JSON {name: token}")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--sizes", default="1048576,4194304",
                        help="bytes; segments are drawn uniformly between min and max")
    parser.add_argument("--pool", type=int, default=8, help="distinct segments kept in memory")
    parser.add_argument("--seed", type=int, default=6)
    args = parser.parse_args(argv)
    cameras = json.loads(args.cameras.read_text())
    sizes = [int(s) for s in args.sizes.split(",")]
    segments = make_segments(sizes, args.pool, args.seed)
    cpu0 = time.process_time()
    tally = asyncio.run(run(args.url, cameras, args.concurrency, args.warmup, args.seconds,
                            segments))
    window = tally.window_end - tally.window_start
    lat = sorted(tally.latencies)
    json.dump({
        "bytes": tally.bytes, "segments": tally.segments, "seconds": window,
        "bytes_per_s": tally.bytes / window, "errors": tally.errors,
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
        "loadgen_cpu_s": time.process_time() - cpu0,
        "timeline_bytes_per_s": tally.timeline,
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
