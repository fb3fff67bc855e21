"""The Archiver's own signing key, on its own PKCS#11 token.

By default a SoftHSM token created in the data directory on first start (its PIN in a 0600
file beside it: a development default; production names an HSM by PKCS#11 URI and gives the
PIN through FUSION_PIN or pin-source). The key signs manifests and end records; viewers pin its
certificate.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from archiver.settings import Settings
from keyservice import certs
from keyservice.errors import CertificateError, UsageError
from keyservice.identity import Signer
from keyservice.keyscheme import signing_public_key
from keyservice.pkcs11uri import DEFAULT_MODULE
from keyservice.softhsm import init_softhsm
from keyservice.token import Token, TokenSigner

DEFAULT_LABEL = "archiver"
IMPORTED_CERT_NAME = "signing-cert.pem"
_CONF_VARIABLE = "SOFTHSM2_CONF"


def open_signer(settings: Settings) -> Signer:
    """The signing key: on ``settings.signer_token_uri``, or on the data directory's own SoftHSM
    token (made on first use). Its certificate: ``--signing-cert`` if given, else the one
    imported into the data directory (``identity import``), else the token's self-signed one.
    The process's environment is left as it was."""
    signer = open_token_signer(settings)
    if settings.signing_cert_file is not None:
        signer.certificate = site_issued_certificate(settings.signing_cert_file, signer)
    elif imported_certificate_path(settings).exists():
        signer.certificate = site_issued_certificate(
            imported_certificate_path(settings), signer,
            what="The imported signing certificate",
            renew="import a renewed one with 'fusion-archiver identity import'")
    return signer


def open_token_signer(settings: Settings) -> TokenSigner:
    """The signing key on its token with the token's own (self-signed) certificate, made on
    first use."""
    if settings.signer_token_uri:
        token = Token.open(settings.signer_token_uri)
    else:
        uri, conf = default_token(settings.token_dir)
        with softhsm_config(conf):
            token = Token.open(uri)
    return token.ensure_signer(settings.signer_label, common_name=signing_common_name())


def imported_certificate_path(settings: Settings) -> Path:
    """Where ``identity import`` keeps the site CA's certificate for the signing key (public:
    a certificate, no secret), so that ``serve`` uses it without --signing-cert."""
    return settings.data_dir / IMPORTED_CERT_NAME


def make_csr(settings: Settings, common_name: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for the site CA, CN = ``common_name``, signed on the token by the
    signing key itself (proof of possession; the key never leaves the token)."""
    from keyservice.token import TokenEcKey

    signer = open_token_signer(settings)
    key = TokenEcKey(signer.token, signer.key_id, signing_public_key(signer.certificate))
    return certs.build_archiver_csr(key, common_name)


def import_certificate(settings: Settings, cert: x509.Certificate,
                       site_cas: Sequence[x509.Certificate] = ()) -> Path:
    """Keep ``cert`` as the signing key's certificate (``serve`` then presents it in every
    stream), after checking that it is for this very key, valid now, allowed to sign, not a
    CA, and issued by one of ``site_cas`` when given. Returns where it is kept."""
    signer = open_token_signer(settings)
    if not certs.same_public_key(cert.public_key(), signer.certificate.public_key()):
        raise CertificateError(
            f"The certificate {cert.subject.rfc4514_string()} is for another key, not this "
            "Archiver's signing key; give the certificate the site CA issued for this "
            "Archiver's CSR (fusion-archiver identity csr).")
    now = datetime.now(UTC)
    certs.check_archiver_signing_certificate(cert, now=now)
    if site_cas:
        certs.check_site_issued(cert, site_cas, now=now)
    path = imported_certificate_path(settings)
    # Written whole under a temporary name, then renamed: serve never reads half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as fh:
        fh.write(certs.certificate_pem(cert))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def site_issued_certificate(path: Path, signer: Signer, *, what: str = "--signing-cert",
                            renew: str = "have the site CA issue a new one") -> x509.Certificate:
    """``--signing-cert``: a site CA's certificate for this very signing key, valid now and
    allowed to sign. Refused at start otherwise (a certificate for another key would make
    every stream, manifest and expiry statement fail verification)."""
    try:
        cert = certs.load_certificate(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"Cannot read {what} {path}: {exc.strerror or exc}.") from None
    if not certs.same_public_key(cert.public_key(), signer.certificate.public_key()):
        raise CertificateError(f"{what} {path} is not a certificate for this Archiver's "
                               "signing key; have the site CA certify the key in "
                               "the current signing certificate.")
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(f"{what} {path} is not valid now (valid "
                               f"{cert.not_valid_before_utc:%Y-%m-%d} .. "
                               f"{cert.not_valid_after_utc:%Y-%m-%d}); {renew}.")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        raise CertificateError(f"{what} {path} does not allow digital signatures "
                               "(key usage).")
    return cert


def signing_common_name(host: str | None = None) -> str:
    """The subject CN of a new signing certificate: the host name and a random identity of
    this data directory's key. Used only when the key is made (an existing certificate keeps
    its name): two Archivers never read the same in a report, so one cannot pass for another
    by name (their fingerprints differ anyway; the name is what a person reads)."""
    host = (host if host is not None else socket.gethostname()).strip() or "localhost"
    # A CN holds at most 64 characters: "Fusion Archiver " + host + " " + 8 hex digits.
    return f"Fusion Archiver {host[:38]} {secrets.token_hex(4)}"


@contextlib.contextmanager
def softhsm_config(conf: Path) -> Iterator[None]:
    """``SOFTHSM2_CONF`` set to ``conf`` while the SoftHSM module is loaded (it reads its
    configuration once per process, when loaded), then put back as it was: an embedding
    process's own setting (its viewers' tokens, say) is not changed behind its back."""
    before = os.environ.get(_CONF_VARIABLE)
    os.environ[_CONF_VARIABLE] = str(conf)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_CONF_VARIABLE, None)
        else:
            os.environ[_CONF_VARIABLE] = before


def default_token(token_dir: Path) -> tuple[str, Path]:
    """The PKCS#11 URI of the data directory's own SoftHSM token (made on first use, its PIN in
    a 0600 file beside it) and its SoftHSM configuration file."""
    conf = token_dir / "softhsm2.conf"
    pin_file = token_dir / "pin"
    if not conf.exists():
        token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pin = secrets.token_hex(16)
        # The SO PIN is not kept: nobody needs to re-initialise this token.
        conf = init_softhsm(token_dir, DEFAULT_LABEL, pin, secrets.token_hex(16))
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(pin)
    return (f"pkcs11:token={DEFAULT_LABEL}?module-path={DEFAULT_MODULE}"
            f"&pin-source=file:{pin_file}", conf)
