"""Viewers accept any Archiver certificate issued by the site CA (issue 21, item 2):
`fusion-client --site-ca FILE` (or FUSION_SITE_CA) plays verified video from every Archiver of
the site with no pin, refuses an Archiver whose signing certificate the site CA did not issue
(self-signed, or another CA's), naming it and the CA expected, and still refuses loudly when a
pin applies and does not match. Every verified stream names the Archiver that signed it.

The attack: without --site-ca a viewer trusts an unknown Archiver on first use, so a rogue
Archiver on the site's network (self-signed key, video of its own) is played and pinned
(shown below: exit 0); with --site-ca the same play is refused before the token is used.

Real parts: two Archivers in production mode (HTTPS under the site CA), each with its own
SoftHSM token, its signing key certified through `identity csr` / `identity import`; ffmpeg as
the camera (HLS PUT) and as the judge of the decrypted video (frame hashes); fusion-client with
a SoftHSM viewer token."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client.pinning import KnownArchivers, PinOutcome, check_archiver
from client.viewer import Signer, load_site_ca
from fusion_testkit import forkserver
from fusion_testkit.camera import frame_hashes, is_contiguous_run, make_source, push
from fusion_testkit.client_cli import (
    Client,
    Viewer,
    assert_nothing_written,
    iso,
    now_ms,
    wait_for_audit,
    wait_for_segments,
)
from keyservice.certs import build_archiver_certificate, check_site_issued
from keyservice.dercert import DerCertificate
from keyservice.errors import ArchiverMismatch, CertificateError, UsageError
from keyservice.identity import fingerprint
from tests.fixtures.camera import requires_ffmpeg
from tests.fixtures.server import ArchiverServer, SiteCa, production_archiver

EXIT_ARCHIVER_MISMATCH = 31
URL = "https://127.0.0.1:8443"


# --- the decision (pure: certificates and the known_archivers file) ------------------------
def signing_csr(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return key, csr


@pytest.fixture
def store(tmp_path: Path) -> KnownArchivers:
    return KnownArchivers(tmp_path / "home" / "known_archivers")


def test_a_site_issued_archiver_is_accepted_for_any_url_and_nothing_is_pinned(
        site_ca: SiteCa, store: KnownArchivers) -> None:
    _, csr = signing_csr("a1")
    cert = site_ca.issue_archiver_signing(csr)
    for url in (URL, "https://10.0.0.2:8443", "https://a1.site.example"):
        decision = check_archiver(url, cert, store=store, site_ca=[site_ca.certificate])
        assert decision.outcome is PinOutcome.SITE_CA and decision.subject == "CN=a1"
    assert not store.path.exists()  # a renewed certificate raises no false alarm later
    assert check_site_issued(cert, [site_ca.certificate],
                             now=dt.datetime.now(dt.UTC)) == site_ca.certificate
    # Offline (a saved stream): the site CA alone says whose signature it must carry.
    assert check_archiver(None, cert, store=store, site_ca=[site_ca.certificate],
                          allow_first_use=False).outcome is PinOutcome.SITE_CA


def test_certificates_the_site_ca_did_not_issue_for_signing_are_refused(
        site_ca: SiteCa, store: KnownArchivers, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    key, csr = signing_csr("a1")
    other = SiteCa.create(tmp_path / "other", name="Other Site CA")
    cases = {
        "self-signed": (build_archiver_certificate(key, "Fusion Archiver rogue 1", now=now),
                        "was not issued by the site CA 'CN=Site CA,O=Example Site'"),
        "another CA": (other.issue_archiver_signing(csr), "issued by 'CN=Other Site CA,O=Example"
                       " Site', was not issued by the site CA 'CN=Site CA,O=Example Site'"),
        "expired": (site_ca.issue_archiver_signing(csr, days=30,
                                                   not_before=now - dt.timedelta(days=60)),
                    "expired on"),
        "not for signing": (site_ca.issue(key.public_key(), "a1"),
                            "is not a signing certificate"),
    }
    for case, (cert, expected) in cases.items():
        # As parsed X.509, and as play's login and reader present it: DER bytes and a key
        # (keyservice.dercert), parsed in full for this check (issue 23, start-up).
        for presented in (cert, DerCertificate(cert.public_bytes(serialization.Encoding.DER))):
            with pytest.raises(ArchiverMismatch) as info:
                check_archiver(URL, presented, store=store, site_ca=[site_ca.certificate])
            message = str(info.value)
            assert expected in message, (case, message)
            assert cert.subject.rfc4514_string() in message, (case, message)
            assert "Nothing was decrypted" in message and info.value.exit_code == 31
    assert not store.path.exists()
    # A CA certificate the site CA issued (an intermediate) is no Archiver either.
    with pytest.raises(CertificateError, match="is a CA certificate"):
        ca_like = (x509.CertificateBuilder().subject_name(csr.subject)
                   .issuer_name(site_ca.certificate.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(site_ca.key, hashes.SHA256()))
        check_site_issued(ca_like, [site_ca.certificate], now=now)


def test_a_pin_still_applies_beside_the_site_ca(site_ca: SiteCa, store: KnownArchivers) -> None:
    a1 = site_ca.issue_archiver_signing(signing_csr("a1")[1])
    a2 = site_ca.issue_archiver_signing(signing_csr("a2")[1])
    cas = [site_ca.certificate]
    # A pin recorded for the URL that names another certificate: loud, even though both are
    # the site's (a pin is the user's statement about this URL).
    store.remember(URL, fingerprint(a1))
    with pytest.raises(ArchiverMismatch) as info:
        check_archiver(URL, a2, store=store, site_ca=cas)
    assert "CHANGED" in str(info.value) and "issued by the site CA" in str(info.value)
    assert store.lookup(URL) == fingerprint(a1)
    assert check_archiver(URL, a1, store=store, site_ca=cas).outcome is PinOutcome.MATCHED
    # --archiver-cert must match as well.
    with pytest.raises(ArchiverMismatch, match="NOT the one given with --archiver-cert"):
        check_archiver("https://127.0.0.1:9443", a2, store=store, explicit=a1, site_ca=cas)
    # And a pinned certificate the site CA did not issue is refused with --site-ca.
    rogue = build_archiver_certificate(ec.generate_private_key(ec.SECP256R1()), "rogue",
                                       now=dt.datetime.now(dt.UTC))
    store.remember("https://127.0.0.1:7443", fingerprint(rogue))
    with pytest.raises(ArchiverMismatch, match="was not issued by the site CA"):
        check_archiver("https://127.0.0.1:7443", rogue, store=store, site_ca=cas)
    with pytest.raises(UsageError, match="--site-ca"):
        check_archiver(None, rogue, store=store, allow_first_use=False)


def test_a_site_ca_file_must_hold_ca_certificates(site_ca: SiteCa, tmp_path: Path) -> None:
    assert load_site_ca(site_ca.path) == (site_ca.certificate,)
    archiver_pem = tmp_path / "a1.pem"
    archiver_pem.write_bytes(site_ca.issue_archiver_signing(signing_csr("a1")[1])
                             .public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateError, match="which is not a CA certificate"):
        load_site_ca(archiver_pem)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match="is not a readable certificate"):
        load_site_ca(tmp_path / "junk.pem")
    with pytest.raises(UsageError, match="Cannot read --site-ca"):
        load_site_ca(tmp_path / "missing.pem")


def test_the_signer_is_named_by_its_subject_and_fingerprint(site_ca: SiteCa) -> None:
    cert = site_ca.issue_archiver_signing(signing_csr("a1")[1])
    signer = Signer(cert)
    assert signer.name == "a1" and signer.issuer == "CN=Site CA,O=Example Site"
    assert str(signer) == f"CN=a1 (sha256 {fingerprint(cert).hex()})"


# --- end to end ------------------------------------------------------------------------------
def site_archiver(site_ca: SiteCa, tmp_path: Path, name: str,
                  signing_ca: SiteCa | None = None) -> ArchiverServer:
    """An Archiver whose signing key the site CA (or ``signing_ca``) certified: CSR made on its
    token, signed by the CA, imported; started without --signing-cert, HTTPS under the site
    CA."""
    signer_ca = signing_ca if signing_ca is not None else site_ca
    data = tmp_path / name
    request = tmp_path / f"{name}.csr"
    made = forkserver.run([sys.executable, "-m", "archiver", "identity", "csr", "--data",
                           str(data), "--name", name, "-o", str(request)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert made.returncode == 0, made.stderr
    issued = signer_ca.issue_archiver_signing(x509.load_pem_x509_csr(request.read_bytes()))
    cert_path = tmp_path / f"{name}.pem"
    cert_path.write_bytes(issued.public_bytes(serialization.Encoding.PEM))
    imported = forkserver.run([sys.executable, "-m", "archiver", "identity", "import",
                               str(cert_path), "--data", str(data), "--site-ca",
                               str(signer_ca.path)],
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    assert imported.returncode == 0, imported.stderr
    return production_archiver(site_ca, data, extra_args=("--name", name))


def record(server: ArchiverServer, viewer: Viewer, source: Path) -> tuple[int, int]:
    ingest = server.add_camera("cam1")
    server.add_viewer(viewer.pem, ["cam1"])
    start = now_ms()
    push(source, server.url, "cam1", ingest, realtime=True, hls_time=1)
    wait_for_segments(server, "cam1", 4, timeout=60)
    return start, now_ms() + 1


def play(client: Client, server: ArchiverServer, viewer: Viewer, out: Path,
         span: tuple[int, int], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client.command("play", "--archiver", server.url, "--token", viewer.uri, "--camera",
                       "cam1", "--from", iso(span[0]), "--to", iso(span[1]), "-o", str(out),
                       *extra),
        capture_output=True, text=True, env=client.env(), timeout=180, stdin=subprocess.DEVNULL)


def presented(server: ArchiverServer) -> x509.Certificate:
    import httpx

    answer = httpx.get(f"{server.url}/v1/archiver", verify=server.verify, timeout=30).json()
    return x509.load_pem_x509_certificate(answer["certificate"].encode())


@requires_ffmpeg
def test_only_the_site_ca_plays_verified_video_from_two_archivers_without_a_pin(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], tmp_path: Path) -> None:
    alice = make_viewer("alice")
    source = make_source(tmp_path / "source.ts", seconds=4)
    source_frames = frame_hashes(source)
    client = Client(tmp_path / "client-home", tls_ca=site_ca.path)
    with ExitStack() as stack:
        servers = [stack.enter_context(site_archiver(site_ca, tmp_path, name))
                   for name in ("a1", "a2")]
        spans = [record(server, alice, source) for server in servers]
        certs = [presented(server) for server in servers]
        for name, server, span, cert in zip(("a1", "a2"), servers, spans, certs, strict=True):
            out = tmp_path / f"{name}.ts"
            result = play(client, server, alice, out, span, "--site-ca", str(site_ca.path))
            assert result.returncode == 0, result.stderr
            assert frame_hashes(out) == source_frames
            assert "issued by your site CA (--site-ca): accepted without a pin" in result.stderr
            assert (f"signed by CN={name} (sha256 {fingerprint(cert).hex()}), issued by "
                    "CN=Site CA,O=Example Site") in result.stderr
            assert "on first use" not in result.stderr
        assert not (client.home / "known_archivers").exists()  # no pin was needed or made

        # An evidence package exported with only --site-ca verifies offline against the site
        # CA: the signer is established by the certificate the site CA issued.
        case = tmp_path / "a1-case.zip"
        exported = subprocess.run(
            client.command("evidence", "export", "--archiver", servers[0].url, "--token",
                           alice.uri, "--camera", "cam1", "--from", iso(spans[0][0]), "--to",
                           iso(spans[0][1]), "-o", str(case), "--site-ca", str(site_ca.path)),
            capture_output=True, text=True, env=client.env(), timeout=180,
            stdin=subprocess.DEVNULL)
        assert exported.returncode == 0, exported.stderr
        verified = subprocess.run(
            client.command("evidence", "verify", str(case), "--site-ca", str(site_ca.path)),
            capture_output=True, text=True, env=client.env(), timeout=180,
            stdin=subprocess.DEVNULL)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "signer established: its certificate was issued by the site CA" in verified.stdout

        # FUSION_SITE_CA does the same, for `cameras` too.
        env = {**client.env(), "FUSION_SITE_CA": str(site_ca.path)}
        listed = subprocess.run(client.command("cameras", "--archiver", servers[1].url,
                                               "--token", alice.uri),
                                capture_output=True, text=True, env=env, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert listed.returncode == 0, listed.stderr
        assert "cam1" in listed.stdout and "accepted without a pin" in listed.stderr

        # A pin that applies and does not match stays loud: a2's URL pinned to a1's certificate.
        KnownArchivers(client.home / "known_archivers").remember(servers[1].url,
                                                                 fingerprint(certs[0]))
        out = tmp_path / "mismatch.ts"
        refused = play(client, servers[1], alice, out, spans[1], "--site-ca", str(site_ca.path))
        assert refused.returncode == EXIT_ARCHIVER_MISMATCH, refused.stderr
        assert "THE ARCHIVER'S CERTIFICATE HAS CHANGED" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert_nothing_written(out)


@requires_ffmpeg
def test_a_rogue_archiver_is_refused_with_site_ca_but_trusted_on_first_use_without(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], tmp_path: Path) -> None:
    alice = make_viewer("alice")
    source = make_source(tmp_path / "source.ts", seconds=4)
    # Two rogues on the site's network, reachable over HTTPS the site CA vouches for: one with
    # its own self-signed signing key, one whose key another CA certified.
    other = SiteCa.create(tmp_path / "other-ca", name="Other Site CA")
    with ExitStack() as stack:
        self_signed = stack.enter_context(production_archiver(site_ca, tmp_path / "rogue"))
        foreign = stack.enter_context(site_archiver(site_ca, tmp_path, "r2",
                                                              signing_ca=other))
        for rogue in (self_signed, foreign):
            span = record(rogue, alice, source)
            cert = presented(rogue)
            # Before: without --site-ca the rogue is trusted on first use and its video played.
            naive = Client(tmp_path / f"naive-{cert.serial_number}", tls_ca=site_ca.path)
            played = play(naive, rogue, alice, tmp_path / f"naive-{cert.serial_number}.ts",
                          span)
            assert played.returncode == 0 and "on first use" in played.stderr, played.stderr
            # After: with --site-ca it is refused at login, naming it and the CA expected.
            careful = Client(tmp_path / f"careful-{cert.serial_number}", tls_ca=site_ca.path)
            out = tmp_path / f"careful-{cert.serial_number}.ts"
            refused = play(careful, rogue, alice, out, span, "--site-ca", str(site_ca.path))
            assert refused.returncode == EXIT_ARCHIVER_MISMATCH, refused.stderr
            assert cert.subject.rfc4514_string() in refused.stderr
            assert ("was not issued by the site CA 'CN=Site CA,O=Example Site'"
                    in refused.stderr)
            assert "Traceback" not in refused.stderr
            assert_nothing_written(out)
            assert not (careful.home / "known_archivers").exists()


@requires_ffmpeg
def test_live_video_from_a_site_archiver_with_only_the_site_ca(
        site_ca: SiteCa, make_viewer: Callable[[str], Viewer], tmp_path: Path) -> None:
    alice = make_viewer("alice")
    source = make_source(tmp_path / "source.ts", seconds=8)
    client = Client(tmp_path / "client-home", tls_ca=site_ca.path)
    with site_archiver(site_ca, tmp_path, "a3") as server:
        ingest = server.add_camera("cam1")
        server.add_viewer(alice.pem, ["cam1"])
        out = tmp_path / "live.ts"
        viewer = subprocess.Popen(
            client.command("live", "--archiver", server.url, "--token", alice.uri, "--camera",
                           "cam1", "--duration", "3.5", "-o", str(out), "--site-ca",
                           str(site_ca.path)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client.env(),
            stdin=subprocess.DEVNULL)
        try:
            wait_for_audit(server, "stream.live", timeout=60)  # the viewer is connected
            push(source, server.url, "cam1", ingest, realtime=True, hls_time=1)
            _, err = viewer.communicate(timeout=120)
        finally:
            if viewer.poll() is None:
                viewer.kill()
                viewer.wait()
        stderr = err.decode(errors="replace")
        cert = presented(server)
    assert viewer.returncode == 0, stderr
    assert "live stream ended (verified end record)" in stderr
    assert f"signed by CN=a3 (sha256 {fingerprint(cert).hex()})" in stderr
    assert "accepted without a pin" in stderr
    frames = frame_hashes(out)
    assert frames and is_contiguous_run(frames, frame_hashes(source))
    assert not (client.home / "known_archivers").exists()
