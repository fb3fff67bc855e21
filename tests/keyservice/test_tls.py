"""keyservice.tls: the one trust rule of every HTTPS client (--tls-ca, else FUSION_TLS_CA, else
the system's CAs), on real certificate files; the CLIs' side is tests/test_cli_exits.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fusion_testkit.pki import SiteCa
from keyservice.errors import TlsCaError
from keyservice.tls import TLS_CA_ENV, tls_ca_path, trust


def test_the_option_wins_over_the_variable(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TLS_CA_ENV, str(tmp_path / "env.pem"))
    assert tls_ca_path(tmp_path / "given.pem") == tmp_path / "given.pem"
    assert tls_ca_path(None) == tmp_path / "env.pem"
    monkeypatch.setenv(TLS_CA_ENV, "")
    assert tls_ca_path(None) is None


def test_the_site_ca_is_the_only_anchor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TLS_CA_ENV, raising=False)
    site = SiteCa.create(tmp_path / "site")
    context = trust(site.path)
    assert context.cert_store_stats()["x509_ca"] == 1
    [anchor] = context.get_ca_certs()
    assert dict(x[0] for x in anchor["subject"])["commonName"] == "Site CA"
    assert trust(None).cert_store_stats() != context.cert_store_stats()  # the system's


def test_a_self_signed_server_certificate_anchors_itself(tmp_path: Path) -> None:
    """Without the CA flag, a self-signed certificate is still its own trust anchor (an
    Archiver's self-signed certificate given as --tls-ca); one a CA issued is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "archiver.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "self.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert trust(path).cert_store_stats()["x509"] == 1
    leaf, _ = SiteCa.create(tmp_path / "site").issue_tls_server(tmp_path / "server")
    with pytest.raises(TlsCaError, match="no CA certificate"):
        trust(leaf)
