"""A site's certificate authority for tests and benchmarks: it issues viewers' key-management
certificates (as a site does for smartcard slot 9D) and Archivers' TLS server certificates
(production mode: HTTPS under the site CA, docs/deployment.md)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class SiteCa:
    """A site's certificate authority (software key: it is the site's, not the viewer's).
    ``path`` is the CA certificate that clients, cameras and admins are given."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Site CA") -> SiteCa:
        directory.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(65537, 2048)
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                             False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        path = directory / "site-ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def _builder(self, subject: x509.Name, public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                 days: int, start: datetime | None = None) -> x509.CertificateBuilder:
        now = datetime.now(UTC) if start is None else start
        return (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(self.certificate.subject).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False))

    def issue(self, public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, common_name: str, *,
              days: int = 365) -> x509.Certificate:
        """A key-management certificate, as a site CA issues for slot 9D (no OAEP extension):
        keyEncipherment for RSA, keyAgreement for EC."""
        ec_key = isinstance(public, ec.EllipticCurvePublicKey)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
                             x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return (self._builder(subject, public, days)
                .add_extension(x509.KeyUsage(False, False, not ec_key, False, ec_key, False,
                                             False, False, False), critical=True)
                .sign(self.key, hashes.SHA256()))

    def issue_archiver_signing(self, csr: x509.CertificateSigningRequest, *, days: int = 365,
                               not_before: datetime | None = None) -> x509.Certificate:
        """What a site CA issues for an Archiver's CSR (``fusion-archiver identity csr``): the
        request's subject and key (its self-signature checked first, as a CA does), key usage
        digitalSignature only, not a CA. ``not_before``: to make one that has already expired."""
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature does not verify")
        public = csr.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        return (self._builder(csr.subject, public, days, not_before)
                .add_extension(usage, critical=True).sign(self.key, hashes.SHA256()))

    def issue_tls_server(self, directory: Path, hosts: tuple[str, ...] = LOOPBACK_HOSTS, *,
                         name: str = "archiver", days: int = 30) -> tuple[Path, Path]:
        """A TLS server certificate for ``hosts`` (IP addresses become IP SANs, names DNS
        SANs) and its key, written as ``NAME-tls.crt``/``NAME-tls.key`` (0600): what an admin
        installs as the Archiver's --tls-cert/--tls-key."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Site"),
                             x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        cert = (self._builder(subject, key.public_key(), days)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}-tls.crt", directory / f"{name}-tls.key"
        return write_tls_pair(cert, key, cert_path, key_path)


def write_tls_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path,
                   key_path: Path) -> tuple[Path, Path]:
    """A TLS certificate (PEM) and its unencrypted key (PKCS#8 PEM, 0600), as a server is given
    them with --tls-cert/--tls-key."""
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
