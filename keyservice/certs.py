"""Viewer and Archiver certificates: building, loading, validating, and the OAEP-hash extension.

Certificates are *built* here with ``cryptography`` but *signed* by whatever private-key object the
caller passes: in real use a token-backed key from ``keyservice.token`` whose ``sign()`` runs on
the token, so no private key is ever in host memory. This module is pure (no I/O, no ``pkcs11``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asn1crypto.core import ObjectIdentifier as Asn1Oid
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from keyservice.errors import CertificateError, UsageError
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, same_public_key  # noqa: F401  (a public name here too)

# Non-critical extension recording the RSA-OAEP hash the viewer's token can open. Value: the DER
# of the hash algorithm's OID. It lets the Archiver wrap with a hash the token supports without the
# admin knowing or typing it (SoftHSM 2.6 opens only SHA-1; TPMs and most cards SHA-256).
OAEP_HASH_OID = x509.ObjectIdentifier("2.25.100634548127606015957751865592253233119")

_HASH_OIDS = {
    KeyScheme.RSA_OAEP_SHA1: "1.3.14.3.2.26",
    KeyScheme.RSA_OAEP_SHA256: "2.16.840.1.101.3.4.2.1",
}
_OID_HASHES = {oid: h for h, oid in _HASH_OIDS.items()}

MIN_RSA_BITS = 2048
VIEWER_DAYS = 730
ARCHIVER_DAYS = 3650
# Certificates start a little in the past so a viewer whose clock lags slightly can still use one.
_BACKDATE = timedelta(minutes=5)


def oaep_hash_name(oaep_hash: KeyScheme) -> str:
    """Display name: SHA-1 / SHA-256 (ECDH-P256 for EC viewers)."""
    return {KeyScheme.RSA_OAEP_SHA1: "SHA-1", KeyScheme.RSA_OAEP_SHA256: "SHA-256",
            KeyScheme.ECDH_P256: "ECDH-P256"}[oaep_hash]


def oaep_hash_extension(oaep_hash: KeyScheme) -> x509.UnrecognizedExtension:
    """The extension value recording ``oaep_hash`` (DER-encoded by asn1crypto, not by hand)."""
    return x509.UnrecognizedExtension(OAEP_HASH_OID, Asn1Oid(_HASH_OIDS[oaep_hash]).dump())


def read_oaep_hash(cert: x509.Certificate | x509.CertificateSigningRequest) -> KeyScheme | None:
    """The OAEP hash recorded in a certificate (or CSR); None when it has no such extension."""
    try:
        ext = cert.extensions.get_extension_for_oid(OAEP_HASH_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateError("The certificate's OAEP-hash extension cannot be read.")
    try:
        dotted = Asn1Oid.load(value.value, strict=True).dotted
    except (ValueError, TypeError):
        raise CertificateError("The certificate's OAEP-hash extension is malformed; re-export the "
                               "certificate with fusion-keys export.") from None
    found = _OID_HASHES.get(dotted)
    if found is None:
        raise CertificateError(f"The certificate asks for an unsupported OAEP hash ({dotted}); "
                               "only SHA-256 and SHA-1 are supported.")
    return found


def load_certificate(data: bytes) -> x509.Certificate:
    """Read one X.509 certificate from PEM or DER bytes."""
    if b"PRIVATE KEY-----" in data:
        # Someone is about to hand out a private key: stop before it spreads any further.
        raise CertificateError("This file contains a private key, not just a certificate; do not "
                               "share it, and give the certificate PEM instead.")
    try:
        if b"-----BEGIN" in data:
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise CertificateError("This PEM file holds no certificate (perhaps a CSR or a "
                                       "key); give the certificate PEM.")
            certs = x509.load_pem_x509_certificates(data)
            if len(certs) != 1:
                raise CertificateError(f"The PEM file holds {len(certs)} certificates; give a "
                                       "file with exactly the one certificate.")
            return certs[0]
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion: not a ValueError
        raise CertificateError("The file is not a readable X.509 certificate (PEM or DER); check "
                               "that you gave the right file.") from None


def load_certificate_file(path: Path) -> x509.Certificate:
    """A certificate (PEM or DER) from a file: UsageError if unreadable, CertificateError
    (naming the file) if it is not a certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        return load_certificate(data)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Read a certificate signing request from PEM or DER bytes."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise CertificateError("The file is not a readable certificate signing request.") from None


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise CertificateError("A certificate name must have 1 to 64 characters.")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _serial(serial: int | None) -> int:
    return serial if serial is not None else x509.random_serial_number()


def _viewer_key_usage(ec_key: bool = False) -> x509.KeyUsage:
    # keyEncipherment: the Archiver RSA-OAEP-encrypts epoch openers to this key (RSA);
    # keyAgreement: it does ECDH with it (EC P-256).
    # digitalSignature: the same token key signs its own certificate / CSR at enrolment.
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=not ec_key, data_encipherment=False,
                         key_agreement=ec_key, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _viewer_extensions(builder: Any, public_key: object, oaep_hash: KeyScheme) -> Any:
    ec_key = isinstance(public_key, ec.EllipticCurvePublicKey)
    builder = builder.add_extension(_viewer_key_usage(ec_key), critical=True)
    if not ec_key:  # an EC key's scheme is fixed by its type: nothing to record
        builder = builder.add_extension(oaep_hash_extension(oaep_hash), critical=False)
    return builder


def build_viewer_certificate(signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                             name: str, *, oaep_hash: KeyScheme,
                             now: datetime, days: int = VIEWER_DAYS,
                             serial: int | None = None) -> x509.Certificate:
    """A self-signed viewer certificate, CN = ``name``, signed by ``signing_key`` (a token key)."""
    if days < 1:
        raise CertificateError("A certificate must be valid for at least one day.")
    public_key = signing_key.public_key()
    subject = _name(name)
    start = _utc(now) - _BACKDATE
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(_serial(serial))
        .not_valid_before(start)
        .not_valid_after(_utc(now) + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
    )
    builder = _viewer_extensions(builder, public_key, oaep_hash)
    return builder.sign(signing_key, hashes.SHA256())


def build_viewer_csr(signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: str, *,
                     oaep_hash: KeyScheme) -> x509.CertificateSigningRequest:
    """A CSR for a site CA, requesting the viewer extensions (the CA may or may not copy them)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(name))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    builder = _viewer_extensions(builder, signing_key.public_key(), oaep_hash)
    return builder.sign(signing_key, hashes.SHA256())


def build_archiver_certificate(signing_key: ec.EllipticCurvePrivateKey, common_name: str, *,
                               now: datetime, days: int = ARCHIVER_DAYS,
                               serial: int | None = None) -> x509.Certificate:
    """The Archiver's self-signed ECDSA P-256 certificate (viewers pin it by fingerprint)."""
    public_key = signing_key.public_key()
    if not isinstance(signing_key.curve, ec.SECP256R1):
        raise CertificateError("The Archiver signing key must be ECDSA P-256.")
    subject = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(_serial(serial))
        .not_valid_before(_utc(now) - _BACKDATE)
        .not_valid_after(_utc(now) + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(ski, critical=False)
        .sign(signing_key, hashes.SHA256())
    )


def _archiver_key_usage() -> x509.KeyUsage:
    # digitalSignature only: the key signs manifests and end records, nothing else.
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                         decipher_only=False)


def build_archiver_csr(signing_key: ec.EllipticCurvePrivateKey,
                       common_name: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for a site CA to certify the Archiver's signing key, CN =
    ``common_name`` (the Archiver's name in its site), signed by ``signing_key`` (a token key:
    the signature is made on the token, the key never leaves it). It asks for what the
    Archiver's certificate must say: not a CA, key usage digitalSignature."""
    if not isinstance(signing_key.curve, ec.SECP256R1):
        raise CertificateError("The Archiver signing key must be ECDSA P-256.")
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(_name(common_name))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_archiver_key_usage(), critical=True)
            .sign(signing_key, hashes.SHA256()))


def _subject_of(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (sha256 {fingerprint(cert).hex()})"


def check_archiver_signing_certificate(cert: x509.Certificate, *, now: datetime) -> None:
    """The shape of an Archiver's signing certificate: an EC P-256 key, valid at ``now``,
    key usage present and allowing digitalSignature, not a CA. A certificate that may not
    sign (or that is a CA, which could mint Archivers) vouches for no stream."""
    now = _utc(now)
    who = _subject_of(cert)
    key = cert.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        raise CertificateError(f"The certificate {who} holds no EC P-256 key, so it cannot be "
                               "an Archiver's signing certificate.")
    if now < cert.not_valid_before_utc:
        raise CertificateError(f"The certificate {who} is not valid before "
                               f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this "
                               "machine's clock.")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"The certificate {who} expired on "
                               f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; have the site "
                               "CA issue a new one.")
    usage = _extension(cert, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise CertificateError(f"The certificate {who} is not a signing certificate (its key "
                               "usage lacks digitalSignature); have the site CA issue one with "
                               "key usage digitalSignature.")
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateError(f"The certificate {who} is a CA certificate, not an Archiver's "
                               "signing certificate.")


def _extension(cert: x509.Certificate, kind: type[Any]) -> Any:
    """The value of ``cert``'s extension of that class, or None if it has none."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _site_ee_policy() -> Any:
    """What x509.verification requires of the Archiver's (end-entity) certificate: key usage
    with digitalSignature, not a CA. Not the WebPKI defaults: those are for TLS (a subject
    alternative name, an EKU), which a signing certificate has no use for."""
    from cryptography.x509 import verification as v

    def signs(_policy: object, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
        if usage is None or not usage.digital_signature:
            raise ValueError("key usage lacks digitalSignature")

    def not_ca(_policy: object, _cert: x509.Certificate,
               constraints: x509.BasicConstraints | None) -> None:
        if constraints is not None and constraints.ca:
            raise ValueError("it is a CA certificate")

    return (v.ExtensionPolicy.permit_all()
            .require_present(x509.KeyUsage, v.Criticality.AGNOSTIC, signs)
            .may_be_present(x509.BasicConstraints, v.Criticality.AGNOSTIC, not_ca))


def check_site_issued(cert: x509.Certificate, site_cas: Sequence[x509.Certificate], *,
                      now: datetime) -> x509.Certificate:
    """Whether ``cert`` is the signing certificate of an Archiver of the site: issued by one of
    ``site_cas`` (path validation by cryptography's x509.verification, the site CAs as trust
    anchors: signature, validity of both, the CA's constraints and key usage), valid at
    ``now``, allowed to sign, not a CA. Returns the issuing CA; CertificateError names the
    certificate and the CA expected otherwise."""
    from cryptography.x509 import verification as v

    if not site_cas:
        raise CertificateError("No site CA was given to check the Archiver's certificate "
                               "against.")
    now = _utc(now)
    who = _subject_of(cert)
    expected = "; ".join(ca.subject.rfc4514_string() for ca in site_cas)
    issuers = [ca for ca in site_cas if _issued_by(cert, ca)]
    if not issuers:
        # The common case, worth its own sentence: a self-signed or another site's Archiver.
        raise CertificateError(f"The Archiver certificate {who}, issued by "
                               f"'{cert.issuer.rfc4514_string()}', was not issued by the site "
                               f"CA '{expected}'; it is not an Archiver of this site.")
    check_archiver_signing_certificate(cert, now=now)
    builder = (v.PolicyBuilder().store(v.Store(list(site_cas))).time(now)
               .extension_policies(ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
                                   ee_policy=_site_ee_policy()))
    try:
        chain = builder.build_client_verifier().verify(cert, []).chain
    except v.VerificationError as exc:
        raise CertificateError(f"The Archiver certificate {who} does not validate against the "
                               f"site CA '{expected}' ({exc}).") from None
    return chain[-1]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        start = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
        raise CertificateError(f"The {what} is not valid before {start} UTC; check this "
                               "machine's clock.")
    if now > cert.not_valid_after_utc:
        end = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}"
        raise CertificateError(f"The {what} expired on {end} UTC; enrol a new identity or have "
                               "it renewed.")


def validate_viewer_certificate(cert: x509.Certificate, *, now: datetime,
                                site_ca: Sequence[x509.Certificate] = (),
                                oaep_hash: KeyScheme | None = None,
                                trust_decision: bool = True) -> KeyScheme:
    """Check a viewer certificate before anything is encrypted to it; return its OAEP hash.

    RSA >= 2048 bits, valid at ``now``, keyUsage keyEncipherment, not a CA, and issued by one of
    ``site_ca`` when given (its signature verified), else self-signed with a self-signature
    that verifies (a certificate from an unknown issuer is refused). ``trust_decision`` False
    (storing a CA-issued certificate on the viewer's own token) checks the shape only: whom to
    trust is the Archiver's decision, with its --site-ca. The OAEP hash
    comes from the certificate's extension or ``oaep_hash``; both given and different is an error.
    EC P-256 keys (keyUsage keyAgreement) get ``KeyScheme.ECDH_P256``: their scheme is fixed.
    """
    now = _utc(now)
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _validate_ec_viewer(cert, key, now, site_ca, oaep_hash, trust_decision)
    if not isinstance(key, rsa.RSAPublicKey):
        raise CertificateError("The viewer certificate holds neither an RSA nor an EC P-256 key; "
                               "enrol the viewer with fusion-keys enroll.")
    if key.key_size < MIN_RSA_BITS:
        raise CertificateError(f"The viewer key has only {key.key_size} bits; enrol a new identity "
                               f"with at least {MIN_RSA_BITS} bits.")
    _check_validity(cert, now, "viewer certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError("The viewer certificate has no keyUsage extension; it must allow "
                               "keyEncipherment (enrol with fusion-keys enroll).") from None
    if not usage.key_encipherment:
        raise CertificateError("The viewer certificate does not allow keyEncipherment; it is not "
                               "meant for receiving keys (enrol with fusion-keys enroll).")
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateError("This is a CA certificate, not a viewer certificate; give the "
                               "viewer's own certificate.")
    _check_issuer(cert, now, site_ca, trust_decision)
    recorded = read_oaep_hash(cert)
    if recorded is not None and oaep_hash is not None and recorded is not oaep_hash:
        raise CertificateError(f"The certificate says its token opens OAEP with "
                               f"{oaep_hash_name(recorded)} but {oaep_hash_name(oaep_hash)} was "
                               "requested; drop the explicit key scheme.")
    chosen = recorded if recorded is not None else oaep_hash
    if chosen is None:
        raise CertificateError("The certificate does not say which RSA-OAEP hash the viewer's "
                               "token opens; give it explicitly (key scheme rsa-oaep-sha256, or "
                               "rsa-oaep-sha1 for SoftHSM; fusion-keys selftest on the viewer "
                               "machine shows it).")
    return chosen


def _check_issuer(cert: x509.Certificate, now: datetime, site_ca: Sequence[x509.Certificate],
                  trust_decision: bool) -> None:
    """Issued by one of ``site_ca`` (signature verified), else self-signed with a valid
    self-signature; issued by anyone else, it is refused when this is the trust decision."""
    if site_ca:
        issuers = [ca for ca in site_ca if _issued_by(cert, ca)]
        if not issuers:
            raise CertificateError("The viewer certificate was not issued by the site CA; have the "
                                   "site CA sign the viewer's CSR (fusion-keys enroll --csr).")
        _check_validity(issuers[0], now, "site CA certificate")
    elif cert.issuer != cert.subject:
        if trust_decision:
            # Issued by someone else, whom this Archiver does not know: its signature cannot be
            # checked, so the certificate vouches for nothing.
            raise CertificateError(
                f"The viewer certificate was issued by '{cert.issuer.rfc4514_string()}', which "
                "this Archiver does not know, so its signature cannot be verified; start the "
                "Archiver with --site-ca naming that CA's certificate, or enrol a self-signed "
                "identity.")
    elif not _issued_by(cert, cert):
        raise CertificateError("The certificate's self-signature does not verify: the file was "
                               "damaged or altered; export it again with fusion-keys export.")


def _validate_ec_viewer(cert: x509.Certificate, key: ec.EllipticCurvePublicKey, now: datetime,
                        site_ca: Sequence[x509.Certificate], oaep_hash: KeyScheme | None,
                        trust_decision: bool) -> KeyScheme:
    if not isinstance(key.curve, ec.SECP256R1):
        raise CertificateError(f"The viewer key is on curve {key.curve.name}; only P-256 "
                               "(secp256r1) is supported for EC viewers.")
    if oaep_hash is not None and oaep_hash is not KeyScheme.ECDH_P256:
        raise CertificateError("An EC viewer certificate takes no RSA-OAEP key scheme (its "
                               "scheme is ecdh-p256); drop the explicit key scheme.")
    _check_validity(cert, now, "viewer certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError("The EC viewer certificate has no keyUsage extension; it must "
                               "allow keyAgreement.") from None
    if not usage.key_agreement:
        raise CertificateError("The EC viewer certificate does not allow keyAgreement; it is not "
                               "meant for receiving keys.")
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateError("This is a CA certificate, not a viewer certificate; give "
                               "the viewer's own certificate.")
    _check_issuer(cert, now, site_ca, trust_decision)
    return KeyScheme.ECDH_P256


@dataclass(frozen=True)
class CertificateSummary:
    """What `fusion-keys list` and admins want to see about a certificate."""

    subject: str
    fingerprint_hex: str
    key_bits: int
    oaep_hash: KeyScheme | None
    not_after: datetime
    self_signed: bool


def summarize(cert: x509.Certificate) -> CertificateSummary:
    key = cert.public_key()
    bits = key.key_size if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) else 0
    try:
        oaep: KeyScheme | None = read_oaep_hash(cert)
    except CertificateError:
        oaep = None
    return CertificateSummary(
        subject=cert.subject.rfc4514_string(),
        fingerprint_hex=fingerprint(cert).hex(),
        key_bits=bits,
        oaep_hash=oaep,
        not_after=cert.not_valid_after_utc,
        self_signed=cert.issuer == cert.subject,
    )
