"""Viewers use any Archiver of the site (issue 21, item 3), end to end: a real PostgreSQL
directory shared by two real Archiver processes (``--name a1``/``a2``, HTTPS under a site CA),
a real SoftHSM viewer token, ffmpeg as the camera and as the judge, the real fusion-client.

A camera recorded by a1, then moved to a2: played through a1, the range a2 holds is redirected
there (307) and verified against a2's signature; a range across the move plays in one command,
part by part, frame-exact, with the switch reported at the signed edges. A redirect to a URL
the site does not list, or to an Archiver whose signing certificate is neither pinned nor
under the site CA, is refused before anything is sent there.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from archiver.cameras import DRIFT_TOLERANCE_MS
from archiver.directory import ArchiverRow
from client.session import PlacementView
from client.site import Part, plan_parts
from fusion_testkit.client_cli import (
    Client,
    Viewer,
    iso,
    now_ms,
    play,
    wait_for_segments,
)
from fusion_testkit.site import (
    TwoArchivers,
    authorize_on_the_site,
    pin,
    record_across_a_move,
    signing_cert,
    two_archivers,
    wait_until_accepted,
)
from keyservice.errors import ArchiverMismatch
from keyservice.identity import fingerprint
from keyservice.timespec import parse_time
from tests.fixtures.camera import frame_hashes, make_source, push, requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, free_port

EXIT_ARCHIVER_MISMATCH = 31


# --- the parts of a range (pure) ------------------------------------------------------------
def test_a_range_is_cut_where_the_camera_moved_each_instant_in_one_part() -> None:
    placements = [PlacementView("a1", "https://a1", 0, 5_000),
                  PlacementView("a2", "https://a2", 5_000, 9_000),
                  PlacementView("a1", "https://a1", 9_000, None)]
    assert plan_parts(placements, "a1", 1_000, 20_000) == [
        Part("a1", 1_000, 4_999, True, "https://a1"), Part("a2", 5_000, 8_999, False, "https://a2"),
        Part("a1", 9_000, 20_000, True, "https://a1")]
    assert plan_parts(placements, "a2", 6_000, 7_000) == [
        Part("a2", 6_000, 7_000, True, "https://a2")]
    # An Archiver from before sites (no placements endpoint): the entry holds everything.
    assert plan_parts(None, None, 1, 2) == [Part("", 1, 2, True)]


def _certificate(name: str) -> x509.Certificate:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def test_a_followed_archiver_is_trusted_by_its_pin_else_the_site_ca_never_first_use(
        tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from client.pinning import KnownArchivers, PinOutcome
    from client.site import UntrustedArchiver, trust_followed

    a2, impostor = _certificate("a2"), _certificate("a2")
    known = KnownArchivers(tmp_path / "known_archivers")
    url = "https://a2.example:8443"
    # Neither pinned nor a site CA: refused, and nothing pinned on another Archiver's word.
    with pytest.raises(UntrustedArchiver, match="neither pinned nor issued by a site CA"):
        trust_followed(known)(url, a2)
    assert known.lookup(url) is None
    # Pinned: that certificate only; another is loud.
    known.remember(url, fingerprint(a2), "a2")
    assert trust_followed(known)(url, a2).outcome is PinOutcome.MATCHED
    with pytest.raises(UntrustedArchiver, match="someone may be impersonating it"):
        trust_followed(known)(url, impostor)
    # With --site-ca: a signing certificate the site CA issued is followed without a pin;
    # one it did not issue is refused; a pin for the URL still has to match.
    ca = SiteCa.create(tmp_path / "site-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "a3")])).sign(key, hashes.SHA256()))
    issued = ca.issue_archiver_signing(csr)
    other = "https://a3.example:8443"
    assert trust_followed(known, (ca.certificate,))(other, issued).outcome is PinOutcome.SITE_CA
    assert known.lookup(other) is None
    with pytest.raises(ArchiverMismatch):
        trust_followed(known, (ca.certificate,))(other, impostor)
    with pytest.raises(ArchiverMismatch):
        trust_followed(known, (ca.certificate,))(url, issued)  # a2's pin names a2's cert


# --- a site of two Archivers ------------------------------------------------------------------
Site = TwoArchivers


@pytest.fixture
def site(postgres_url: str, tmp_path: Path) -> Iterator[Site]:
    with two_archivers(postgres_url, tmp_path) as made:
        yield made


@requires_ffmpeg
def test_a_range_across_a_move_plays_through_either_archiver_verified_and_frame_exact(
        site: Site, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    client.tls_ca = site.ca.path
    viewer = make_viewer("rhea")
    camera = "lobby-move"
    moved = record_across_a_move(site, tmp_path, camera,
                                 lambda: authorize_on_the_site(site, viewer, camera))

    # The camera list names each camera's Archiver (the directory's, through either).
    listed = client("cameras", "--archiver", site.a1.url, "--token", viewer.uri,
                    "--archiver-cert", str(site.certs["a1"]))
    assert listed.code == 0, listed.stderr
    assert re.search(rf"^{moved.camera}\s+a2\s", listed.stdout.decode(), re.M), listed.stdout

    # a2 is neither pinned nor under a --site-ca: its redirect is not followed.
    refused_out = tmp_path / "refused.ts"
    refused = play(client, site.a1.url, viewer, refused_out, moved.moved + 1, moved.end,
                   camera=moved.camera)
    assert refused.code == EXIT_ARCHIVER_MISMATCH, refused.stderr
    assert f"sent this request to the Archiver at {site.a2.url}" in refused.stderr
    assert "neither pinned nor issued by a site CA" in refused.stderr
    assert not refused_out.exists()

    pin(client, viewer, site.a2, site.certs["a2"])
    # A camera held by a2, asked of a1: redirected, logged in there, verified against a2.
    held = tmp_path / "held.ts"
    redirected = play(client, site.a1.url, viewer, held, moved.moved + 1, moved.end,
                      camera=moved.camera)
    assert redirected.code == 0, redirected.stderr
    assert "complete (verified signed end record)" in redirected.stderr
    assert frame_hashes(held) == moved.second, redirected.stderr

    # The whole range, through a1 and through a2: two parts, each verified against its own
    # signer, the switch at the signed edges, frame-exact on both sides.
    for entry in (site.a1, site.a2):
        out = tmp_path / f"across-{entry.port}.ts"
        done = play(client, entry.url, viewer, out, moved.start, moved.end,
                    camera=moved.camera)
        assert done.code == 0, done.stderr
        assert frame_hashes(out) == moved.first + moved.second, done.stderr
        assert re.search(r"part 1 of 2: .* recorded by Archiver a1, verified against a1 ",
                         done.stderr), done.stderr
        assert re.search(r"part 2 of 2: .* recorded by Archiver a2, verified against a2 ",
                         done.stderr), done.stderr
        switch = re.search(r"switch from Archiver a1 to a2: a1's last segment ends (\S+) "
                           r"\(signed\); a2's first segment starts (\S+) \(signed\)",
                           done.stderr)
        assert switch, done.stderr
        # The signed edges: a1's video ends at the move, a2's starts after it, and they are
        # each part's own first and last capture times. A pushed segment follows the previous
        # one on the stream's clock while that ends within DRIFT_TOLERANCE_MS of its arrival
        # (archiver/cameras.py), so a1's end may pass the move by that much (43 ms seen).
        last_end, first_start = (parse_time(t, 0) for t in switch.groups())
        assert last_end <= moved.moved + DRIFT_TOLERANCE_MS and moved.moved <= first_start, done.stderr
        assert f"captured {switch[2]} .." in done.stderr
        assert re.search(rf"captured \S+ \.\. {re.escape(switch[1])}\n", done.stderr)
        assert "complete (every part's signed end record verified)" in done.stderr
        assert not list(tmp_path.glob("across-*.incomplete"))

    # Evidence of a2's range, asked of a1: the package holds a2's signed stream, verified
    # offline against a2's certificate (one across the move: tests/client/test_across.py).
    case = tmp_path / "case.zip"
    exported = client("evidence", "export", "--archiver", site.a1.url, "--token", viewer.uri,
                      "--camera", moved.camera, "--from", iso(moved.moved + 1), "--to",
                      iso(moved.end), "-o", str(case))
    assert exported.code == 0, exported.stderr
    a2_fp = fingerprint(signing_cert(site.a2)).hex()
    checked = client("evidence", "verify", str(case), "--expect-archiver", a2_fp)
    assert checked.code == 0, checked.stderr + checked.stdout.decode()


@requires_ffmpeg
def test_what_the_old_archiver_recorded_before_it_noticed_the_move_is_played(
        site: Site, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    # The old Archiver records until it re-reads the cameras it holds (every 2 s; a pulled
    # camera's new one waits for it to let go): its last seconds come after the directory's
    # move time. Here the move is dated 2.5 s before a1's last video.
    client.tls_ca = site.ca.path
    viewer = make_viewer("theo")
    moved = record_across_a_move(site, tmp_path, "dock-move",
                                 lambda: authorize_on_the_site(site, viewer, "dock-move"),
                                 noticed_after_ms=2_500)
    pin(client, viewer, site.a2, site.certs["a2"])
    out = tmp_path / "across.ts"
    done = play(client, site.a1.url, viewer, out, moved.start, moved.end, camera=moved.camera)
    assert done.code == 0, done.stderr
    # Before: a1's part ended at the move time, and its video after it was left out.
    assert frame_hashes(out) == moved.first + moved.second, done.stderr
    switch = re.search(r"switch from Archiver a1 to a2: a1's last segment ends (\S+) "
                       r"\(signed\); a2's first segment starts (\S+) \(signed\)", done.stderr)
    assert switch, done.stderr
    last_end, first_start = (parse_time(t, 0) for t in switch.groups())
    assert moved.moved < last_end <= first_start, done.stderr
    assert "  gap:" not in done.stderr, done.stderr  # the switch is said once, as the switch
    assert "complete (every part's signed end record verified)" in done.stderr


# --- a redirect the viewer does not follow ----------------------------------------------------
class RewritingRelay:
    """An HTTPS relay in front of a1 (a certificate of the site CA: TLS alone does not stop
    it) that sends every redirect somewhere the site does not list."""

    def __init__(self, upstream: ArchiverServer, ca: SiteCa, directory: Path,
                 elsewhere: str) -> None:
        import ssl
        relay = self
        self.redirected = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type")}
                answer = httpx.request(method, upstream.url + self.path, content=body,
                                       headers=headers, verify=upstream.verify, timeout=60)
                data, location = answer.content, None
                if answer.status_code == 307:
                    relay.redirected += 1
                    moved = answer.json()
                    moved["url"] = elsewhere
                    location = elsewhere + self.path
                    data = json.dumps(moved).encode()
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", ""))
                self.send_header("Content-Length", str(len(data)))
                if location is not None:
                    self.send_header("Location", location)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        cert, key = ca.issue_tls_server(directory)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RewritingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_redirect_to_a_url_the_site_does_not_list_is_refused(
        site: Site, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    client.tls_ca = site.ca.path
    viewer = make_viewer("remus")
    camera = "gate-elsewhere"
    token = site.a1.add_camera(camera)
    site.a1.add_viewer(viewer.pem, [camera])
    site.directory.move_camera(camera, "a2", now_ms())  # a2 holds all of it
    wait_until_accepted(site.a2, camera, token)
    start = now_ms()
    for i in range(2):
        assert site.a2.put_segment(camera, token, bytes([i]) * 3000, name=f"s{i}.ts") == 201
    end = now_ms() + 1
    rogue = f"https://127.0.0.1:{free_port()}"
    with RewritingRelay(site.a1, site.ca, tmp_path / "relay-tls", rogue) as relay:
        out = tmp_path / "rogue.ts"
        done = client("play", "--archiver", relay.url, "--token", viewer.uri, "--camera",
                      camera, "--from", iso(start), "--to", iso(end), "-o", str(out),
                      "--archiver-cert", str(site.certs["a1"]))
        assert relay.redirected >= 1
    assert done.code == EXIT_ARCHIVER_MISMATCH, done.stderr
    assert f"sent this request to 'a2' at {rogue}, which is not an Archiver of the site" \
        in done.stderr
    assert not out.exists()


# --- the Archiver's side, on the wire ---------------------------------------------------------
def test_the_redirect_keeps_the_request_names_the_holder_and_is_told_only_to_its_viewers(
        site: Site, make_viewer: Callable[[str], Viewer]) -> None:
    from keyservice.token import Token
    from tests.fixtures.viewer import login

    viewer = make_viewer("ione")
    yard, other = "yard-wire", "other-wire"
    site.a1.add_camera(yard)
    site.a1.add_camera(other)
    site.a1.add_viewer(viewer.pem, [yard])
    # yard: a1's since it was added, a2's from base + 5 s on; other: a2's from now.
    base = now_ms()
    assert site.directory.move_camera(yard, "a2", base + 5_000)
    assert site.directory.move_camera(other, "a2", base)
    created = site.directory.placements(yard)[0].since_ms
    assert created <= base
    identity = Token.open(viewer.token.uri).identity(viewer.name)
    session = login(site.a1.url, identity, verify=site.a1.verify)
    auth = {"Authorization": f"Bearer {session}"}
    nonce = "ab" * 16

    def get(path: str) -> httpx.Response:
        return httpx.get(site.a1.url + path, headers=auth, verify=site.a1.verify, timeout=60,
                         follow_redirects=False)

    # A range a2 holds: 307 to a2's URL, the same path and query (nonce and all), a body
    # naming a2.
    path = (f"/v1/cameras/{yard}/recording?from_ms={base + 6000}&to_ms={base + 9000}"
            f"&nonce={nonce}")
    moved = get(path)
    assert moved.status_code == 307, moved.text
    assert moved.headers["location"] == site.a2.url + path
    assert moved.json()["error"] == "held_elsewhere"
    assert (moved.json()["archiver"], moved.json()["url"]) == ("a2", site.a2.url)
    assert get(f"/v1/cameras/{yard}/gaps?from_ms={base + 6000}&to_ms={base + 9000}"
               ).status_code == 307
    # A range a1 recorded (part of) is answered here, with what a1 holds (nothing recorded:
    # 404, not a redirect); the history stays playable where it was recorded. (Live's
    # redirect: test_live_through_a1_of_a_camera_a2_records_is_followed_and_verified_against_a2.)
    for first, last in ((created, base + 2000), (created, base + 9000)):
        assert get(f"/v1/cameras/{yard}/recording?from_ms={first}&to_ms={last}"
                   f"&nonce={nonce}").json()["error"] == "no_recording"
    listed = get(f"/v1/cameras/{yard}/placements?from_ms={created}&to_ms={base + 9000}").json()
    assert listed["archiver"] == "a1" and [
        (p["archiver"], p["url"], p["since_ms"], p["until_ms"]) for p in listed["placements"]
    ] == [("a1", site.a1.url, created, base + 5_000), ("a2", site.a2.url, base + 5_000, None)]
    # A range only other Archivers recorded, several of them: 409 with the parts (a3 is
    # only a registry row here: nothing is sent to it).
    site.directory.register_archiver(ArchiverRow("a3", "https://127.0.0.1:9", b"", base, base))
    assert site.directory.move_camera(yard, "a3", base + 20_000)
    spans = get(f"/v1/cameras/{yard}/recording?from_ms={base + 6000}&to_ms={base + 30_000}"
                f"&nonce={nonce}")
    assert spans.status_code == 409 and spans.json()["error"] == "range_spans_archivers"
    assert [(p["archiver"], p["since_ms"]) for p in spans.json()["placements"]] == [
        ("a2", base + 5_000), ("a3", base + 20_000)]
    assert {(a["name"], a["url"]) for a in get("/v1/site/archivers").json()} == {
        ("a1", site.a1.url), ("a2", site.a2.url)}  # a3's row has no usable certificate
    # A camera this viewer may not watch: refused as before, nothing about where it is.
    for path in (f"/v1/cameras/{other}/recording?from_ms=1&to_ms=2&nonce={nonce}",
                 f"/v1/cameras/{other}/placements", f"/v1/cameras/{other}/live?nonce={nonce}"):
        refused = get(path)
        assert refused.status_code == 403, path
        assert "a2" not in refused.text and site.a2.url not in refused.text


# --- the browser viewer's backend -------------------------------------------------------------
@requires_ffmpeg
def test_the_browser_viewer_lists_the_sites_cameras_and_plays_one_held_elsewhere(
        site: Site, make_viewer: Callable[[str], Viewer], tmp_path: Path) -> None:
    from client.pinning import KnownArchivers
    from client.session import ArchiverSession
    from client.site import trust_followed
    from client.viewer import login, open_identity
    from client.web.backend import TileRequest, ViewerBackend

    viewer = make_viewer("tess")
    camera = "dock-web"
    token = site.a1.add_camera(camera)
    authorize_on_the_site(site, viewer, camera)
    site.directory.move_camera(camera, "a2", now_ms())  # a2 records all of it
    wait_until_accepted(site.a2, camera, token)
    start = now_ms()
    push(make_source(tmp_path / "dock.ts", seconds=3), site.a2.url, camera, token,
         realtime=True, hls_time=1)
    wait_for_segments(site.a2, camera, 3)
    end = now_ms() + 1
    known = KnownArchivers(tmp_path / "known_archivers")
    known.remember(site.a2.url, fingerprint(signing_cert(site.a2)), "a2")
    with ArchiverSession(site.a1.url, tls_ca=site.ca.path) as session, \
            open_identity(viewer.uri) as identity:
        logged_in = login(session, identity, known=known)
        backend = ViewerBackend(session, identity, logged_in,
                                lambda: login(session, identity, known=known),
                                tmp_path / "exports", follow=trust_followed(known))
        try:
            listed = {c["name"]: c for c in backend.cameras()}
            assert listed[camera]["archiver"] == "a2"
            events: list[dict[str, object] | bytes] = []
            backend.stream(TileRequest(camera, False, start, end, start), events.append,
                           threading.Event())
        finally:
            backend.close()
    kinds = [e.get("type") for e in events if isinstance(e, dict)]
    assert kinds[0] == "start" and kinds[-1] == "end", events[-1]
    assert sum(1 for e in events if isinstance(e, dict) and e.get("type") == "segment"
               and e.get("verified")) == 3
    # Not pinned and no site CA: the page's stream is refused, nothing shown.
    refused: list[dict[str, object] | bytes] = []
    untrusted = KnownArchivers(tmp_path / "known_archivers-empty")
    with ArchiverSession(site.a1.url, tls_ca=site.ca.path) as session, \
            open_identity(viewer.uri) as identity:
        logged_in = login(session, identity, known=untrusted)
        backend = ViewerBackend(session, identity, logged_in,
                                lambda: login(session, identity, known=untrusted),
                                tmp_path / "exports", follow=trust_followed(untrusted))
        backend.stream(TileRequest(camera, False, start, end, start), refused.append,
                       threading.Event())
        backend.close()
    assert [e.get("type") for e in refused if isinstance(e, dict)] == ["error"], refused
    assert "neither pinned nor issued by a site CA" in str(refused[0])


# --- access grants of a range another Archiver holds ------------------------------------------
def test_a_grant_of_a_range_held_elsewhere_is_made_and_played_through_any_archiver(
        site: Site, make_viewer: Callable[[str], Viewer], client: Client,
        tmp_path: Path) -> None:
    import sys

    client.tls_ca = site.ca.path
    grantor, grantee = make_viewer("vera"), make_viewer("wren")
    camera = "pier-grant"
    token = site.a1.add_camera(camera)
    site.a1.add_viewer(grantor.pem, [camera])
    site.a1.add_viewer(grantee.pem, [])
    site.a2.stop()  # a2 learns the viewers at start (site-notify's propagation aside)
    site.a2.start()
    site.directory.move_camera(camera, "a2", now_ms())
    wait_until_accepted(site.a2, camera, token)
    start = now_ms()
    chunks = [bytes([i]) * 4000 for i in range(3)]
    for i, chunk in enumerate(chunks):
        assert site.a2.put_segment(camera, token, chunk, name=f"g{i}.ts") == 201
    end = now_ms() + 1
    pin(client, grantor, site.a2, site.certs["a2"])
    made = client("grant", "--archiver", site.a1.url, "--token", grantor.uri, "--camera",
                  camera, "--from", iso(start), "--to", iso(end), "--to-cert", str(grantee.pem),
                  "--archiver-cert", str(site.certs["a1"]))
    assert made.code == 0, made.stderr
    found = re.search(rb"grant ([0-9a-f]{32}): pending", made.stdout)
    assert found, made.stdout
    grant_id = found[1].decode()
    approved = subprocess.run(
        [sys.executable, "-m", "archiver", "grants", "approve", grant_id, "--url", site.a1.url,
         "--data", str(site.a1.data_dir), "--tls-ca", str(site.ca.path)],
        capture_output=True, text=True, timeout=60)
    assert approved.returncode == 0, approved.stderr
    out = tmp_path / "granted.ts"
    played = client("grants", "play", grant_id, "--archiver", site.a1.url, "--token",
                    grantee.uri, "-o", str(out))
    assert played.code == 0, played.stderr
    assert out.read_bytes() == b"".join(chunks)


# --- live from the camera's current Archiver --------------------------------------------------
def test_live_through_a1_of_a_camera_a2_records_is_followed_and_verified_against_a2(
        site: Site, make_viewer: Callable[[str], Viewer], client: Client) -> None:
    import signal

    from fusion_testkit.client_cli import read_exactly, wait_for_audit

    client.tls_ca = site.ca.path
    viewer = make_viewer("xena")
    camera = "quay-live"
    token = site.a1.add_camera(camera)
    authorize_on_the_site(site, viewer, camera)
    site.directory.move_camera(camera, "a2", now_ms())
    wait_until_accepted(site.a2, camera, token)
    pin(client, viewer, site.a2, site.certs["a2"])
    process = subprocess.Popen(
        client.command("live", "--archiver", site.a1.url, "--token", viewer.uri, "--camera",
                       camera, "--duration", "60", "--archiver-cert", str(site.certs["a1"]),
                       "-o", "-"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
        stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        wait_for_audit(site.a2, "stream.live", timeout=90)  # the stream is a2's
        for i in range(3):
            segment = bytes([0x40 + i]) * (3000 + i)
            assert site.a2.put_segment(camera, token, segment, name=f"l{i}.ts") == 201
            assert read_exactly(process.stdout.fileno(), len(segment), 60) == segment
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = err.decode(errors="replace")
    assert process.returncode == 0, stderr
    assert "3 segment(s)" in stderr and "token operations: 3 (2 login" in stderr, stderr
