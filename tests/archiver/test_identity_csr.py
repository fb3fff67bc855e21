"""Archiver identities from the site CA (issue 21, item 2): `fusion-archiver identity csr`
makes a PKCS#10 request signed on the Archiver's own token by its signing key, which never
leaves the token; `identity import` keeps the certificate the site CA issued for it, after
refusing, each with one sentence, a certificate for another key, an expired one, one that may
not sign and one from another CA; `serve` then presents it without --signing-cert.

Real parts: the data directory's own SoftHSM token (made on first use, as in production
without an HSM), its key's attributes read back over PKCS#11 in a process of its own,
fusion_testkit.pki.SiteCa and `openssl x509 -req` as the site CA, and a real Archiver in
production mode (HTTPS under the site CA)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fusion_testkit import forkserver
from keyservice.identity import fingerprint
from tests.fixtures.server import SiteCa, production_archiver

EXIT_CERTIFICATE = 30


def archiver(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`fusion-archiver ARGS` in a process of its own (its own SoftHSM configuration)."""
    return forkserver.run([sys.executable, "-m", "archiver", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def make_csr(data: Path, name: str, out: Path) -> x509.CertificateSigningRequest:
    made = archiver("identity", "csr", "--data", str(data), "--name", name, "-o", str(out))
    assert made.returncode == 0, made.stderr
    return x509.load_pem_x509_csr(out.read_bytes())


def signing_certificate(data: Path) -> x509.Certificate:
    shown = archiver("certificate", "--data", str(data), "--json")
    assert shown.returncode == 0, shown.stderr
    return x509.load_pem_x509_certificate(json.loads(shown.stdout)["certificate"].encode())


def write_pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# Reads the signing key's attributes on the data directory's token, with python-pkcs11 and
# nothing of ours: SoftHSM reads its configuration once per process, so in a process of its own.
KEY_ATTRIBUTES = r"""
import json, os, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import PKCS11Error
token_dir, module = sys.argv[1], sys.argv[2]
os.environ["SOFTHSM2_CONF"] = os.path.join(token_dir, "softhsm2.conf")
pin = open(os.path.join(token_dir, "pin")).read().strip()
token = pkcs11.lib(module).get_token(token_label="archiver")
with token.open(user_pin=pin) as session:
    keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    out = {"keys": len(keys)}
    key = keys[0]
    for name in ("SENSITIVE", "EXTRACTABLE", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "SIGN"):
        out[name] = bool(key[getattr(Attribute, name)])
    try:
        key[Attribute.VALUE]
        out["value_read"] = True
    except PKCS11Error as exc:
        out["value_read"] = type(exc).__name__
print(json.dumps(out))
"""


def test_the_csr_is_signed_on_the_token_and_the_key_never_leaves_it(tmp_path: Path) -> None:
    from keyservice.pkcs11uri import DEFAULT_MODULE

    data = tmp_path / "a1"
    csr = make_csr(data, "a1", tmp_path / "a1.csr")  # a fresh data directory: key made now
    # A valid PKCS#10 self-signature: the token's key signed it (the key the request names).
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a1"
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # It certifies the Archiver's signing key: the one its certificate (and streams) carry.
    own = signing_certificate(data)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*spki) == own.public_key().public_bytes(*spki)
    # A second request is made by the same key (no new key per request).
    again = make_csr(data, "a1", tmp_path / "again.csr")
    assert again.public_key().public_bytes(*spki) == csr.public_key().public_bytes(*spki)
    # The key is on the token, sensitive, never extractable: its value cannot be read.
    read = subprocess.run([sys.executable, "-c", KEY_ATTRIBUTES, str(data / "token"),
                           DEFAULT_MODULE], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    attributes = json.loads(read.stdout)
    assert attributes == {"keys": 1, "SENSITIVE": True, "EXTRACTABLE": False,
                          "NEVER_EXTRACTABLE": True, "ALWAYS_SENSITIVE": True, "SIGN": True,
                          "value_read": "AttributeSensitive"}, attributes
    # No private key material anywhere in what the command wrote.
    assert b"PRIVATE KEY" not in (tmp_path / "a1.csr").read_bytes()


def test_a_bad_name_or_output_is_one_sentence(tmp_path: Path) -> None:
    bad = archiver("identity", "csr", "--data", str(tmp_path / "d"), "--name", "a b/c",
                   "-o", str(tmp_path / "x.csr"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "is not usable" in bad.stderr and not (tmp_path / "x.csr").exists()
    nothing = archiver("identity", "import", str(tmp_path / "missing.pem"), "--data",
                       str(tmp_path / "empty"))
    assert nothing.returncode != 0 and "Traceback" not in nothing.stderr
    assert "No signing token in" in nothing.stderr


def test_import_refuses_what_is_not_this_archivers_signing_certificate(
        site_ca: SiteCa, tmp_path: Path) -> None:
    data = tmp_path / "a1"
    csr = make_csr(data, "a1", tmp_path / "a1.csr")
    now = dt.datetime.now(dt.UTC)
    stranger = ec.generate_private_key(ec.SECP256R1())
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    other_site = SiteCa.create(tmp_path / "other-site", name="Other Site CA")
    cases = {
        # The site CA's certificate for some other key (another Archiver's, an attacker's).
        "another key": (site_ca.issue_archiver_signing(
            x509.CertificateSigningRequestBuilder().subject_name(csr.subject)
            .sign(stranger, hashes.SHA256())),
            "is for another key, not this Archiver's signing key"),
        "expired": (site_ca.issue_archiver_signing(csr, days=30,
                                                    not_before=now - dt.timedelta(days=400)),
                    "expired on"),
        # keyAgreement only (what the site CA issues a viewer's EC key): may not sign.
        "not a signing certificate": (site_ca.issue(public, "a1"),
                                      "is not a signing certificate"),
        "another site's CA": (other_site.issue_archiver_signing(csr),
                              "was not issued by the site CA 'CN=Site CA,O=Example Site'"),
    }
    for case, (cert, expected) in cases.items():
        path = write_pem(cert, tmp_path / f"{case.replace(' ', '-')}.pem")
        refused = archiver("identity", "import", str(path), "--data", str(data),
                           "--site-ca", str(site_ca.path))
        assert refused.returncode == EXIT_CERTIFICATE, (case, refused.stderr)
        assert expected in refused.stderr, (case, refused.stderr)
        assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1, case
        assert not (data / "signing-cert.pem").exists(), case
    # The self-signed certificate is still the one in use.
    still = signing_certificate(data)
    assert still.issuer == still.subject
    good = write_pem(site_ca.issue_archiver_signing(csr), tmp_path / "a1.pem")
    imported = archiver("identity", "import", str(good), "--data", str(data), "--site-ca",
                        str(site_ca.path), "--json")
    assert imported.returncode == 0, imported.stderr
    answer = json.loads(imported.stdout)
    assert answer["subject"] == "CN=a1" and answer["issuer"] == "CN=Site CA,O=Example Site"
    now_used = signing_certificate(data)
    assert fingerprint(now_used).hex() == answer["fingerprint"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_serve_presents_the_imported_certificate_signed_by_openssl(
        site_ca: SiteCa, tmp_path: Path) -> None:
    """A site CA run with openssl signs the CSR; after import, serve presents that certificate
    in /v1/archiver (what viewers check) with no --signing-cert."""
    data = tmp_path / "a1"
    make_csr(data, "a1", tmp_path / "a1.csr")
    ca_key = tmp_path / "site-ca.key"
    ca_key.write_bytes(site_ca.key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    ext = tmp_path / "archiver.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\n")
    signed = subprocess.run(["openssl", "x509", "-req", "-in", str(tmp_path / "a1.csr"),
                             "-CA", str(site_ca.path), "-CAkey", str(ca_key),
                             "-CAcreateserial", "-days", "30", "-sha256", "-extfile", str(ext),
                             "-out", str(tmp_path / "a1.pem")],
                            capture_output=True, text=True, timeout=60)
    assert signed.returncode == 0, signed.stderr
    imported = archiver("identity", "import", str(tmp_path / "a1.pem"), "--data", str(data),
                        "--site-ca", str(site_ca.path))
    assert imported.returncode == 0, imported.stderr
    issued = x509.load_pem_x509_certificate((tmp_path / "a1.pem").read_bytes())
    with production_archiver(site_ca, data) as server:
        answer = httpx.get(f"{server.url}/v1/archiver", verify=server.verify, timeout=30).json()
    presented = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert presented == issued


def test_serve_refuses_an_imported_certificate_that_expired_with_one_sentence(
        site_ca: SiteCa, tmp_path: Path) -> None:
    """An imported certificate is checked at every start, as --signing-cert is: one that has
    expired since is refused before the Archiver serves, saying how to renew it."""
    from fusion_testkit.server import free_port

    data = tmp_path / "a1"
    csr = make_csr(data, "a1", tmp_path / "a1.csr")
    now = dt.datetime.now(dt.UTC)
    # What `identity import` wrote a year ago, now expired (written by hand: import refuses it).
    write_pem(site_ca.issue_archiver_signing(csr, days=30,
                                             not_before=now - dt.timedelta(days=400)),
              data / "signing-cert.pem")
    refused = archiver("serve", "--data", str(data), "--port", str(free_port()))
    assert refused.returncode == EXIT_CERTIFICATE, refused.stderr
    assert "The imported signing certificate" in refused.stderr
    assert "is not valid now" in refused.stderr and "identity import" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The key is still usable for a renewal: a new CSR is made by the same key.
    renewed = make_csr(data, "a1", tmp_path / "renewed.csr")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert renewed.public_key().public_bytes(*spki) == csr.public_key().public_bytes(*spki)
