"""Evidence packages and access grants of a range across a change of Archiver (issue 22, item
2), end to end: a real PostgreSQL directory shared by two real Archiver processes (HTTPS under
a site CA), ffmpeg as the camera and as the judge, real SoftHSM viewer tokens, the real
fusion-client and fusion-archiver. A failover looks to viewers exactly like this `cameras move`.

Before: `evidence export` and `grant` of a range across the move were refused ("recorded by
several Archivers in this range ... do each part on its own"). After: one package (format
fusion-evidence/2) holds each part, verified offline against its own signer with the switch at
its signed edges; one grant per part, played by the grantee as one range. A package with a part
cut, swapped, taken from another export or carrying the other Archiver's certificate is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from client.evidence_zip import read_zip
from client.pinning import KnownArchivers
from client.site import UntrustedArchiver
from client.viewer import VerifiedRange, fetch_range
from fusion_testkit.client_cli import Client, Viewer, iso, play
from fusion_testkit.site import (
    TwoArchivers,
    pin,
    record_across_a_move,
    signing_cert,
    two_archivers,
)
from fusion_testkit.web import ViewerProcess
from keyservice.evidence.build import sha256sums
from keyservice.evidence.layout import FORMAT, FORMAT_PARTS, INDEX, SUMS
from keyservice.evidence.parts import verify_evidence
from keyservice.exitcodes import ExitCode
from keyservice.identity import fingerprint
from keyservice.timespec import parse_time
from tests.fixtures.camera import frame_hashes, requires_ffmpeg

SWITCH = re.compile(r"switch from Archiver a1 to a2: a1's last segment ends (\S+) \(signed\); "
                    r"a2's first segment starts (\S+) \(signed\)")


@pytest.fixture
def site(postgres_url: str, tmp_path: Path) -> Iterator[TwoArchivers]:
    with two_archivers(postgres_url, tmp_path) as made:
        yield made


# --- tampering with a package of parts (in memory; each refused for its own reason) ---------
def _part(files: dict[str, bytes], n: int) -> dict[str, bytes]:
    prefix = f"parts/{n:02d}/"
    return {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}


def _with_part(files: dict[str, bytes], n: int, part: dict[str, bytes]) -> dict[str, bytes]:
    prefix = f"parts/{n:02d}/"
    out = {k: v for k, v in files.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in part.items()})
    return out


def _resum(files: dict[str, bytes], index: dict[str, object] | None = None) -> dict[str, bytes]:
    """What a tamperer does after changing files: the index as wanted, SHA256SUMS again."""
    out = dict(files)
    if index is not None:
        out[INDEX] = json.dumps(index).encode()
    out.pop(SUMS, None)
    out[SUMS] = sha256sums(out)
    return out


def _refused(files: dict[str, bytes], expect: list[bytes], reason: str) -> None:
    report = verify_evidence(files, expect_archiver=expect)
    assert report.failures, "a tampered package verified"
    assert any(reason in f for f in report.failures), report.failures
    assert report.video is None


def tampered_packages_are_refused(files: dict[str, bytes], other: dict[str, bytes],
                                  expect: list[bytes], a1_pem: bytes) -> None:
    index = json.loads(files[INDEX])
    # A part cut out, the range shrunk to what is left: each Archiver signed its part's place
    # among two (the nonce), so the one left is not a package of one part.
    cut = dict(index, to_ms=index["parts"][0]["to_ms"], parts=index["parts"][:1])
    _refused(_resum({k: v for k, v in files.items() if not k.startswith("parts/02/")}, cut),
             expect, "was not requested as part 1 of 1 of this package")
    # The parts swapped (each under the other's directory, the index in the new order).
    swapped = _with_part(_with_part(files, 1, _part(files, 2)), 2, _part(files, 1))
    listed = [dict(index["parts"][1], dir="parts/01/"), dict(index["parts"][0], dir="parts/02/")]
    _refused(_resum(swapped, dict(index, parts=listed)), expect,
             "was not requested as part 1 of 2 of this package")
    # Part 2 taken from another export of the same range (genuine, signed by a2, but
    # requested for another package).
    _refused(_resum(_with_part(files, 2, _part(other, 2))), expect,
             "cut, swapped, or taken from another export")
    # Part 2 passed off as signed by the other Archiver: a1's certificate in it (its index and
    # sums made to agree): its manifests and END do not verify against it.
    part2 = _part(files, 2)
    part_index = json.loads(part2[INDEX])
    a1 = x509.load_pem_x509_certificate(a1_pem)
    part_index.update(archiver_sha256=fingerprint(a1).hex(),
                      archiver_subject=a1.subject.rfc4514_string())
    part2.update({"archiver.pem": a1_pem, INDEX: json.dumps(part_index).encode()})
    part2 = _resum(part2)
    listed = [index["parts"][0], dict(index["parts"][1], archiver_sha256=fingerprint(a1).hex())]
    _refused(_resum(_with_part(files, 2, part2), dict(index, parts=listed)), expect,
             "the Archiver's signature does not verify")
    # Part 2 replaced by a copy of part 1 (both a1's): no change of Archiver, wrong place.
    _refused(_resum(_with_part(files, 2, _part(files, 1)),
                    dict(index, parts=[index["parts"][0], dict(index["parts"][0],
                                                               dir="parts/02/")])),
             expect, "signed by the same Archiver certificate")


def the_browser_plays_the_range_as_one_timeline(site: TwoArchivers, viewer: Viewer,
                                               client: Client, start: int,
                                               clip: VerifiedRange) -> None:
    """`fusion-client view` through a1 (a2 pinned in the same client home), Debian's Chromium:
    the page plays the range across the move as one timeline, a2's part verified against a2,
    the switch drawn as a gap between the signed edges that fetch_range found."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium is not None, "Debian's chromium is not installed; run scripts/setup.sh"
    process = ViewerProcess(site.a1.url, viewer.uri, client.home, site.ca.path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium,
                                         args=["--autoplay-policy=no-user-gesture-required"])
            try:
                page = browser.new_page()
                page.goto(process.url)
                page.wait_for_function(
                    "() => window.fusionViewer && window.fusionViewer.camerasLoaded")
                page.evaluate("(c) => window.fusionViewer.watch(c, false)", clip.camera)
                page.evaluate("([c, ms]) => window.fusionViewer.tiles.get(c).playFrom(ms)",
                              [clip.camera, start])
                page.wait_for_function(
                    # The segment list follows the verified count as the page appends the
                    # media: wait for both (a snapshot between them listed 4 of 8).
                    "(c) => { const s = window.fusionViewer.tiles.get(c).snapshot(); "
                    "return (s.stateText.includes('to the end') "
                    "&& s.segments.length === s.verified) || s.stopped; }",
                    arg=clip.camera, timeout=90_000)
                state = page.evaluate("(c) => window.fusionViewer.tiles.get(c).snapshot()",
                                      clip.camera)
            finally:
                browser.close()
    finally:
        process.stop()
    assert not state["stopped"] and state["error"] is None, state["stateText"]
    first, second = clip.parts
    # Every segment of both parts, verified (a2's against a2), in order, none twice.
    assert state["verified"] == first.segments + second.segments
    captured = [s["capture_ms"] for s in state["segments"]]
    assert captured == sorted(captured) and len(captured) == state["verified"]
    [switch] = state["switches"]
    assert (switch["from_archiver"], switch["to_archiver"]) == ("a1", "a2")
    assert (switch["last_end_ms"], switch["first_start_ms"]) == (first.last_ms, second.first_ms)
    assert SWITCH.search(switch["text"])
    [gap] = [g for g in state["gaps"] if g["kind"] == "switch"]
    assert (gap["from_ms"], gap["to_ms"]) == (first.last_ms, second.first_ms)


@requires_ffmpeg
@pytest.mark.browser
def test_evidence_and_grants_of_a_range_across_a_move_each_part_from_its_own_signer(
        site: TwoArchivers, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    client.tls_ca = site.ca.path
    viewer, grantee = make_viewer("ada"), make_viewer("bea")
    camera = "hall-across"

    def authorize() -> None:
        site.a1.add_viewer(viewer.pem, [camera])
        site.a1.add_viewer(grantee.pem, [])
        site.a2.stop()  # a2 learns the viewers at start (site-notify's propagation aside)
        site.a2.start()

    # a1 records on 2.5 s after the directory's move time (until it noticed): its part reaches
    # into a2's, and nothing is in the package twice.
    moved = record_across_a_move(site, tmp_path, camera, authorize, noticed_after_ms=2_500)
    pin(client, viewer, site.a2, site.certs["a2"])
    a1_fp, a2_fp = (fingerprint(signing_cert(s)) for s in (site.a1, site.a2))

    # --- evidence: one package, each part from its Archiver, verified against its signer ---
    case = tmp_path / "case.zip"

    def export(out: Path) -> str:
        done = client("evidence", "export", "--archiver", site.a1.url, "--token", viewer.uri,
                      "--camera", camera, "--from", iso(moved.start), "--to", iso(moved.end),
                      "-o", str(out))
        assert done.code == 0, done.stderr
        return done.stderr

    exported = export(case)
    assert "2 parts" in exported, exported
    assert re.search(r"part 1 of 2: .* recorded by Archiver a1, verified against ", exported)
    assert re.search(r"part 2 of 2: .* recorded by Archiver a2, verified against ", exported)
    switch = SWITCH.search(exported)
    assert switch, exported
    # a1's part reaches past the move time (it recorded until it noticed); the two signed
    # edges are each part's own (segment times are anchored to arrival, so they may touch).
    last_end, first_start = (parse_time(t, 0) for t in switch.groups())
    assert moved.moved < last_end and abs(first_start - last_end) < 5_000, exported

    video = tmp_path / "verified.ts"
    checked = client("evidence", "verify", str(case), "--expect-archiver", a1_fp.hex(),
                     "--expect-archiver", a2_fp.hex(), "-o", str(video))
    report = checked.stdout.decode()
    assert checked.code == 0, checked.stderr + report
    assert "Result: VERIFIED" in report
    assert "Part 1 of 2: recorded by Archiver a1" in report
    assert "Part 2 of 2: recorded by Archiver a2" in report
    # The switch at the same signed edges as the export (and play) said.
    assert SWITCH.search(report) and SWITCH.search(report).groups() == switch.groups(), report
    # Frame-exact on both sides of the switch, judged by ffmpeg.
    assert frame_hashes(video) == moved.first + moved.second

    # To a1's last signed end itself: a1's video ends exactly at --to, so a2 is asked for that
    # instant. Without video there (a2's first segment starts later) the range is a1's alone:
    # a2's "no recording" there is no failure: play gives a1's frames, evidence one a1
    # package (before, the export was refused, "export it again", however often tried).
    to_a1_end = tmp_path / "to-a1-end.ts"
    done = play(client, site.a1.url, viewer, to_a1_end, moved.start, last_end, camera=camera)
    assert done.code == 0, done.stderr
    edge_case = tmp_path / "to-a1-end.zip"
    done_edge = client("evidence", "export", "--archiver", site.a1.url, "--token", viewer.uri,
                       "--camera", camera, "--from", iso(moved.start), "--to", iso(last_end),
                       "-o", str(edge_case))
    assert done_edge.code == 0, done_edge.stderr
    edge_video = tmp_path / "to-a1-end-verified.ts"
    checked = client("evidence", "verify", str(edge_case), "--expect-archiver", a1_fp.hex(),
                     "--expect-archiver", a2_fp.hex(), "-o", str(edge_video))
    assert checked.code == 0, checked.stderr + checked.stdout.decode()
    if first_start > last_end:
        assert "part 1 of 1: " in done.stderr, done.stderr
        assert frame_hashes(to_a1_end) == frame_hashes(edge_video) == moved.first
    else:  # a2's first segment holds that instant: it is played and exported after a1's
        assert "part 2 of 2: " in done.stderr and "2 parts" in done_edge.stderr, done.stderr
        assert frame_hashes(to_a1_end) == frame_hashes(edge_video)
        assert frame_hashes(edge_video)[:len(moved.first)] == moved.first

    # Each part against its own signer: a verifier that knows only a1 does not accept a2's part.
    only_a1 = client("evidence", "verify", str(case), "--expect-archiver", a1_fp.hex())
    assert only_a1.code == ExitCode.NOT_VERIFIED, only_a1.stdout.decode()
    assert "part 2 (a2): archiver.pem" in only_a1.stdout.decode()

    # Keys sealed to a recipient: each part's sealed on its own; without the recipient's token
    # PARTLY VERIFIED, with it VERIFIED, the token opened once (one PIN) for both parts.
    sealed = tmp_path / "sealed.zip"
    done = client("evidence", "export", "--archiver", site.a1.url, "--token", viewer.uri,
                  "--camera", camera, "--from", iso(moved.start), "--to", iso(moved.end),
                  "--for", str(grantee.pem), "-o", str(sealed))
    assert done.code == 0, done.stderr
    fps = ("--expect-archiver", a1_fp.hex(), "--expect-archiver", a2_fp.hex())
    partly = client("evidence", "verify", str(sealed), *fps)
    assert partly.code == ExitCode.PARTLY_VERIFIED, partly.stdout.decode()
    opened = client("evidence", "verify", str(sealed), *fps, "--token", grantee.uri)
    assert opened.code == 0, opened.stdout.decode() + opened.stderr
    assert opened.stdout.decode().count("keys.sealed opened with the recipient's token") == 2

    files = read_zip(case)
    assert json.loads(files[INDEX])["format"] == FORMAT_PARTS
    # Each part is a one-part package (fusion-evidence/1) on its own, verified as before.
    first = _part(files, 1)
    assert json.loads(first[INDEX])["format"] == FORMAT
    alone = verify_evidence(first, expect_archiver=[a1_fp])
    assert alone.ok and not alone.missing and alone.signer_established, alone.failures
    assert verify_evidence(files, expect_archiver=[a1_fp, a2_fp]).video == video.read_bytes()

    # The library's one call takes the same checked path as play: each part from its own
    # Archiver (a2 pinned for its URL), one output, each part's own signer.
    known = KnownArchivers(tmp_path / "known_archivers")
    known.remember(site.a2.url, a2_fp, "a2")
    fetched = tmp_path / "fetched.ts"
    clip = fetch_range(site.a1.url, viewer.uri, camera, moved.start, moved.end,
                       tls_ca=site.ca.path, known=known, output=fetched)
    assert [p.signer.fingerprint for p in clip.parts] == [a1_fp.hex(), a2_fp.hex()]
    assert frame_hashes(fetched) == moved.first + moved.second
    # a2 neither pinned nor under a site CA: refused before anything is sent there, no file.
    refused = tmp_path / "refused.ts"
    with pytest.raises(UntrustedArchiver, match="neither pinned nor issued by a site CA"):
        fetch_range(site.a1.url, viewer.uri, camera, moved.start, moved.end,
                    tls_ca=site.ca.path, known=KnownArchivers(tmp_path / "empty"),
                    output=refused)
    assert not refused.exists()

    # --- the browser viewer: the range as one timeline, each part verified by its signer -----
    the_browser_plays_the_range_as_one_timeline(site, viewer, client, moved.start, clip)

    other = tmp_path / "other.zip"
    export(other)
    tampered_packages_are_refused(files, read_zip(other), [a1_fp, a2_fp],
                                  signing_cert(site.a1).public_bytes(Encoding.PEM))

    # --- grants: one per part, each made on the Archiver that recorded it -------------------
    made = client("grant", "--archiver", site.a1.url, "--token", viewer.uri, "--camera",
                  camera, "--from", iso(moved.start), "--to", iso(moved.end), "--to-cert",
                  str(grantee.pem))
    assert made.code == 0, made.stderr
    ids = re.findall(rb"grant ([0-9a-f]{32}): pending", made.stdout)
    assert len(ids) == 2, made.stdout
    for grant_id in ids:
        approved = subprocess.run(
            [sys.executable, "-m", "archiver", "grants", "approve", grant_id.decode(), "--url",
             site.a1.url, "--data", str(site.a1.data_dir), "--tls-ca", str(site.ca.path)],
            capture_output=True, text=True, timeout=60)
        assert approved.returncode == 0, approved.stderr
    pin(client, grantee, site.a2, site.certs["a2"])
    granted = tmp_path / "granted.ts"
    played = client("grants", "play", *(g.decode() for g in reversed(ids)), "--archiver",
                    site.a1.url, "--token", grantee.uri, "-o", str(granted))
    assert played.code == 0, played.stderr
    assert frame_hashes(granted) == moved.first + moved.second
    assert re.search(r"part 1 of 2: grant .* recorded by Archiver a1", played.stderr)
    assert SWITCH.search(played.stderr), played.stderr
    # A grant to a1's last signed end itself: made (a2's "no recording" at that instant is no
    # failure), one grant, on a1, when a2 has no video there.
    edge_grant = client("grant", "--archiver", site.a1.url, "--token", viewer.uri, "--camera",
                        camera, "--from", iso(moved.start), "--to", iso(last_end),
                        "--to-cert", str(grantee.pem))
    assert edge_grant.code == 0, edge_grant.stderr
    assert len(re.findall(rb"grant ([0-9a-f]{32}): pending", edge_grant.stdout)) == (
        1 if first_start > last_end else 2), edge_grant.stdout
