"""Consolidation (issue 22, item 4), end to end: a real PostgreSQL directory shared by two real
Archiver processes (HTTPS under a site CA), ffmpeg as the camera, real SoftHSM viewers.

a1 records a camera, the camera moves to a2 and back: a1's archive has a gap that a2 recorded.
`fusion-archiver consolidate` makes a1 copy a2's ciphertext, signed manifests and chain records
exactly as a2 signed them (nothing decrypted, nothing signed again), verified against a2's
registry certificate before anything is stored, once. A revoked viewer's key stream is not
copied. With a2 stopped, the viewer plays the whole range from a1 alone, frame-exact, a2's part
verified against a2 (before consolidation it could not). `check` verifies the part against
a2's certificate and finds it tampered with. The Archiver-to-Archiver export answers only a
request signed by a registered Archiver, once; a tampered copy is refused; a copy killed midway
leaves no part. The background pass refills a removed part (retrying while a2 is down);
retention and holds apply to parts; crypto-shredding reaches them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from archiver.consolidation import (
    EXPORT_PATH,
    SETTLE_MS,
    ConsolidationRefused,
    ExportRequest,
    PartStore,
    parse_export,
    verify_part,
)
from archiver.directory import ArchiverRow, open_directory
from fusion_testkit import forkserver
from fusion_testkit.client_cli import Client, Viewer, now_ms, play, wait_for_segments
from keyservice.format import EpochOpener, RecordType, decode_record
from keyservice.identity import SoftwareSigner, fingerprint
from tests.fixtures.camera import frame_hashes, make_source, push, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver
from tests.fixtures.tokens import TokenHandle, enroll_viewer


def _make_viewer(factory: Callable[[], TokenHandle], name: str) -> Viewer:
    token = factory()
    pem = enroll_viewer(token, name)
    return Viewer(name, token, token.object_uri(name), pem)


def _wait_until_accepted(server: ArchiverServer, camera: str, token: str) -> None:
    """After a move the new holder takes the camera's pushes once it re-read the cameras it
    holds: a playlist PUT (archives nothing) says when."""
    deadline = time.monotonic() + 60
    while server.put_segment(camera, token, b"#EXTM3U\n", name="index.m3u8") >= 300:
        assert time.monotonic() < deadline, f"{server.url} never took {camera}'s pushes"
        time.sleep(0.2)


def _other_source(path: Path, seconds: float) -> Path:
    """Other frames than make_source's: the judge tells the two Archivers' video apart."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=size=320x240:rate=25", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
         "-pix_fmt", "yuv420p", "-f", "mpegts", str(path)], check=True)
    return path


def _archiver_cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = forkserver.run([sys.executable, "-P", "-m", "archiver", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _probe_signer(name: str) -> SoftwareSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return SoftwareSigner(cert, key)


@requires_ffmpeg
def test_a_returning_archiver_fills_its_gap_from_the_others_signed_recording(
        postgres_url: str, tmp_path: Path,
        softhsm_token_factory: Callable[[], TokenHandle]) -> None:
    ca = SiteCa.create(tmp_path / "site-ca")
    common = ("--directory", postgres_url, "--peer-tls-ca", str(ca.path),
              "--consolidate-every", "0")
    a1 = production_archiver(ca, tmp_path / "a1", extra_args=(*common, "--name", "a1"))
    a2 = production_archiver(ca, tmp_path / "a2", extra_args=(*common, "--name", "a2"))
    directory = open_directory(postgres_url, tmp_path / "directory-client")
    viewer = _make_viewer(softhsm_token_factory, "vera")
    gone = _make_viewer(softhsm_token_factory, "gus")
    camera = "yard-consolidate"
    with a1, a2:
        token = a1.add_camera(camera)
        a1.add_viewer(viewer.pem, [camera])
        gone_fp = a1.add_viewer(gone.pem, [camera])
        a2.stop()  # a2 starts its chains with both viewers in them
        a2.start()
        # The viewer pins each Archiver's signing certificate once (no site CA here).
        client = Client(tmp_path / "client-home", tls_ca=ca.path)
        for server in (a1, a2):
            pem = tmp_path / f"{server.data_dir.name}-signing.pem"
            pem.write_bytes(x509.load_der_x509_certificate(directory.archiver(
                server.data_dir.name).certificate).public_bytes(Encoding.PEM))
            pinned = client("cameras", "--archiver", server.url, "--token", viewer.uri,
                            "--archiver-cert", str(pem))
            assert pinned.code == 0, pinned.stderr
        # a1 records, the camera moves to a2, a2 records, the camera comes back to a1.
        first = make_source(tmp_path / "first.ts", seconds=3)
        second = _other_source(tmp_path / "second.ts", seconds=4)
        start = now_ms()
        push(first, a1.url, camera, token, realtime=True, hls_time=1)
        wait_for_segments(a1, camera, 3)
        away = now_ms()
        assert directory.move_camera(camera, "a2", away)
        _wait_until_accepted(a2, camera, token)
        push(second, a2.url, camera, token, realtime=True, hls_time=1)
        wait_for_segments(a2, camera, 4)
        back = now_ms()
        assert directory.move_camera(camera, "a1", back)
        _wait_until_accepted(a1, camera, token)
        # Revoked after a2 recorded: its key stream for a2's part is not copied.
        a1.revoke(gone_fp)

        # Before consolidation, with a2 down, a1 alone cannot play a2's part.
        a2.stop()
        before = play(client, a1.url, viewer, tmp_path / "before.ts", start, back - 1,
                      camera=camera)
        assert before.code != 0 and not (tmp_path / "before.ts").exists(), before.stderr
        a2.start()

        # The admin command: a1 copies a2's part, verified against a2's certificate, once the
        # placement has settled (a2 may archive its last segment after the move back).
        admin = ("--archiver", a1.url, "--data", str(a1.data_dir), "--tls-ca", str(ca.path))
        done = _archiver_cli("consolidate", "--camera", camera, *admin)
        if "not copied yet (try again after" in done.stdout:  # asked before it settled
            assert done.returncode == 0 and not (a1.data_dir / "consolidated").exists()
            while now_ms() <= back + SETTLE_MS:
                time.sleep(0.2)
            done = _archiver_cli("consolidate", "--camera", camera, *admin)
        assert done.returncode == 0, done.stderr + done.stdout
        a2_cert = x509.load_der_x509_certificate(directory.archiver("a2").certificate)
        a2_subject = a2_cert.subject.rfc4514_string()
        assert f"consolidated from a2 (signed by {a2_subject})" in done.stdout, done.stdout
        parts = PartStore(a1.data_dir / "consolidated").parts(camera)
        assert len(parts) == 1 and parts[0].archiver == "a2", parts
        part = parts[0]
        assert part.signer_fingerprint == fingerprint(a2_cert).hex()
        assert part.segments >= 4 and away <= part.from_ms <= part.to_ms, part
        # Exactly a2's bytes: each segment and manifest as a2 archived it.
        a2_files = b"".join(p.read_bytes() for p in sorted(
            (a2.data_dir / "archive" / camera).glob("*.fsa")))
        kept = (a1.data_dir / "consolidated" / camera / part.part / "records.fsa").read_bytes()
        assert kept in a2_files or all(r in a2_files for r in _records(kept))
        # The key streams: the viewer's, not the revoked one's.
        keys = (a1.data_dir / "consolidated" / camera / part.part / "keys.fsk").read_bytes()
        holders = {r.viewer_fingerprint.hex() for r in map(decode_record, _records(keys))
                   if isinstance(r, EpochOpener)}
        viewer_fp = fingerprint(x509.load_pem_x509_certificate(viewer.pem.read_bytes())).hex()
        assert holders == {viewer_fp}, holders
        assert part.viewers == 1
        # Twice: stored once.
        again = _archiver_cli("consolidate", "--camera", camera, *admin)
        assert again.returncode == 0, again.stderr
        assert "no gap recorded by another Archiver" in again.stdout, again.stdout
        assert len(PartStore(a1.data_dir / "consolidated").parts(camera)) == 1

        _export_is_only_for_archivers_and_a_tampered_copy_is_refused(
            a2, directory, camera, away, back, tmp_path)

        # a2 stops: the viewer plays the whole range from a1 alone, frame-exact, a1's part
        # verified against a1 and a2's part against a2's signature (a1 signs only its END).
        a2.stop()
        out = tmp_path / "whole.ts"
        played = play(client, a1.url, viewer, out, start, back - 1, camera=camera)
        assert played.code == 0, played.stderr
        assert frame_hashes(out) == frame_hashes(first) + frame_hashes(second), played.stderr
        assert re.search(r"part 1 of 2: .* recorded by Archiver a1, verified against a1 ",
                         played.stderr), played.stderr
        assert re.search(rf"part 2 of 2: .* recorded by Archiver a2, verified against a2 .*"
                         rf"consolidated from a2 at a1 \(signed by {re.escape(a2_subject)}\)",
                         played.stderr), played.stderr
        assert "complete (every part's signed end record verified)" in played.stderr

        # check (offline): the part verified against a2's certificate; tampered, found.
        a1.stop()
        checked = _archiver_cli("check", "--data", str(a1.data_dir), "--directory",
                                postgres_url)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"consolidated part of camera {camera} from a2 (signed by {a2_subject})" \
            in checked.stdout, checked.stdout
        where = a1.data_dir / "consolidated" / camera / part.part
        original = (where / "records.fsa").read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        (where / "records.fsa").write_bytes(bytes(data))
        tampered = _archiver_cli("check", "--data", str(a1.data_dir), "--directory",
                                 postgres_url)
        assert tampered.returncode == 3, tampered.stdout + tampered.stderr
        assert f"PROBLEM: The copy of camera '{camera}' does not verify against its signer's " \
            "certificate" in tampered.stdout, tampered.stdout

        # Automatic: an Archiver that holds a camera again consolidates its gaps by itself;
        # while the other is down it says so and tries again (recording goes on).
        shutil.rmtree(where)
        a1.extra_args = (*a1.extra_args, "--consolidate-every", "1")
        a1.start()
        deadline = time.monotonic() + 60
        while "tried again later" not in a1.log():
            assert time.monotonic() < deadline, a1.log()[-3000:]
            time.sleep(0.2)
        assert not where.exists()
        a2.start()
        while not (where / "part.json").exists():
            assert time.monotonic() < deadline, a1.log()[-3000:]
            time.sleep(0.2)
        assert (where / "records.fsa").read_bytes() == original
        # Crypto-shredding reaches the copies: the viewer revoked with its key streams deleted
        # leaves no opener or chain record in the part (before: kept until retention).
        assert (where / "keys.fsk").stat().st_size > 0
        a1.revoke(viewer_fp, delete_key_streams=True)
        assert (where / "keys.fsk").read_bytes() == b""
    directory.close()


_KILLED_MID_COPY = """
import base64, os, signal, sys
from cryptography import x509
from archiver.consolidated import PartStore, parse_export, verify_part
body, root, camera, since, until = sys.argv[1:]
prelude, records = parse_export(open(body, "rb").read())
der = base64.b64decode(prelude["certificate"])
key = x509.load_der_x509_certificate(der).public_key()
part = verify_part(camera, records, key, (int(since), int(until) + 30_000))

def die(name):
    if name == "records.fsa":
        os.kill(os.getpid(), signal.SIGKILL)

PartStore(__import__("pathlib").Path(root)).store(part, "a2", der, (int(since), int(until)),
                                                  0, die)
"""


def _records(data: bytes) -> list[bytes]:
    from archiver.consolidation import split_records
    return split_records(data, tuple(RecordType))


def _export_is_only_for_archivers_and_a_tampered_copy_is_refused(
        a2: ArchiverServer, directory: object, camera: str, since: int, until: int,
        tmp_path: Path) -> None:
    from archiver.directory import Directory
    assert isinstance(directory, Directory)
    url = a2.url + EXPORT_PATH
    probe = _probe_signer("probe")
    # An Archiver the test makes: in the registry, its key in memory.
    directory.register_archiver(ArchiverRow(
        "probe", "https://127.0.0.1:9", probe.certificate.public_bytes(Encoding.DER),
        now_ms(), now_ms()))
    asked = (since, until + 30_000)
    ask = ExportRequest.make(probe, "probe", camera, *asked, now_ms())
    # Anonymous, or signed by a key the registry does not hold for that name: refused.
    stranger = ExportRequest.make(_probe_signer("probe"), "probe", camera, since, until,
                                  now_ms())
    unsigned = {**asdict(ask), "signature": base64.b64encode(b"x" * 70).decode()}
    for body in (unsigned, asdict(stranger), {**asdict(ask), "archiver": "a2"}):
        refused = httpx.post(url, json=body, verify=a2.verify, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "unauthenticated"
    answer = httpx.post(url, json=asdict(ask), verify=a2.verify, timeout=60)
    assert answer.status_code == 200, answer.text
    replay = httpx.post(url, json=asdict(ask), verify=a2.verify, timeout=60)
    assert replay.status_code == 401, replay.text  # a captured request is good once

    prelude, records = parse_export(answer.content)
    cert = x509.load_der_x509_certificate(base64.b64decode(prelude["certificate"]))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    part = verify_part(camera, records, key, asked)
    assert part.segments >= 4
    # One bit changed anywhere in a segment or a manifest, a segment left out, another
    # Archiver's key: refused, with what failed.
    segment_at = next(i for i, r in enumerate(records) if r[0] == RecordType.SEGMENT)
    manifest_at = next(i for i, r in enumerate(records) if r[0] == RecordType.MANIFEST
                       and i > segment_at)
    for index, why in ((segment_at, "is not the one it signed"),
                       (manifest_at, "is not signed by it")):
        changed = list(records)
        raw = bytearray(changed[index])
        raw[-40] ^= 0x01
        changed[index] = bytes(raw)
        with pytest.raises(ConsolidationRefused, match=why):
            verify_part(camera, changed, key, asked)
    with pytest.raises(ConsolidationRefused, match=r"does not list its segments|came without"):
        verify_part(camera, records[:segment_at] + records[segment_at + 1:], key, asked)
    other = _probe_signer("a2").certificate.public_key()
    assert isinstance(other, ec.EllipticCurvePublicKey)
    with pytest.raises(ConsolidationRefused, match="not signed by it"):
        verify_part(camera, records, other, asked)

    # Stored atomically: a failure after the records were written leaves nothing (no part,
    # no half directory); then stored once, and a second time not at all.
    store = PartStore(tmp_path / "store")

    def fail_after_records(name: str) -> None:
        if name == "records.fsa":
            raise OSError("injected: the process dies mid-copy")

    certificate = cert.public_bytes(Encoding.DER)
    with pytest.raises(OSError, match="injected"):
        store.store(part, "a2", certificate, (since, until), now_ms(), fail_after_records)
    assert store.parts() == [] and not any((tmp_path / "store").rglob("*.fsa"))
    # kill -9 mid-copy: a process verifies the same export and is killed (SIGKILL, by
    # itself, right after the records file was written and fsynced): no part, and what it
    # left (a hidden directory never renamed into place) is removed at the next start.
    body = tmp_path / "export.bin"
    body.write_bytes(answer.content)
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_COPY, str(body),
                             str(tmp_path / "store"), camera, str(since), str(until)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert store.parts() == []
    left = list((tmp_path / "store" / camera).glob(".incoming-*"))
    assert len(left) == 1 and (left[0] / "records.fsa").exists(), left
    assert PartStore(tmp_path / "store").clean_incoming() == 1 and not left[0].exists()
    stored = store.store(part, "a2", certificate, (since, until), now_ms())
    assert stored is not None and store.parts() == [stored]
    assert store.store(part, "a2", certificate, (since, until), now_ms()) is None
    assert json.loads((store.path_of(stored) / "part.json").read_text())["segments"] \
        == part.segments

    # Retention applies to a consolidated part as to the Archiver's own days: kept while
    # young or held, removed (its key streams first) once past its camera's retention.
    from archiver.archive import Archive
    from archiver.consolidation import Consolidator
    from archiver.settings import Settings

    now = [now_ms()]
    settings = Settings(data_dir=tmp_path / "retention", retention_days=1)
    archive = Archive(settings, probe, clock=lambda: now[0])
    try:
        keeper = Consolidator(archive, settings)
        assert archive.directory.add_camera(camera, bytes(32), None, now[0])
        assert keeper.store.store(part, "a2", certificate, (since, until), now[0]) is not None
        assert keeper.expire() == 0  # younger than a day
        now[0] += 2 * 86_400_000
        hold = archive.directory.add_hold(camera, part.from_ms, part.to_ms, "case 7", "admin",
                                          now[0])
        assert keeper.expire() == 0 and len(keeper.store.parts()) == 1  # held
        archive.directory.remove_hold(hold.hold_id)
        assert keeper.expire() == 1 and keeper.store.parts() == []
        assert not list((settings.data_dir / "consolidated").rglob("*.fs[ak]"))
    finally:
        archive.close()
