"""The player library on streams made by the real crypto core (software test keys): what it
writes, what it refuses, how it names outputs, gaps and where a failed output stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client.player import (
    NO_RECORDING,
    NOT_AUTHORIZED,
    FileOutput,
    NothingAuthorized,
    OutputFailed,
    PipeOutput,
    Player,
    ReaderClosed,
    StreamTruncated,
    archiver_pin_check,
)
from keyservice.errors import ArchiverMismatch, IntegrityError, NoMatchingIdentity, UsageError
from keyservice.exitcodes import ExitCode
from keyservice.identity import SoftwareIdentity, SoftwareSigner, fingerprint

from .streams import T0, Seg, build_stream, software_signer, software_viewer


@pytest.fixture(scope="module")
def viewer() -> SoftwareIdentity:
    return software_viewer("alice")


@pytest.fixture(scope="module")
def signer() -> SoftwareSigner:
    return software_signer()


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def plan(n: int, step_ms: int = 1000, start: int = T0) -> list[Seg]:
    return [Seg(start + i * step_ms, os.urandom(1000 + i)) for i in range(n)]


def player_for(viewer: SoftwareIdentity, signer: SoftwareSigner, out: FileOutput) -> Player:
    # Streams built here answer no request of this test: verified as saved streams are.
    return Player.for_saved_stream(viewer, archiver_pin_check(fingerprint(signer.certificate)), out)


@pytest.mark.parametrize("chunk", [1, 7, 65536])
def test_writes_verified_plaintext_and_renames(tmp_path: Path, viewer: SoftwareIdentity,
                                               signer: SoftwareSigner, chunk: int) -> None:
    segs = plan(5)
    stream, _ = build_stream(viewer, signer, segs)
    target = tmp_path / "out.ts"
    out = FileOutput(target)
    assert out.partial.exists() and not target.exists()
    ops_before = viewer.operations
    summary = player_for(viewer, signer, out).run(chunks(stream, chunk))
    out.commit()
    assert target.read_bytes() == b"".join(s.data for s in segs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ts"]
    assert summary.segments == 5 and summary.skipped == 0 and summary.ended
    assert summary.bytes == sum(len(s.data) for s in segs)
    assert (summary.first_ms, summary.last_ms) == (T0, T0 + 4000)
    assert summary.epoch_openings == 1 == viewer.operations - ops_before
    assert summary.gaps == []
    assert summary.last is not None and summary.last.seq == 4


@pytest.mark.parametrize("chunk", [1, 4096])
def test_tampered_segment_stops_output_before_it(tmp_path: Path, viewer: SoftwareIdentity,
                                                 signer: SoftwareSigner, chunk: int) -> None:
    segs = plan(6)
    stream, offsets = build_stream(viewer, signer, segs)
    bad = bytearray(stream)
    bad[offsets[3] + 80] ^= 0x01  # inside segment 3's ciphertext
    out = FileOutput(tmp_path / "out.ts")
    player = player_for(viewer, signer, out)
    with pytest.raises(IntegrityError) as info:
        player.run(chunks(bytes(bad), chunk))
    assert info.value.exit_code == 11
    kept = out.abort()
    assert kept == tmp_path / "out.ts.incomplete"
    assert not (tmp_path / "out.ts").exists() and not out.partial.exists()
    # Whole verified segments before the tampered one, nothing of it. Fed byte by byte, all
    # three are out; in bigger chunks the reader drops the events of the failing call, so
    # the output may stop earlier -- but always where the player says it does.
    written = player.summary.segments
    assert written == 3 if chunk == 1 else 1 <= written <= 3
    assert kept.read_bytes() == b"".join(s.data for s in segs[:written])
    assert player.where().startswith(f"after segment {written - 1} of camera cam1 "
                                     f"(captured 2025-06-01T12:00:0{written - 1}")


def test_truncation_is_reported_and_never_complete(tmp_path: Path, viewer: SoftwareIdentity,
                                                   signer: SoftwareSigner) -> None:
    segs = plan(3)
    stream, _ = build_stream(viewer, signer, segs, end=False)
    out = FileOutput(tmp_path / "out.ts")
    player = player_for(viewer, signer, out)
    with pytest.raises(StreamTruncated) as info:
        player.run([stream])
    assert info.value.exit_code == ExitCode.STREAM_TRUNCATED == 50
    # What came verified; a cut stream is not a forged one (its own type and exit code).
    assert not isinstance(info.value, IntegrityError)
    assert out.abort() == tmp_path / "out.ts.incomplete"
    assert not (tmp_path / "out.ts").exists()


def test_not_authorized_segments_are_a_reported_gap(tmp_path: Path, viewer: SoftwareIdentity,
                                                    signer: SoftwareSigner) -> None:
    # Three withheld segments of a second each: the gap is their whole span, to the end of
    # the last one (not to its start).
    segs = [Seg(s.capture_ms, s.data, authorized=i >= 3, duration_ms=1000)
            for i, s in enumerate(plan(6))]
    stream, _ = build_stream(viewer, signer, segs)
    out = FileOutput(tmp_path / "out.ts")
    summary = player_for(viewer, signer, out).run([stream])
    out.commit()
    assert (tmp_path / "out.ts").read_bytes() == b"".join(s.data for s in segs[3:])
    assert (summary.segments, summary.skipped) == (3, 3)
    [gap] = summary.gaps
    assert (gap.kind, gap.segments, gap.from_ms, gap.to_ms) == (NOT_AUTHORIZED, 3, T0, T0 + 3000)
    assert "not authorized" in gap.describe()


def test_nothing_authorized_writes_nothing(tmp_path: Path, viewer: SoftwareIdentity,
                                           signer: SoftwareSigner) -> None:
    segs = [Seg(s.capture_ms, s.data, authorized=False) for s in plan(4)]
    stream, _ = build_stream(viewer, signer, segs)
    out = FileOutput(tmp_path / "out.ts")
    ops_before = viewer.operations
    with pytest.raises(NothingAuthorized) as info:
        player_for(viewer, signer, out).run([stream])
    assert info.value.exit_code == 51
    assert viewer.operations == ops_before  # nothing to open: the token was not used
    assert out.abort() is None
    assert list(tmp_path.iterdir()) == []


def test_capture_time_jump_is_a_gap(tmp_path: Path, viewer: SoftwareIdentity,
                                    signer: SoftwareSigner) -> None:
    segs = plan(4) + plan(3, start=T0 + 60_000)
    stream, _ = build_stream(viewer, signer, segs)
    summary = player_for(viewer, signer, FileOutput(tmp_path / "o.ts")).run([stream])
    [gap] = summary.gaps
    assert (gap.kind, gap.from_ms, gap.to_ms) == (NO_RECORDING, T0 + 3000, T0 + 60_000)
    assert "no recording between 2025-06-01T12:00:03.000Z" in gap.describe()


def test_stream_for_another_viewer(tmp_path: Path, viewer: SoftwareIdentity,
                                   signer: SoftwareSigner) -> None:
    stream, _ = build_stream(viewer, signer, plan(2))
    other = software_viewer("mallory")
    out = FileOutput(tmp_path / "out.ts")
    with pytest.raises(NoMatchingIdentity) as info:
        Player.for_saved_stream(other, archiver_pin_check(fingerprint(signer.certificate)),
                                out).run([stream])
    assert info.value.exit_code == 12
    assert other.operations == 0
    assert out.abort() is None and list(tmp_path.iterdir()) == []


def test_stream_from_another_archiver(tmp_path: Path, viewer: SoftwareIdentity,
                                      signer: SoftwareSigner) -> None:
    stream, _ = build_stream(viewer, signer, plan(2))
    pinned = software_signer("the real archiver")
    out = FileOutput(tmp_path / "out.ts")
    ops_before = viewer.operations
    with pytest.raises(ArchiverMismatch):
        Player.for_saved_stream(viewer, archiver_pin_check(fingerprint(pinned.certificate)),
                                out).run([stream])
    assert viewer.operations == ops_before
    assert out.abort() is None


def test_closed_pipe(viewer: SoftwareIdentity, signer: SoftwareSigner) -> None:
    stream, _ = build_stream(viewer, signer, plan(2))
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb", buffering=0) as pipe:
        player = Player.for_saved_stream(viewer, archiver_pin_check(fingerprint(signer.certificate)),
                        PipeOutput(pipe))
        with pytest.raises(OutputFailed, match="closed the pipe") as info:
            player.run([stream])
    # Not a failure of ours: the reader chose to stop (fusion-client exits 0, docs/client.md).
    assert isinstance(info.value, ReaderClosed) and info.value.exit_code == 0


def test_unwritable_output(tmp_path: Path) -> None:
    with pytest.raises(OutputFailed, match="Cannot write"):
        FileOutput(tmp_path / "missing-dir" / "out.ts")


def test_a_named_pipe_or_device_as_output_is_written_not_replaced(tmp_path: Path) -> None:
    # `-o /dev/null` once replaced /dev/null with a regular file (FILE.partial renamed over
    # it, as root). A FIFO stands for any such file here: it must stay what it is.
    import stat
    import threading

    from client.evidence_zip import write_zip
    from client.playback import open_output

    fifo = tmp_path / "video.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    output = open_output(str(fifo))
    output.write(b"verified video")
    output.commit()
    output.abort()  # the pipe is closed at the end of the command: no reader waits forever
    reader.join(10)
    assert received == [b"verified video"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not list(tmp_path.glob("*.partial"))
    for write in (lambda: FileOutput(fifo), lambda: write_zip(fifo, {"a": b"b"})):
        with pytest.raises(UsageError, match="is not a regular file"):
            write()
    assert stat.S_ISFIFO(fifo.stat().st_mode)
