"""Evidence packages must prove their coverage and their signer (issue 19, findings 2, 5, 6):
a package cut at either end is reported partial with its own exit code, a package from another
Archiver is not VERIFIED without a trust anchor, and damaged zips are refused with a reason.

Real parts: an Archiver in production mode (HTTPS under a site CA), ffmpeg as the camera
(its HLS segments uploaded over HTTPS as they are due), `fusion-client evidence export` with
a SoftHSM viewer token, and hand-edited packages with every checksum recomputed."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from client.evidence import read_zip
from fusion_testkit import forkserver
from fusion_testkit.client_cli import Client, Viewer, iso, now_ms, wait_for_segments
from keyservice.crypto import open_segment
from keyservice.evidence.build import sha256sums
from keyservice.evidence.layout import INDEX, KEYS, SUMS, VIDEO
from keyservice.evidence.verify import parse_keys
from keyservice.format import Manifest, Segment, decode_record
from tests.fixtures.camera import make_source, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver

EXIT_NOT_VERIFIED, EXIT_INCOMPLETE, EXIT_SIGNER_NOT_ESTABLISHED = 60, 62, 63
SEGMENTS = 15


def camera_segments(tmp_path: Path, name: str, seconds: int = SEGMENTS) -> list[bytes]:
    """A real camera's output: ffmpeg's HLS muxer cuts an H.264 stream into 1 s segments."""
    source = make_source(tmp_path / f"{name}.ts", seconds=seconds)
    out = tmp_path / f"{name}-hls"
    out.mkdir()
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-i",
                    str(source), "-c", "copy", "-f", "hls", "-hls_time", "1",
                    "-hls_list_size", "0", "-hls_segment_filename", str(out / "seg%03d.ts"),
                    str(out / "index.m3u8")], check=True)
    files = sorted(out.glob("seg*.ts"))
    assert len(files) == seconds, files
    return [f.read_bytes() for f in files]


def record(server: ArchiverServer, camera: str, token: str, segments: list[bytes]) -> None:
    """Upload each segment over HTTPS when a live camera would (1 s apart): capture times are
    then real-time, as from a camera."""
    start = time.monotonic()
    for i, data in enumerate(segments):
        due = start + i + 1
        while time.monotonic() < due:
            time.sleep(min(0.05, max(0.0, due - time.monotonic())))
        assert server.put_segment(camera, token, data, f"seg{i:03d}.ts") == 201
    wait_for_segments(server, camera, len(segments), timeout=60)


def export(client: Client, server: ArchiverServer, viewer: Viewer, out: Path, start: int,
           end: int) -> str:
    assert server.tls_ca is not None
    made = client("evidence", "export", "--archiver", server.url, "--tls-ca",
                  str(server.tls_ca), "--token", viewer.uri, "--camera", "cam1",
                  "--from", iso(start), "--to", iso(end), "-o", str(out))
    assert made.code == 0, made.stderr
    files = read_zip(out)
    return json.loads(files[INDEX])["archiver_sha256"]


def write_package(files: dict[str, bytes], target: Path) -> Path:
    files = dict(files)
    files[SUMS] = sha256sums({k: v for k, v in files.items() if k != SUMS})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name in sorted(files):
            zf.writestr(name, files[name])
    target.write_bytes(buffer.getvalue())
    return target


def cut(package: Path, target: Path, *, first: int = 0, last: int = 0) -> Path:
    """The attack: drop the first or last manifests with their segments and keys; rewrite
    video.ts, the index and SHA256SUMS to match (the signed stream files stay as they are)."""
    files = read_zip(package)
    index = json.loads(files[INDEX])
    names: list[str] = index["manifests"]
    dropped = names[:first] + (names[len(names) - last:] if last else [])
    gone: set[tuple[int, int]] = set()
    for name in dropped:
        manifest = decode_record(files[name])
        assert isinstance(manifest, Manifest)
        gone |= {(int(e.stream), e.seq) for e in manifest.entries}
        stem = name[:-len(".rec")]
        for suffix in (".rec", ".signed", ".sig"):
            del files[stem + suffix]
    keys = parse_keys(files[KEYS])
    kept: list[Segment] = []
    kept_raw: list[bytes] = []
    for name in index["segments"]:
        raw = files.pop(name)
        segment = decode_record(raw)
        assert isinstance(segment, Segment)
        if (int(segment.stream), segment.seq) not in gone:
            kept.append(segment)
            kept_raw.append(raw)
    assert len(kept) == len(index["segments"]) - first - last  # one segment per manifest
    seg_names = [f"segments/s{i:08d}.seg" for i in range(len(kept))]
    files.update(zip(seg_names, kept_raw, strict=True))
    used = {s.key_id for s in kept}
    files[KEYS] = "".join(f"{k.hex()} {stream} {key.hex()}\n" for k, (stream, key)
                          in sorted(keys.items()) if k in used).encode()
    files[VIDEO] = b"".join(open_segment(keys[s.key_id][1], s) for s in kept)
    index["manifests"] = [n for n in names if n not in dropped]
    index["segments"] = seg_names
    files[INDEX] = (json.dumps(index, indent=1) + "\n").encode()
    return write_package(files, target)


@requires_ffmpeg
def test_a_package_cut_at_either_end_is_reported_partial(
        https_archiver: ArchiverServer, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    alice = make_viewer("alice")
    ingest = https_archiver.add_camera("cam1")
    https_archiver.add_viewer(alice.pem, ["cam1"])
    start = now_ms()
    record(https_archiver, "cam1", ingest, camera_segments(tmp_path, "cam"))
    end = now_ms() + 1
    case = tmp_path / "case.zip"
    pin = export(client, https_archiver, alice, case, start, end)
    https_archiver.stop()  # verification is offline
    assert len(json.loads(read_zip(case)[INDEX])["manifests"]) == SEGMENTS

    genuine = client("evidence", "verify", str(case), "--expect-archiver", pin)
    text = genuine.stdout.decode()
    assert genuine.code == 0, text + genuine.stderr
    assert "Result: VERIFIED" in text and "Missing" not in text

    for where in ("first", "last"):
        for count in (1, 3, 7):
            bad = cut(case, tmp_path / f"cut-{where}-{count}.zip", **{where: count})
            out = tmp_path / f"cut-{where}-{count}.ts"
            result = client("evidence", "verify", str(bad), "--expect-archiver", pin,
                            "-o", str(out))
            text = result.stdout.decode()
            assert result.code == EXIT_INCOMPLETE, (where, count, text + result.stderr)
            assert "Result: VERIFIED" not in text and "Result: INCOMPLETE" in text
            assert "INCOMPLETE" in result.stderr
            if where == "first":  # exactly which signed part is missing
                assert f"manifest {count - 1} (which manifest {count} names" in text, text
            else:
                assert (f"manifests {SEGMENTS - count}..{SEGMENTS - 1} are not in the package"
                        f", though the Archiver's signed END names chain head {SEGMENTS}"
                        ) in text, text
            assert not out.exists()


@requires_ffmpeg
def test_a_package_from_another_archiver_is_not_verified_without_a_trust_anchor(
        https_archiver: ArchiverServer, site_ca: SiteCa, make_viewer: Callable[[str], Viewer],
        client: Client, tmp_path: Path) -> None:
    alice = make_viewer("alice")
    # The attacker's Archiver: its own data directory and key, same site, same camera name.
    with production_archiver(site_ca, tmp_path / "rogue") as rogue:
        real, other = camera_segments(tmp_path, "real", 4), camera_segments(tmp_path, "other", 4)
        other = other[2:] + other[:2]  # other video than the genuine camera's
        uploads = []
        for server, segments in ((https_archiver, real), (rogue, other)):
            uploads.append((server, server.add_camera("cam1"), segments))
            server.add_viewer(alice.pem, ["cam1"])
        start = now_ms()
        began = time.monotonic()
        for i in range(4):  # both record cam1 over the same time
            while time.monotonic() < began + i + 1:
                time.sleep(0.05)
            for server, token, segments in uploads:
                assert server.put_segment("cam1", token, segments[i], f"s{i}.ts") == 201
        for server, _, _ in uploads:
            wait_for_segments(server, "cam1", 4, timeout=60)
        end = now_ms() + 1
        pin = export(client, https_archiver, alice, tmp_path / "genuine.zip", start, end)
        rogue_pin = export(client, rogue, alice, tmp_path / "rogue.zip", start, end)
    https_archiver.stop()
    assert rogue_pin != pin
    subjects = {json.loads(read_zip(tmp_path / f"{n}.zip")[INDEX])["archiver_subject"]
                for n in ("genuine", "rogue")}
    assert len(subjects) == 2 and all("Fusion Archiver" in s for s in subjects), subjects

    fake = client("evidence", "verify", str(tmp_path / "rogue.zip"))
    text = fake.stdout.decode()
    assert fake.code == EXIT_SIGNER_NOT_ESTABLISHED, text + fake.stderr
    assert "Result: VERIFIED" not in text
    assert "CONSISTENT, SIGNER NOT ESTABLISHED" in text and "signer NOT established" in text
    pinned = client("evidence", "verify", str(tmp_path / "rogue.zip"), "--expect-archiver", pin)
    assert pinned.code == EXIT_NOT_VERIFIED, pinned.stdout.decode()
    assert "is not the expected Archiver certificate" in pinned.stdout.decode()
    # The genuine package: the same verdict without an anchor, VERIFIED with one.
    unanchored = client("evidence", "verify", str(tmp_path / "genuine.zip"))
    assert unanchored.code == EXIT_SIGNER_NOT_ESTABLISHED
    good = client("evidence", "verify", str(tmp_path / "genuine.zip"), "--expect-archiver", pin)
    text = good.stdout.decode()
    assert good.code == 0, text + good.stderr
    assert "Result: VERIFIED" in text and "signer established: its fingerprint" in text
    # A site CA that did not issue the signing certificate establishes nothing: refused.
    by_ca = client("evidence", "verify", str(tmp_path / "genuine.zip"), "--site-ca",
                   str(site_ca.path))
    assert by_ca.code == EXIT_NOT_VERIFIED, by_ca.stdout.decode()
    assert "was not issued by the given site CA" in by_ca.stdout.decode()


def issue_signing_certificate(site_ca: SiteCa, public: ec.EllipticCurvePublicKey,
                              path: Path) -> Path:
    """What a site's CA issues for an Archiver's signing key: digitalSignature only."""
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                        "Example Site"),
                                     x509.NameAttribute(NameOID.COMMON_NAME,
                                                        "Fusion Archiver site-1")]))
            .issuer_name(site_ca.certificate.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .sign(site_ca.key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


@requires_ffmpeg
def test_an_archiver_certified_by_the_site_ca_is_established_with_site_ca(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    data = tmp_path / "archiver"
    with production_archiver(site_ca, data) as first:  # makes its signing key
        answer = httpx.get(f"{first.url}/v1/archiver", verify=first.verify, timeout=30).json()
    own = x509.load_pem_x509_certificate(answer["certificate"].encode())
    public = own.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    issued = issue_signing_certificate(site_ca, public, tmp_path / "signing.pem")
    # Another key's certificate is refused at start, with a sentence.
    other = issue_signing_certificate(site_ca, ec.generate_private_key(ec.SECP256R1())
                                      .public_key(), tmp_path / "other.pem")
    refused = forkserver.run([sys.executable, "-m", "archiver", "serve", "--data", str(data),
                              "--port", "1", "--signing-cert", str(other)],
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode == 30, refused.stderr
    assert "not a certificate for this Archiver's signing key" in refused.stderr
    assert "Traceback" not in refused.stderr

    alice = make_viewer("alice")
    server = production_archiver(site_ca, data, extra_args=("--signing-cert", str(issued)))
    with server:
        ingest = server.add_camera("cam1")
        server.add_viewer(alice.pem, ["cam1"])
        start = now_ms()
        record(server, "cam1", ingest, camera_segments(tmp_path, "cam", 3))
        end = now_ms() + 1
        case = tmp_path / "case.zip"
        export(client, server, alice, case, start, end)
    verified = client("evidence", "verify", str(case), "--site-ca", str(site_ca.path))
    text = verified.stdout.decode()
    assert verified.code == 0, text + verified.stderr
    assert "Result: VERIFIED" in text
    assert "signer established: its certificate was issued by the site CA" in text
    # Another site's CA does not establish it.
    elsewhere = SiteCa.create(tmp_path / "elsewhere", name="Other Site CA")
    foreign = client("evidence", "verify", str(case), "--site-ca", str(elsewhere.path))
    assert foreign.code == EXIT_NOT_VERIFIED, foreign.stdout.decode()
    assert "was not issued by the given site CA" in foreign.stdout.decode()


def test_encrypted_or_damaged_zip_members_are_refused_with_the_reason(
        client: Client, tmp_path: Path) -> None:
    body = b"{\"format\": \"fusion-evidence/1\"}" * 50
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("EVIDENCE.json", body)
    data = bytearray(deflated.read_bytes())
    # The local header: 30 bytes, the name, then the compressed data: damage it.
    name_len, extra_len = struct.unpack_from("<HH", data, 26)
    at = 30 + name_len + extra_len
    data[at:at + 8] = b"\xff" * 8
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(bytes(data))
    # The "encrypted" flag (general purpose bit 0) in both the local and central headers.
    encrypted_data = bytearray(deflated.read_bytes())
    struct.pack_into("<H", encrypted_data, 6, struct.unpack_from("<H", encrypted_data, 6)[0] | 1)
    central = encrypted_data.rfind(b"PK\x01\x02")
    struct.pack_into("<H", encrypted_data, central + 8,
                     struct.unpack_from("<H", encrypted_data, central + 8)[0] | 1)
    encrypted = tmp_path / "encrypted.zip"
    encrypted.write_bytes(bytes(encrypted_data))
    for package, reason in ((corrupt, "compressed data is damaged"),
                            (encrypted, "is encrypted")):
        result = client("evidence", "verify", str(package))
        assert result.code == EXIT_NOT_VERIFIED, result.stderr
        assert reason in result.stderr and "EVIDENCE.json" in result.stderr, result.stderr
        assert "Unexpected error" not in result.stderr
        assert re.search(r"please report", result.stderr) is None


pytestmark = pytest.mark.timeout(600)
