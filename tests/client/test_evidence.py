"""fusion-client evidence end to end: a real SoftHSM viewer token exports from a real Archiver
under uvicorn (ffmpeg as the camera); the package is then verified with the Archiver stopped
and no token reachable, by the real command, and by hand with the real openssl and sha256sum
following docs/evidence.md to the letter."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from client.evidence import read_zip
from fusion_testkit.client_cli import Client, Result, Viewer, chunk, iso, now_ms, play, put, wait_for_segments
from keyservice.evidence.build import sha256sums
from keyservice.evidence.layout import KEYS, SUMS, VIDEO
from keyservice.evidence.verify import parse_keys, verify_package
from keyservice.format import Segment, decode_record
from tests.fixtures.camera import frame_hashes, make_source, push, requires_ffmpeg
from tests.fixtures.server import REPO_ROOT, ArchiverServer

EXIT_NOT_VERIFIED, EXIT_PARTLY_VERIFIED, EXIT_INCOMPLETE = 60, 61, 62
requires_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("openssl", "sha256sum", "unzip", "od", "cmp")),
    reason="the manual procedure needs openssl, sha256sum, unzip, od and cmp")


class OfflineClient(Client):
    """The verifier's machine: no token configuration at all (no SoftHSM, no PIN)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("SOFTHSM2_CONF", None)
        return env


def export(client: Client, server: ArchiverServer, viewer: Viewer, out: Path, start: int,
           end: int, *extra: str) -> Result:
    return client("evidence", "export", "--archiver", server.url, "--token", viewer.uri,
                  "--camera", "cam1", "--from", iso(start), "--to", iso(end), "-o", str(out),
                  *extra)


def _pin(package: Path) -> str:
    """The package's Archiver fingerprint, as the test knows it (it ran the Archiver)."""
    return str(json.loads(read_zip(package)["EVIDENCE.json"])["archiver_sha256"])


def segments_of(files: dict[str, bytes]) -> list[Segment]:
    out = []
    for name in sorted(n for n in files if n.startswith("segments/")):
        record = decode_record(files[name])
        assert isinstance(record, Segment)
        out.append(record)
    return out


def rewrite(package: Path, target: Path, name: str, change: Callable[[bytes], bytes],
            resum: bool = False) -> None:
    files = read_zip(package)
    files[name] = change(files[name])
    if resum:
        files[SUMS] = sha256sums({k: v for k, v in files.items() if k != SUMS})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    target.write_bytes(buffer.getvalue())


def flip(at: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        i = at(data)
        return data[:i] + bytes((data[i] ^ 0x01,)) + data[i + 1:]
    return change


def manual_procedure() -> str:
    """The script of docs/evidence.md, exactly as documented."""
    text = (REPO_ROOT / "docs" / "evidence.md").read_text()
    found = re.search(r"<!-- manual-procedure:begin -->\n```sh\n(.*?)```\n"
                      r"<!-- manual-procedure:end -->", text, re.S)
    assert found, "docs/evidence.md lost its manual procedure"
    return found[1]


def run_by_hand(package: Path, workdir: Path, tamper: Callable[[Path], None] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Unpack as documented, optionally tamper (and fix SHA256SUMS with sha256sum), then run
    the documented script with bash; python3 is one with the cryptography package."""
    workdir.mkdir()
    shutil.copy(package, workdir / "case.zip")
    subprocess.run(["unzip", "-q", "case.zip", "-d", "case"], cwd=workdir, check=True)
    case = workdir / "case"
    if tamper is not None:
        tamper(case)
        names = sorted(str(p.relative_to(case)) for p in case.rglob("*")
                       if p.is_file() and p.name != SUMS)
        sums = subprocess.run(["sha256sum", *names], cwd=case, check=True, capture_output=True)
        (case / SUMS).write_bytes(sums.stdout)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "FUSION_PIN")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", "-c", manual_procedure()], cwd=case, env=env,
                          capture_output=True, text=True, timeout=300)


@requires_ffmpeg
@requires_tools
def test_package_verifies_offline_by_command_and_by_hand_and_holds_only_its_keys(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    source = make_source(tmp_path / "source.ts", seconds=6)
    start = now_ms()
    push(source, archiver_server.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(archiver_server, "cam1", 6)
    end = now_ms() + 1

    played = tmp_path / "played.ts"
    viewing = play(client, archiver_server.url, alice, played, start, end)
    assert viewing.code == 0, viewing.stderr
    pinned = re.search(r"certificate sha256 ([0-9a-f]{64})", viewing.stderr)
    assert pinned, viewing.stderr
    case = tmp_path / "case.zip"
    made = export(client, archiver_server, alice, case, start, end)
    assert made.code == 0, made.stderr
    assert "package sha256" in made.stderr
    # A sub-range: only its segments, only their keys. Taken from the segments' signed times
    # (not the test's clock: ffmpeg may start seconds late on a busy machine), from inside the
    # third to inside the fourth, so that recorded segments lie outside it on both sides.
    recorded = sorted(segments_of(read_zip(case)), key=lambda s: s.capture_ms)
    assert len(recorded) >= 5, [s.capture_ms for s in recorded]
    middle = (recorded[2].capture_ms + 500, recorded[3].capture_ms + 500)
    part = tmp_path / "part.zip"
    made_part = export(client, archiver_server, alice, part, *middle)
    assert made_part.code == 0, made_part.stderr
    archiver_server.stop()  # from here on: no Archiver, and no token configuration

    offline = OfflineClient(client.home)
    verified = tmp_path / "verified.ts"
    result = offline("evidence", "verify", str(case), "-o", str(verified),
                     "--expect-archiver", pinned[1])
    report = result.stdout.decode()
    assert result.code == 0, report + result.stderr
    assert "camera:      cam1" in report
    assert f"certificate sha256 {pinned[1]}" in report
    assert "Result: VERIFIED" in report
    assert f"range:       {iso(start)} .. {iso(end)}" in report
    assert "(signed by the Archiver)" in report and "Notes:" not in report  # end proven
    # Frame-exact what the viewer plays, which is the camera's source.
    assert verified.read_bytes() == played.read_bytes()
    assert frame_hashes(verified) == frame_hashes(source)

    files, part_files = read_zip(case), read_zip(part)
    assert files[VIDEO] == played.read_bytes()
    whole_keys, part_keys = set(parse_keys(files[KEYS])), set(parse_keys(part_files[KEYS]))
    assert whole_keys == {s.key_id for s in segments_of(files)}
    part_segments = segments_of(part_files)
    assert part_keys == {s.key_id for s in part_segments}
    assert 0 < len(part_segments) < len(segments_of(files))
    # The keys of segments wholly outside the sub-range are not in its package.
    outside = {s.key_id for s in segments_of(files)
               if s.capture_ms + s.duration_ms < middle[0] or s.capture_ms > middle[1]}
    assert outside - part_keys and not (outside - {s.key_id for s in part_segments}) & part_keys
    # The sub-range's edges are proven by the bare manifests just outside it.
    sub = offline("evidence", "verify", str(part), "--expect-archiver", pinned[1])
    assert sub.code == 0, sub.stdout.decode() + sub.stderr
    assert "the start of the range: manifest" in sub.stdout.decode()
    assert "the end of the range: manifest" in sub.stdout.decode()

    # By hand, exactly as documented: passes; a segment or a key changed (SHA256SUMS fixed
    # to match) fails at the signed digest or commitment.
    by_hand = run_by_hand(case, tmp_path / "hand")
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert by_hand.stdout.rstrip().endswith("VERIFIED")
    assert f"the Archiver signed the range {start} .. {end}" in by_hand.stdout
    assert f"sha256 Fingerprint={':'.join(re.findall('..', pinned[1].upper()))}" in (
        by_hand.stdout)

    def bad_segment(case_dir: Path) -> None:
        seg = sorted((case_dir / "segments").iterdir())[1]
        seg.write_bytes(flip(lambda d: len(d) - 20)(seg.read_bytes()))

    def bad_key(case_dir: Path) -> None:
        keys = case_dir / KEYS
        text = keys.read_text()
        keys.write_text(text[:40] + ("1" if text[40] != "1" else "2") + text[41:])

    def bad_signed(case_dir: Path) -> None:
        signed = sorted((case_dir / "manifests").glob("*.signed"))[0]
        signed.write_bytes(flip(lambda d: 30)(signed.read_bytes()))

    def bad_digest(case_dir: Path) -> None:
        digests = case_dir / "stream" / "digests.txt"
        lines = digests.read_text().splitlines(keepends=True)
        digests.write_text("".join(lines[:2] + lines[3:]))  # a record left out

    for tamper, reason in ((bad_segment, "is not a record of the signed stream"),
                           (bad_digest, "is not the transcript the END record signs"),
                           (bad_key, "does not match its signed commitment"),
                           (bad_signed, "signature does not verify")):
        caught = run_by_hand(case, tmp_path / f"hand-{tamper.__name__}", tamper)
        assert caught.returncode != 0, caught.stdout
        assert reason in caught.stderr, caught.stderr

    # The command, on a flipped byte in each kind of file, with and without SHA256SUMS fixed.
    segment = sorted(n for n in files if n.startswith("segments/"))[2]
    manifest = sorted(n for n in files if n.endswith(".rec"))[1]
    cases = [
        (segment, flip(lambda d: len(d) // 2), "is not the digest the Archiver signed"),
        (manifest, flip(lambda d: 30), "signature does not verify"),
        (KEYS, lambda d: d[:40] + (b"1" if d[40:41] != b"1" else b"2") + d[41:],
         "does not match the Archiver's signed key commitment"),
        (VIDEO, flip(lambda d: len(d) - 100), "video.ts is not the decrypted segments"),
        ("archiver.pem", flip(lambda d: 200), "archiver.pem"),
    ]
    for name, change, reason in cases:
        for resum in (False, True):
            bad = tmp_path / f"bad-{resum}.zip"
            rewrite(case, bad, name, change, resum)
            if not resum:  # in-process: the same verification as the command
                report_ = verify_package(read_zip(bad))
                assert any(f.startswith(f"{name}: its SHA-256 differs") for f in report_.failures)
                continue
            out = tmp_path / "tampered.ts"
            refused = offline("evidence", "verify", str(bad), "-o", str(out))
            text = refused.stdout.decode()
            assert refused.code == EXIT_NOT_VERIFIED, text + refused.stderr
            assert "NOT VERIFIED" in refused.stderr and reason in text, (name, text)
            assert not out.exists() and not any(p.name.startswith("tampered.ts")
                                                for p in tmp_path.iterdir())


def test_keys_sealed_to_a_recipient_need_its_token(
        archiver_server: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice, court = make_viewer("alice"), make_viewer("court")
    ingest = archiver_server.add_camera("cam1")
    archiver_server.add_viewer(alice.pem, ["cam1"])
    chunks = [chunk(f"sealed{i}") for i in range(4)]
    start = now_ms()
    put(archiver_server, "cam1", ingest, *chunks)
    end = now_ms() + 1
    case = tmp_path / "case.zip"
    made = export(client, archiver_server, alice, case, start, end, "--for", str(court.pem))
    assert made.code == 0, made.stderr
    assert "sealed to CN=court" in made.stderr
    archiver_server.stop()
    files = read_zip(case)
    assert KEYS not in files and files[VIDEO] == b"".join(chunks)

    partly = OfflineClient(client.home)("evidence", "verify", str(case))
    text = partly.stdout.decode()
    assert partly.code == EXIT_PARTLY_VERIFIED, text + partly.stderr
    assert "Not checked:" in text and "NOT verified" in text and "PARTLY VERIFIED" in text
    assert "signature" in text  # everything else was verified

    out = tmp_path / "court.ts"
    opened = client("evidence", "verify", str(case), "--token", court.uri, "-o", str(out),
                    "--expect-archiver", _pin(case))
    assert opened.code == 0, opened.stdout.decode() + opened.stderr
    assert out.read_bytes() == b"".join(chunks)
    wrong = client("evidence", "verify", str(case), "--token", alice.uri)
    assert wrong.code == EXIT_NOT_VERIFIED
    assert "sealed to certificate" in wrong.stdout.decode()


def test_unreadable_packages_are_refused_with_a_sentence(client: Client, tmp_path: Path) -> None:
    offline = OfflineClient(client.home)
    missing = offline("evidence", "verify", str(tmp_path / "nope.zip"))
    assert missing.code == 2 and "No such file" in missing.stderr
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK not really a zip" * 10)
    refused = offline("evidence", "verify", str(garbage))
    assert refused.code == EXIT_NOT_VERIFIED and "not a readable zip" in refused.stderr
    escape = tmp_path / "escape.zip"
    with zipfile.ZipFile(escape, "w") as zf:
        zf.writestr("../EVIDENCE.json", b"{}")
    refused = offline("evidence", "verify", str(escape))
    assert refused.code == EXIT_NOT_VERIFIED and "no evidence package has" in refused.stderr
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("video.ts", b"\x47" * 188)
    refused = offline("evidence", "verify", str(empty), "-o", str(tmp_path / "v.ts"))
    assert refused.code == EXIT_NOT_VERIFIED
    assert "EVIDENCE.json is missing" in refused.stdout.decode()
    assert not any(p.name.startswith("v.ts") for p in tmp_path.iterdir())
    bad = offline("evidence", "verify", str(empty), "--expect-archiver", "abc")
    assert bad.code == 2 and "64 hex digits" in bad.stderr
    nowhere = client("evidence", "export", "--token", "pkcs11:token=x", "--camera", "cam1",
                     "--from", "-1m", "-o", str(tmp_path / "no" / "dir" / "case.zip"))
    assert nowhere.code == 2 and "not a writable directory" in nowhere.stderr


def test_minutes_the_viewer_was_not_authorized_for_are_reported_gaps(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    """Production mode: the export talks HTTPS to an Archiver of the site CA (FUSION_TLS_CA)."""
    archiver_server = https_archiver
    client.tls_ca = archiver_server.tls_ca
    alice = make_viewer("alice")
    ingest = archiver_server.add_camera("cam1")
    fp = archiver_server.add_viewer(alice.pem, ["cam1"])
    before, during, after = ([chunk(f"{tag}{i}") for i in range(2)]
                             for tag in ("before", "revoked", "after"))
    start = now_ms()
    put(archiver_server, "cam1", ingest, *before)
    archiver_server.revoke(fp)
    archiver_server.sleep_into_next_key_period()  # where a revocation takes effect (issue 23)
    put(archiver_server, "cam1", ingest, *during)
    archiver_server.add_viewer(alice.pem, ["cam1"])
    # Authorized again, she joins the running chain from its next key period (issue 23).
    period_ms = archiver_server.key_period_s * 1000
    time.sleep((period_ms - now_ms() % period_ms) / 1000 + 0.05)
    put(archiver_server, "cam1", ingest, *after)
    end = now_ms() + 1
    case = tmp_path / "case.zip"
    made = export(client, archiver_server, alice, case, start, end)
    assert made.code == 0, made.stderr
    assert "gap: camera cam1: 2 segment(s)" in made.stderr
    archiver_server.stop()
    files = read_zip(case)
    assert files[VIDEO] == b"".join(before + after)
    assert len(segments_of(files)) == 4
    result = OfflineClient(client.home)("evidence", "verify", str(case), "--expect-archiver",
                                        _pin(case))
    report = result.stdout.decode()
    # The signed manifests name the 2 segments: the package is partial, and says which.
    assert result.code == EXIT_INCOMPLETE, report + result.stderr
    assert "2 recorded segment(s) in the range" in report
    assert "not in the package" in report
    assert "Result: INCOMPLETE" in report and "2 segment(s) the signed manifests list" in report


def test_a_bad_recipient_certificate_is_refused_before_the_archiver_is_asked(
        client: Client, tmp_path: Path) -> None:
    bogus = tmp_path / "court.pem"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    refused = client("evidence", "export", "--archiver", "http://127.0.0.1:9", "--token",
                     "pkcs11:token=none", "--camera", "cam1", "--from", "-1m", "-o",
                     str(tmp_path / "case.zip"), "--for", str(bogus))
    assert refused.code == 30, refused.stderr
    assert "court.pem" in refused.stderr
    assert not any(p.name.startswith("case.zip") for p in tmp_path.iterdir())
