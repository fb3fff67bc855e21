"""The viewer side: decrypt throughput next to raw AES-GCM, token operations per hour of
playback (SoftHSM and the software TPM), time to the first decrypted byte for a seek into the
middle of a 24-hour archive, and live latency on loopback.

Set-up, all real: viewer keys enrolled on a fresh SoftHSM token and (when swtpm and tpm2-tools
are installed) on a software TPM; archives made by ``bench.generate`` (the Archiver's write
path with an injected clock) in a subprocess; a real Archiver (``bench.server``, uvicorn)
serving them; the viewer is ``client`` (``Player``, ``ArchiverSession``) in this process and the
``fusion-client`` CLI in subprocesses.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from bench.common import REPO_ROOT, BenchServer, MiB, Report, median, percentile, size_label
from bench.generate import segment_bytes
from bench.raw import aes_gcm
from client.player import Player, archiver_pin_check
from client.session import ArchiverSession, live_request, playback_request
from fusion_testkit.tokens import (
    SoftwareTpm,
    TokenHandle,
    enroll_viewer,
    new_softhsm_token,
    tpm_missing,
    use_softhsm_dir,
)
from keyservice.certs import load_certificate
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, WrappedKey, unwrap_with
from keyservice.labels import WrapContext
from keyservice.reader import SegmentPlaintext
from keyservice.token import Token

DAY_START = "2025-06-02T00:00:00Z"
DAY_START_MS = 1_748_822_400_000
HOUR_MS = 3_600_000


@dataclass
class Params:
    day_hours: float = 24.0
    day_segment_s: float = 10.0
    day_segment_bytes: int = 32 * 1024
    big_segments: int = 128
    big_segment_bytes: int = 2 * MiB
    seek_repeats: int = 3
    live_segments: int = 10
    live_segment_bytes: int = 1 * MiB
    live_interval_s: float = 0.5
    use_tpm: bool = True


# --- identities -----------------------------------------------------------------------------
class TimedIdentity:
    """Counts and times the token's private-key operations (the Identity protocol)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.certificate: x509.Certificate = inner.certificate
        self.operations = 0
        self.seconds = 0.0

    def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        return unwrap_with(self, wrapped, context)  # through rsa_decrypt below, timed

    def rsa_decrypt(self, ciphertext: bytes, scheme: KeyScheme) -> bytes:
        start = time.perf_counter()
        try:
            return self.inner.rsa_decrypt(ciphertext, scheme)
        finally:
            self.operations += 1
            self.seconds += time.perf_counter() - start


@dataclass
class Viewer:
    kind: str          # "SoftHSM" or "software TPM"
    uri: str           # token URI with the object and PIN: for fusion-client --token
    pem: Path
    identity: TimedIdentity


def _softhsm_viewer(workdir: Path) -> Viewer:
    if "SOFTHSM2_CONF" not in os.environ:
        # SoftHSM reads its configuration once per process: set it before the module loads.
        use_softhsm_dir(workdir / "softhsm")
    return _viewer("SoftHSM", new_softhsm_token(workdir, f"bench-{secrets.token_hex(3)}"))


def _viewer(kind: str, handle: TokenHandle) -> Viewer:
    pem = enroll_viewer(handle, "viewer", bits=2048)
    return Viewer(kind, handle.object_uri("viewer"), pem,
                  TimedIdentity(Token.open(handle.uri).identity("viewer")))


# --- playing ----------------------------------------------------------------------------------
class CountingOutput:
    """Where decrypted video would go: counts it (and notes when the first byte came)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.first_byte_at: float | None = None

    def write(self, data: bytes) -> None:
        if self.first_byte_at is None and data:
            self.first_byte_at = time.perf_counter()
        self.bytes += len(data)

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None


class _FirstByte(Exception):
    """Stops a playback at the first decrypted byte (time-to-first-byte runs)."""


@dataclass
class Served:
    url: str
    archiver_pem: Path
    archiver_fp: bytes


def _session(served: Served, viewer: Viewer) -> ArchiverSession:
    session = ArchiverSession(served.url, timeout=120)
    session.login(viewer.identity, archiver_pin_check(served.archiver_fp))
    return session


def _play(served: Served, viewer: Viewer, camera: str, from_ms: int, to_ms: int,
          on_segment: Callable[[SegmentPlaintext], None] | None = None) -> CountingOutput:
    output = CountingOutput()
    asked = playback_request(camera, from_ms, to_ms)
    with _session(served, viewer) as session, \
            session.recording(camera, from_ms, to_ms, asked) as chunks:
        Player(viewer.identity, archiver_pin_check(served.archiver_fp), output,
               on_segment=on_segment, request=asked).run(chunks)
    return output


def _fusion_client(served: Served, viewer: Viewer, camera: str, from_ms: int, to_ms: int,
                   output: str) -> list[str]:
    def iso(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")

    return [sys.executable, "-m", "client", "play", "--archiver", served.url,
            "--token", viewer.uri, "--camera", camera, "--from", iso(from_ms), "--to", iso(to_ms),
            "--archiver-cert", str(served.archiver_pem), "-o", output, "-q"]


def _client_env(home: Path) -> dict[str, str]:
    return {**os.environ, "FUSION_CLIENT_HOME": str(home)}


# --- the benchmark ----------------------------------------------------------------------------
def run(report: Report, workdir: Path, params: Params) -> dict[str, Any]:
    tpm_on = params.use_tpm and not tpm_missing()
    result = report.section("viewer", {
        "day_archive": f"{params.day_hours:g} h from {DAY_START}, one {size_label(params.day_segment_bytes)}"
                       f" segment every {params.day_segment_s:g} s, key period 60 s",
        "big_archive": f"{params.big_segments} x {size_label(params.big_segment_bytes)} segments",
        "viewer_keys": "RSA-2048 on SoftHSM" + (" and on a software TPM" if tpm_on else
                                                 " (software TPM not available)"),
        "live": f"{params.live_segments} x {size_label(params.live_segment_bytes)} every "
                f"{params.live_interval_s:g} s"})
    workdir.mkdir(parents=True, exist_ok=True)
    tpm: SoftwareTpm | None = None
    server: BenchServer | None = None
    try:
        viewers = [_softhsm_viewer(workdir)]
        if tpm_on:
            tpm = SoftwareTpm.start(workdir / "swtpm", label="benchtpm")
            viewers.append(_viewer("software TPM", tpm.handle))
        data = workdir / "archive"
        result["generated"] = _generate(report, data, viewers, params)
        server = BenchServer(data, key_period_s=60).start()
        info = httpx.get(f"{server.url}/v1/archiver", timeout=30).json()
        archiver_pem = workdir / "archiver.pem"
        archiver_pem.write_text(info["certificate"])
        served = Served(server.url, archiver_pem,
                        fingerprint(load_certificate(archiver_pem.read_bytes())))
        home = workdir / "client-home"
        home.mkdir(exist_ok=True)
        result["throughput"] = _throughput(report, served, viewers[0], params, workdir, home)
        result["token_operations"] = [_token_ops(report, served, v, params) for v in viewers]
        result["seek"] = [_seek(report, served, v, params, home) for v in viewers]
        result["live"] = _live(report, server, served, viewers[0], params)
        return result
    finally:
        if server is not None:
            server.stop()
        if tpm is not None:
            tpm.stop()


def _generate(report: Report, data: Path, viewers: list[Viewer], params: Params
              ) -> list[dict[str, Any]]:
    common = [sys.executable, "-m", "bench.generate", "--data", str(data), "--key-period", "60"]
    for viewer in viewers:
        common += ["--viewer", str(viewer.pem)]
    # The generator loads the Archiver's own SoftHSM token: keep our SoftHSM config away.
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    runs = [
        ["--camera", "day", "--start", DAY_START, "--hours", str(params.day_hours),
         "--segment-s", str(params.day_segment_s), "--segment-bytes",
         str(params.day_segment_bytes)],
        ["--camera", "big", "--start", DAY_START, "--hours",
         str(params.big_segments * 4 / 3600), "--segment-s", "4", "--segment-bytes",
         str(params.big_segment_bytes)],
    ]
    out = []
    for args in runs:
        done = subprocess.run(common + args, env=env, capture_output=True, text=True,
                              cwd=REPO_ROOT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench.generate failed: {done.stderr.strip()[-2000:]}")
        made = json.loads(done.stdout)
        out.append(made)
        report.line(f"generated camera {made['camera']}: {made['segments']} segments of "
                    f"{size_label(made['segment_bytes'])} through Archive.ingest_segment in "
                    f"{made['seconds']:.1f} s ({made['key_rotations']} key rotations, "
                    f"{made['key_records']} key records, {made['epoch_openers']} epoch openers)")
    return out


def _throughput(report: Report, served: Served, viewer: Viewer, params: Params, workdir: Path,
                home: Path) -> dict[str, Any]:
    size, count = params.big_segment_bytes, params.big_segments
    total = size * count
    everything = (DAY_START_MS, DAY_START_MS + count * 4000)
    # The fusion stream once, kept in memory: the reader's own speed without HTTP.
    asked = playback_request("big", *everything)
    with _session(served, viewer) as session, \
            session.recording("big", *everything, asked) as chunks:
        stream = list(chunks)
    # Check every decrypted segment against what the generator archived (not timed).
    mismatches = [0]

    def check(event: SegmentPlaintext) -> None:
        index = (event.capture_ms - DAY_START_MS) // 4000
        if event.data != segment_bytes("big", index, size):
            mismatches[0] += 1

    checked = Player(viewer.identity, archiver_pin_check(served.archiver_fp), CountingOutput(),
                     on_segment=check, request=asked).run(stream)
    if checked.segments != count or mismatches[0]:
        raise RuntimeError(f"the viewer decrypted {checked.segments} of {count} segments, "
                           f"{mismatches[0]} differing from what was archived")

    def in_memory() -> float:
        start = time.perf_counter()
        Player(viewer.identity, archiver_pin_check(served.archiver_fp), CountingOutput(),
               request=asked).run(stream)
        return time.perf_counter() - start

    def over_http() -> float:
        start = time.perf_counter()
        output = _play(served, viewer, "big", *everything)
        assert output.bytes == total
        return time.perf_counter() - start

    raw = aes_gcm(size, 1.0)["decrypt_mib_s"]
    memory_s = min(in_memory() for _ in range(3))
    http_s = min(over_http() for _ in range(2))
    out_file = workdir / "export.ts"
    start = time.perf_counter()
    done = subprocess.run(_fusion_client(served, viewer, "big", *everything, str(out_file)),
                          env=_client_env(home), capture_output=True, text=True, cwd=REPO_ROOT,
                          check=False)
    cli_s = time.perf_counter() - start
    if done.returncode != 0 or out_file.stat().st_size != total:
        raise RuntimeError(f"fusion-client play failed ({done.returncode}): {done.stderr.strip()}")
    out_file.unlink()
    rows = {
        "raw_aes_gcm_decrypt_mib_s": raw,
        "reader_in_memory_mib_s": total / MiB / memory_s,
        "library_over_http_mib_s": total / MiB / http_s,
        "fusion_client_play_mib_s": total / MiB / cli_s,
        "plaintext_mib": total / MiB,
        "fusion_client_wall_s": cli_s,
    }
    report.line(f"decrypt throughput, {count} x {size_label(size)} ({total / MiB:.0f} MiB), "
                f"MiB/s of verified plaintext (ratio to raw AES-256-GCM decrypt, one core):")
    for name, key in (("raw AES-256-GCM decrypt (one core)", "raw_aes_gcm_decrypt_mib_s"),
                      ("client.Player on the stream in memory", "reader_in_memory_mib_s"),
                      ("client library over HTTP (loopback)", "library_over_http_mib_s"),
                      ("fusion-client play -o FILE (whole command)", "fusion_client_play_mib_s")):
        report.line(f"  {name:<44} {rows[key]:>8.0f}  ({rows[key] / raw:.2f})")
    return rows


def _token_ops(report: Report, served: Served, viewer: Viewer, params: Params) -> dict[str, Any]:
    hour_from = DAY_START_MS + int(params.day_hours * HOUR_MS) // 2
    hour_to = hour_from + min(HOUR_MS, int(params.day_hours * HOUR_MS) // 2) - 1
    identity = viewer.identity
    ops0, secs0 = identity.operations, identity.seconds
    with _session(served, viewer) as session:
        login_ops = identity.operations - ops0
        before, before_s = identity.operations, identity.seconds
        output = CountingOutput()
        asked = playback_request("day", hour_from, hour_to)
        with session.recording("day", hour_from, hour_to, asked) as chunks:
            summary = Player(identity, archiver_pin_check(served.archiver_fp), output,
                             request=asked).run(chunks)
        hour_ops = identity.operations - before
        hour_token_s = identity.seconds - before_s
        before = identity.operations
        asked = playback_request("day", 0, 2**62)
        with session.recording("day", 0, 2**62, asked) as chunks:
            day = Player(identity, archiver_pin_check(served.archiver_fp), CountingOutput(),
                         request=asked).run(chunks)
        day_ops = identity.operations - before
    hours = (hour_to - hour_from + 1) / HOUR_MS
    per_op_ms = (identity.seconds - secs0) / max(1, identity.operations - ops0) * 1000
    row = {
        "token": viewer.kind, "login_ops": login_ops,
        "playback_hours": hours, "playback_ops": hour_ops,
        "playback_token_s": hour_token_s, "segments": summary.segments,
        "ops_per_hour": hour_ops / hours,
        "per_minute_rsa_design_ops_per_hour": 60,
        "whole_archive_hours": params.day_hours, "whole_archive_ops": day_ops,
        "whole_archive_segments": day.segments,
        "ms_per_op": per_op_ms,
    }
    report.line(f"token operations, {viewer.kind}: {hour_ops} for {hours:g} h of playback "
                f"({summary.segments} segments) = {row['ops_per_hour']:.0f} per hour "
                f"(per-minute RSA design: 60); whole {params.day_hours:g} h archive: {day_ops}; "
                f"login: {login_ops}; {per_op_ms:.1f} ms per operation on this token")
    return row


def _seek(report: Report, served: Served, viewer: Viewer, params: Params, home: Path
          ) -> dict[str, Any]:
    # The middle of the day archive, at an odd offset so it falls inside a segment and a minute.
    middle = DAY_START_MS + int(params.day_hours * HOUR_MS) // 2 + 34 * 60_000 + 56_789
    span = 10 * 60_000
    # The floor of any fusion-client command: starting Python and importing the CLI.
    startup: list[float] = []
    for _ in range(params.seek_repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "client", "--help"], capture_output=True,
                       cwd=REPO_ROOT, check=True)
        startup.append(time.perf_counter() - start)
    cli: list[float] = []
    for _ in range(params.seek_repeats):
        start = time.perf_counter()
        process = subprocess.Popen(_fusion_client(served, viewer, "day", middle, middle + span,
                                                  "-"), env=_client_env(home),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
        assert process.stdout is not None
        first = process.stdout.read(1)
        cli.append(time.perf_counter() - start)
        _, err = process.communicate(timeout=120)
        if process.returncode != 0 or not first:
            raise RuntimeError(f"fusion-client play failed: {err.decode(errors='replace')}")
    library: list[float] = []
    for _ in range(params.seek_repeats):
        start = time.perf_counter()
        output = CountingOutput()

        def stop(event: SegmentPlaintext) -> None:
            raise _FirstByte

        try:
            asked = playback_request("day", middle, middle + span)
            with _session(served, viewer) as session, \
                    session.recording("day", middle, middle + span, asked) as chunks:
                Player(viewer.identity, archiver_pin_check(served.archiver_fp), output,
                       on_segment=stop, request=asked).run(chunks)
        except _FirstByte:
            pass
        if output.first_byte_at is None:
            raise RuntimeError("the seek decrypted nothing")
        library.append(output.first_byte_at - start)
    row = {"token": viewer.kind, "cli_first_byte_s": cli, "library_first_byte_s": library,
           "cli_help_s": startup,
           "seek_to_utc": dt.datetime.fromtimestamp(middle / 1000, dt.UTC).isoformat(),
           "archive_hours": params.day_hours}
    report.line(f"seek to the middle of the {params.day_hours:g} h archive, {viewer.kind}: "
                f"first decrypted byte after {median(cli) * 1000:.0f} ms (median of "
                f"{len(cli)}, min {min(cli) * 1000:.0f} ms) from the start of `fusion-client play` "
                f"(`fusion-client --help` alone: {median(startup) * 1000:.0f} ms); "
                f"{median(library) * 1000:.0f} ms with the client library in a running process "
                f"(login, request, first segment; token already open)")
    return row


def _live(report: Report, server: BenchServer, served: Served, viewer: Viewer, params: Params
          ) -> dict[str, Any]:
    token = server.add_cameras(["live"])["live"]
    duration = params.live_segments * params.live_interval_s + 4
    decrypted: dict[int, float] = {}
    started = threading.Event()
    failure: list[BaseException] = []

    def watch() -> None:
        def chunks(source: Iterator[bytes]) -> Iterator[bytes]:
            for chunk in source:
                started.set()
                yield chunk

        try:
            asked = live_request("live", duration)
            with _session(served, viewer) as session, \
                    session.live("live", duration, asked) as source:
                Player(viewer.identity, archiver_pin_check(served.archiver_fp), CountingOutput(),
                       on_segment=lambda e: decrypted.setdefault(e.seq, time.perf_counter()),
                       request=asked).run(chunks(source))
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    if not started.wait(30) or failure:
        raise RuntimeError(f"the live stream did not start: {failure}")
    sent: dict[int, tuple[float, float]] = {}
    with httpx.Client(timeout=60) as http:
        for index in range(params.live_segments):
            body = segment_bytes("live", index, params.live_segment_bytes)
            start = time.perf_counter()
            response = http.put(f"{server.url}/ingest/live/seg{index:05d}.ts", content=body,
                                headers={"Authorization": f"Bearer {token}"})
            acked = time.perf_counter()
            if response.status_code != 201:
                raise RuntimeError(f"live ingest failed: HTTP {response.status_code}")
            sent[int(response.headers["X-Fusion-Segment-Seq"])] = (start, acked)
            time.sleep(max(0.0, params.live_interval_s - (acked - start)))
    thread.join(duration + 30)
    if failure:
        raise RuntimeError(f"the live viewer failed: {failure[0]}")
    missing = sorted(set(sent) - set(decrypted))
    if missing:
        raise RuntimeError(f"live segments never decrypted at the viewer: {missing}")
    from_ack = [decrypted[s] - acked for s, (_, acked) in sent.items()]
    from_send = [decrypted[s] - start for s, (start, _) in sent.items()]
    row = {"segments": len(sent), "segment_bytes": params.live_segment_bytes,
           "ack_to_decrypted_s": from_ack, "upload_start_to_decrypted_s": from_send,
           "ack_to_decrypted_median_s": median(from_ack),
           "ack_to_decrypted_p95_s": percentile(from_ack, 0.95)}
    note = (" (negative: the viewer had it before the camera's HTTP response arrived)"
            if min(from_ack) < 0 else "")
    report.line(f"live latency, {len(sent)} segments of {size_label(params.live_segment_bytes)}: "
                f"acknowledged to decrypted at the viewer median {median(from_ack) * 1000:.1f} ms, "
                f"max {max(from_ack) * 1000:.1f} ms{note}; upload start to decrypted median "
                f"{median(from_send) * 1000:.1f} ms")
    return row
