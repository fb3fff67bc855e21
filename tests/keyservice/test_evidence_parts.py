"""Evidence packages of parts (fusion-evidence/2, keyservice/evidence/parts.py), pure: two
software Archivers each sign their part's stream, requested with the nonce of its place in the
package. Each tampering is refused for its own reason (the real site's package, end to end:
client/test_across.py)."""

from __future__ import annotations

import json
import os

import pytest

from keyservice.evidence.build import build_package, collect, sha256sums
from keyservice.evidence.layout import FORMAT, FORMAT_PARTS, INDEX, SUMS
from keyservice.evidence.parts import (
    PackagePart,
    PartsReport,
    build_parts_package,
    part_nonce,
    verify_evidence,
)
from keyservice.framing import RecordSplitter
from keyservice.identity import SoftwareIdentity, SoftwareSigner, fingerprint
from keyservice.reader import SegmentPlaintext, StreamReader
from tests.client.streams import T0, Seg, build_stream, software_signer, software_viewer

CAMERA = "cam1"
RANGE = (T0, T0 + 20_000)
# Part 1 (a1) reaches into part 2's time, as the old Archiver's part does; part 2 (a2) starts
# just after a1's last signed video.
PART_RANGES = ((T0, T0 + 20_000), (T0 + 6_001, T0 + 20_000))
PLANS = ((0, 2_000, 4_000), (8_000, 10_000, 12_000))


def _part(viewer: SoftwareIdentity, signer: SoftwareSigner, package_id: bytes, number: int,
          count: int = 2) -> tuple[dict[str, bytes], bytes]:
    """One part's one-part package, its stream requested as part ``number`` of ``count``."""
    nonce = part_nonce(package_id, CAMERA, *RANGE, number, count)
    plan = [Seg(T0 + at, os.urandom(700) + b"part %d" % number) for at in PLANS[number - 1]]
    part_range = PART_RANGES[number - 1]
    data, _ = build_stream(viewer, signer, plan, range_ms=part_range, nonce=nonce)
    reader = StreamReader(viewer, lambda cert: None)
    video = b"".join(e.data for e in reader.feed(data) if isinstance(e, SegmentPlaintext))
    reader.finish()
    keys = {key_id: k.key for key_id, k in reader.verified_keys.items()}
    collected = collect(((r, bytes(raw)) for r, raw in RecordSplitter().feed(data)), CAMERA,
                        keys)
    files = build_package(camera=CAMERA, from_ms=part_range[0], to_ms=part_range[1],
                          archiver_cert=signer.certificate, collected=collected, keys=keys,
                          video=video, exported_ms=T0 + 60_000)
    return files, video


def _package(viewer: SoftwareIdentity, a1: SoftwareSigner, a2: SoftwareSigner
             ) -> tuple[dict[str, bytes], bytes]:
    package_id = os.urandom(16)
    (p1, v1), (p2, v2) = _part(viewer, a1, package_id, 1), _part(viewer, a2, package_id, 2)
    files = build_parts_package(camera=CAMERA, from_ms=RANGE[0], to_ms=RANGE[1],
                                package_id=package_id, parts=[PackagePart("a1", p1),
                                                              PackagePart("a2", p2)],
                                exported_ms=T0 + 60_000)
    return files, v1 + v2


@pytest.fixture(scope="module")
def site() -> tuple[SoftwareIdentity, SoftwareSigner, SoftwareSigner]:
    return software_viewer("alice"), software_signer("a1"), software_signer("a2")


@pytest.fixture(scope="module")
def package(site: tuple[SoftwareIdentity, SoftwareSigner, SoftwareSigner]
            ) -> tuple[dict[str, bytes], bytes]:
    return _package(*site)


def _pins(site: tuple[SoftwareIdentity, SoftwareSigner, SoftwareSigner]) -> list[bytes]:
    return [fingerprint(site[1].certificate), fingerprint(site[2].certificate)]


def _in(files: dict[str, bytes], n: int) -> dict[str, bytes]:
    prefix = f"parts/{n:02d}/"
    return {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}


def _with(files: dict[str, bytes], n: int, part: dict[str, bytes]) -> dict[str, bytes]:
    prefix = f"parts/{n:02d}/"
    out = {k: v for k, v in files.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in part.items()})
    return out


def _resum(files: dict[str, bytes], index: dict[str, object] | None = None) -> dict[str, bytes]:
    """As a tamperer who also rewrites the index and SHA256SUMS."""
    out = {k: v for k, v in files.items() if k != SUMS}
    if index is not None:
        out[INDEX] = json.dumps(index).encode()
    out[SUMS] = sha256sums(out)
    return out


def _refused(report: PartsReport | object, reason: str) -> None:
    assert isinstance(report, PartsReport)
    assert any(reason in f for f in report.failures), report.failures
    assert report.video is None


def test_a_package_of_parts_verifies_each_part_against_its_own_signer(
        package: tuple[dict[str, bytes], bytes],
        site: tuple[SoftwareIdentity, SoftwareSigner, SoftwareSigner]) -> None:
    files, video = package
    assert json.loads(files[INDEX])["format"] == FORMAT_PARTS
    report = verify_evidence(files, expect_archiver=_pins(site))
    assert isinstance(report, PartsReport)
    # (These synthetic streams sign no chain head, so each part's end is "missing": the real
    # site's package is VERIFIED whole, client/test_across.py.)
    assert report.ok and report.signer_established, report.failures
    assert report.video == video
    assert [(p.archiver, p.report.archiver_sha256) for p in report.parts] == [
        ("a1", fingerprint(site[1].certificate).hex()),
        ("a2", fingerprint(site[2].certificate).hex())]
    [switch] = report.switches
    assert (switch.from_archiver, switch.to_archiver) == ("a1", "a2")
    assert (switch.last_end_ms, switch.first_start_ms) == (
        report.parts[0].report.last_ms, T0 + 8_000)
    # Only a1 pinned: a2's part is not checked against a1's certificate, it fails.
    _refused(verify_evidence(files, expect_archiver=_pins(site)[:1]),
             "part 2 (a2): archiver.pem")
    # Each part is a one-part package on its own.
    alone = verify_evidence(_in(files, 2), expect_archiver=_pins(site)[1:])
    assert json.loads(_in(files, 2)[INDEX])["format"] == FORMAT
    assert alone.ok and not isinstance(alone, PartsReport)


def test_a_part_cut_swapped_foreign_or_resigned_is_refused(
        package: tuple[dict[str, bytes], bytes],
        site: tuple[SoftwareIdentity, SoftwareSigner, SoftwareSigner]) -> None:
    files, _ = package
    index = json.loads(files[INDEX])
    pins = _pins(site)
    # Part 2 cut out, the range shrunk to part 1's: its Archiver signed "part 1 of 2".
    cut = {k: v for k, v in files.items() if not k.startswith("parts/02/")}
    _refused(verify_evidence(_resum(cut, dict(index, to_ms=index["parts"][0]["to_ms"],
                                              parts=index["parts"][:1])), expect_archiver=pins),
             "was not requested as part 1 of 1 of this package")
    # Swapped.
    swapped = _with(_with(files, 1, _in(files, 2)), 2, _in(files, 1))
    listed = [dict(index["parts"][1], dir="parts/01/"), dict(index["parts"][0], dir="parts/02/")]
    _refused(verify_evidence(_resum(swapped, dict(index, parts=listed)), expect_archiver=pins),
             "was not requested as part 1 of 2 of this package")
    # Part 2 of another export of the same range (genuine, signed by a2).
    other, _ = _package(*site)
    _refused(verify_evidence(_resum(_with(files, 2, _in(other, 2))), expect_archiver=pins),
             "cut, swapped, or taken from another export")
    # Part 2 re-signed by the other Archiver: a1 signs a stream of part 2's place and range.
    viewer, a1, _ = site
    package_id = bytes.fromhex(index["package_id"])
    resigned, _ = _part(viewer, a1, package_id, 2)
    listed = [index["parts"][0], dict(index["parts"][1],
                                      archiver_sha256=fingerprint(a1.certificate).hex())]
    _refused(verify_evidence(_resum(_with(files, 2, resigned), dict(index, parts=listed)),
                             expect_archiver=pins),
             "are signed by the same Archiver certificate")
    # A file in no part, and a garbled index: refused with a sentence, not a traceback.
    _refused(verify_evidence(_resum({**files, "extra.txt": b"x"}), expect_archiver=pins),
             "extra.txt is in the package but in no part of it")
    _refused(verify_evidence(_resum(files, dict(index, parts=[{"dir": "../"}, 3])),
                             expect_archiver=pins), "lists part 1 wrongly")


def test_the_part_nonce_binds_package_camera_range_and_place() -> None:
    package_id = bytes(range(16))
    base = part_nonce(package_id, CAMERA, *RANGE, 1, 2)
    assert len(base) == 16
    others = {part_nonce(bytes(16), CAMERA, *RANGE, 1, 2), part_nonce(package_id, "cam2", *RANGE, 1, 2),
              part_nonce(package_id, CAMERA, RANGE[0] + 1, RANGE[1], 1, 2),
              part_nonce(package_id, CAMERA, *RANGE, 2, 2), part_nonce(package_id, CAMERA, *RANGE, 1, 3)}
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError):
        part_nonce(package_id, CAMERA, *RANGE, 3, 2)
