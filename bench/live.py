"""Live in the browser (issue 23): from the Archiver's acknowledgement of a segment to its first
frame on screen in Chromium, with the viewer's two remuxes in the same run, and the CPU time of
one remux of one segment each way.

    python -m bench.live                       # 2 rounds of 12 segments per remux, 320x240
    python -m bench.live --rounds 3 --segments 20 --size 640x360 --results live.json

All real, as tests/client/test_web.py::test_lists_cameras_and_plays_live measures it: a
production-mode Archiver (HTTPS under a site CA), a SoftHSM viewer token, `fusion-client view`
in a subprocess, Debian's Chromium driven by Playwright, and ffmpeg's 1-second H.264 segments
uploaded one a second. The page notes when each segment's first frame was presented
(requestVideoFrameCallback); the camera notes when the Archiver acknowledged its upload; one
machine, one clock. Rounds alternate the remux (ffmpeg, pyav, ffmpeg, ...) so that both see the
same load. The first segment of each round is left out (it starts playback).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, machine_line, median, percentile
from client.web.media import MOVFLAGS, REMUX_ENV, ffmpeg_remux, pyav_remux
from fusion_testkit.pki import SiteCa
from fusion_testkit.server import ArchiverServer, production_archiver
from fusion_testkit.tokens import enroll_viewer, new_softhsm_token, use_softhsm_dir

MODES = ("ffmpeg", "pyav")
RATE = 10


def make_chunks(directory: Path, seconds: int, size: str) -> list[bytes]:
    """1-second MPEG-TS chunks (a keyframe each second), as a camera's HLS segments."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", f"testsrc2=size={size}:rate={RATE}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(RATE), "-keyint_min",
         str(RATE), "-sc_threshold", "0", "-f", "segment", "-segment_time", "1",
         "-segment_format", "mpegts", str(directory / "c%03d.ts")], check=True)
    return [p.read_bytes() for p in sorted(directory.glob("c*.ts"))]


@dataclass
class Round:
    mode: str
    latencies: list[int] = field(default_factory=list)      # ack -> first frame, ms
    to_page: list[int] = field(default_factory=list)        # ack -> bytes in the page, ms
    on_page: list[int] = field(default_factory=list)        # bytes in the page -> frame, ms
    append: list[int] = field(default_factory=list)         # appendBuffer .. updateend, ms
    behind: list[float] = field(default_factory=list)       # playhead before the segment, s


def _viewer(server: ArchiverServer, token_uri: str, home: Path, mode: str) -> tuple[
        subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSION_PIN", "FUSION_TOKEN")}
    env.update({"FUSION_CLIENT_HOME": str(home), REMUX_ENV: mode})
    assert server.tls_ca is not None
    process = subprocess.Popen(
        [sys.executable, "-m", "client", "view", "--archiver", server.url, "--token", token_uri,
         "--no-browser", "--tls-ca", str(server.tls_ca), "--export-dir", str(home / "exports")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        cwd=REPO_ROOT)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 60)
    url = process.stdout.readline().decode().strip() if ready else ""
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        raise SystemExit(f"the viewer did not start: {process.communicate()[1].decode()}")
    return process, url


def _live_streams(server: ArchiverServer) -> int:
    path = server.data_dir / "audit.jsonl"
    return sum(1 for line in path.read_text().splitlines()
               if json.loads(line)["action"] == "stream.live")


def run_round(browser: Any, server: ArchiverServer, token_uri: str, camera: str, ingest: str,
              chunks: list[bytes], mode: str, home: Path) -> Round:
    process, url = _viewer(server, token_uri, home, mode)
    result = Round(mode)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_function("() => window.fusionViewer && window.fusionViewer.camerasLoaded",
                               timeout=60_000)
        before = _live_streams(server)
        page.evaluate("(c) => window.fusionViewer.watch(c)", camera)
        deadline = time.monotonic() + 60
        while _live_streams(server) == before and time.monotonic() < deadline:
            time.sleep(0.05)  # the live stream starts when the Archiver has the request
        acks: dict[int, int] = {}
        for data in chunks:
            status = server.put_segment(camera, ingest, data)
            acked = time.time_ns() // 1_000_000
            if status != 201:
                raise SystemExit(f"upload refused: HTTP {status}")
            index = len(acks)
            acks[index] = acked
            time.sleep(max(0.0, 1.0 - (time.time_ns() // 1_000_000 - acked) / 1000))
        page.wait_for_function(
            f"(c) => Object.keys(window.fusionViewer.tiles.get(c).firstFrames).length >= "
            f"{len(chunks) - 1}", arg=camera, timeout=60_000)
        state = page.evaluate("(c) => window.fusionViewer.tiles.get(c).snapshot()", camera)
        # The camera's segments are numbered on from earlier rounds: the first one shown here
        # is this round's chunk 0.
        seqs = sorted(int(s) for s in state["timing"])
        seq0 = seqs[0] if seqs else 0
        for seq_text, shown in state["firstFrames"].items():
            index = int(seq_text) - seq0
            if index < 1 or index not in acks:
                continue  # the first one starts playback
            timing = state["timing"].get(seq_text, {})
            result.latencies.append(shown - acks[index])
            if "received" in timing:
                result.to_page.append(timing["received"] - acks[index])
                result.on_page.append(shown - timing["received"])
            if "appended" in timing:
                result.append.append(timing["appended"] - timing["received"])
                result.behind.append(timing["behind"])
        page.close()
    finally:
        process.terminate()
        process.wait(20)
    return result


def remux_cpu(chunks: list[bytes], repeat: int) -> dict[str, float]:
    """CPU time (this process and its children) per segment for each remux, in ms."""
    out = {}
    for mode, remux in (("ffmpeg", ffmpeg_remux), ("pyav", pyav_remux)):
        remux(chunks[0])  # warm: imports, first process
        cpu0 = time.process_time()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.perf_counter()
        for _ in range(repeat):
            for data in chunks:
                remux(data)
        wall = time.perf_counter() - wall0
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (time.process_time() - cpu0) + (child.ru_utime - child0.ru_utime) + (
            child.ru_stime - child0.ru_stime)
        n = repeat * len(chunks)
        out[f"{mode}_cpu_ms"] = 1000 * cpu / n
        out[f"{mode}_wall_ms"] = 1000 * wall / n
    return out


def reused_output_cpu(chunks: list[bytes], repeat: int) -> float:
    """CPU ms per segment when one output container takes every segment of a stream (what a
    per-stream muxer would cost at best): the input is still opened per segment, the output
    once. The viewer does not do this (see docs/benchmarks.md); it bounds what it would save."""
    import av

    cpu0 = time.process_time()
    for _ in range(repeat):
        out = io.BytesIO()
        sink = av.open(out, mode="w", format="mp4", options={"movflags": MOVFLAGS})
        copy = None
        for data in chunks:
            with av.open(io.BytesIO(data), format="mpegts") as source:
                video = source.streams.video[0]
                if copy is None:
                    copy = sink.add_stream_from_template(video)
                for packet in source.demux(video):
                    if packet.dts is not None:
                        packet.stream = copy
                        sink.mux(packet)
        sink.close()
    return 1000 * (time.process_time() - cpu0) / (repeat * len(chunks))


def summary(values: list[int]) -> str:
    if not values:
        return "no figures"
    return (f"median {median(values):.0f} ms, p90 {percentile(values, 0.9):.0f} ms, "
            f"max {max(values)} ms (n={len(values)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per remux (default 2)")
    parser.add_argument("--segments", type=int, default=12, help="segments per round")
    parser.add_argument("--size", default="320x240", help="picture size (default 320x240)")
    parser.add_argument("--modes", default=",".join(MODES), help="ffmpeg,pyav")
    parser.add_argument("--results", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    from playwright.sync_api import sync_playwright

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp_name:
        tmp = Path(tmp_name)
        use_softhsm_dir(tmp / "softhsm")
        token = new_softhsm_token(tmp, "live")
        pem = enroll_viewer(token, "operator")
        chunks = make_chunks(tmp / "chunks", args.segments, args.size)
        cpu = remux_cpu(chunks, 3)
        cpu["pyav_one_output_cpu_ms"] = reused_output_cpu(chunks, 3)
        print(f"remux of one {args.size} 1-s segment: CPU ffmpeg+ffprobe "
              f"{cpu['ffmpeg_cpu_ms']:.1f} ms, PyAV {cpu['pyav_cpu_ms']:.1f} ms "
              f"({cpu['ffmpeg_cpu_ms'] / cpu['pyav_cpu_ms']:.0f}x less); wall "
              f"{cpu['ffmpeg_wall_ms']:.1f} / {cpu['pyav_wall_ms']:.1f} ms; PyAV with one "
              f"output container for the whole stream: {cpu['pyav_one_output_cpu_ms']:.1f} ms")
        server = production_archiver(SiteCa.create(tmp / "ca"), tmp / "data").start()
        rounds: list[Round] = []
        try:
            ingest = {m: server.add_camera(f"live-{m}") for m in modes}
            server.add_viewer(pem, [f"live-{m}" for m in modes])
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    args=["--autoplay-policy=no-user-gesture-required"])
                try:
                    for n in range(args.rounds):
                        for mode in modes:
                            done = run_round(browser, server, token.object_uri("operator"),
                                             f"live-{mode}", ingest[mode], chunks, mode,
                                             tmp / f"home-{mode}-{n}")
                            print(f"round {n + 1} {mode}: {summary(done.latencies)}",
                                  flush=True)
                            rounds.append(done)
                finally:
                    browser.close()
        finally:
            server.stop()
    figures: dict[str, Any] = {"cpu": cpu, "size": args.size, "segments": args.segments,
                               "rounds": args.rounds, "machine": machine_line()}
    for mode in modes:
        mine = [r for r in rounds if r.mode == mode]
        all_lat = [x for r in mine for x in r.latencies]
        to_page = [x for r in mine for x in r.to_page]
        on_page = [x for r in mine for x in r.on_page]
        append = [x for r in mine for x in r.append]
        behind = [x for r in mine for x in r.behind]
        figures[mode] = {"latency_ms": all_lat, "to_page_ms": to_page, "on_page_ms": on_page,
                         "append_ms": append, "behind_s": behind}
        print(f"{mode}: acknowledgement -> first frame {summary(all_lat)}; medians: -> in the "
              f"page {median(to_page):.0f} ms, page -> frame {median(on_page):.0f} ms (append "
              f"{median(append):.0f} ms, playhead {median(behind) * 1000:.0f} ms before the "
              "segment when appended)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.results:
        args.results.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
