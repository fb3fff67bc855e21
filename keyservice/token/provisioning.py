"""Provisioning: enrol viewer keys, import CA-issued certificates, adopt, delete, self-test,
and the Archiver's signing key. The key pairs are generated inside the token; CKA_ALLOWED_MECHANISMS
is never set (it crashes python-pkcs11).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pkcs11
from asn1crypto.core import Integer as Asn1Integer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from keyservice import certs
from keyservice.errors import (
    CertificateError,
    IntegrityError,
    MechanismUnsupported,
    ObjectExists,
    ObjectNotFound,
    TokenError,
    UsageError,
)
from keyservice.identity import fingerprint
from keyservice.keyscheme import KeyScheme, Recipient
from keyservice.labels import TOKEN_PROBE_CONTEXT
from keyservice.token.keys import TokenEcKey, TokenRsaKey
from keyservice.token.runtime import RuntimeToken, TokenSigner
from keyservice.token.session import (
    ec_public_key,
    guard,
)

RSA_SIZES = (2048, 3072, 4096)
DEFAULT_RSA_BITS = 3072


@dataclass(frozen=True)
class Adoption:
    """Result of `Token.adopt`: an existing key + certificate checked for use as a viewer."""

    label: str
    key_id: bytes
    certificate: x509.Certificate
    oaep_hash: KeyScheme          # the best hash the token opens (SHA-256 where it can)
    recorded: bool               # the certificate records that hash itself
    decrypt_ms: float


@dataclass(frozen=True)
class Enrollment:
    """Result of `Token.enroll`: a certificate (stored on the token) or a CSR for a site CA."""

    label: str
    key_id: bytes
    key_bits: int
    oaep_hash: KeyScheme
    certificate: x509.Certificate | None
    csr: x509.CertificateSigningRequest | None

    def pem(self) -> bytes:
        if self.certificate is not None:
            return self.certificate.public_bytes(Encoding.PEM)
        assert self.csr is not None
        return self.csr.public_bytes(Encoding.PEM)


@dataclass(frozen=True)
class ImportResult:
    label: str
    oaep_hash: KeyScheme        # measured on the token
    recorded: bool             # True if the certificate itself records it (the CA kept the ext)


@dataclass(frozen=True)
class SelftestResult:
    label: str
    oaep_hash: KeyScheme
    key_bits: int
    decrypt_ms: float
    fingerprint_hex: str



def certificate_template(cert: x509.Certificate, label: str, key_id: bytes) -> dict[Any, Any]:
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: Asn1Integer(cert.serial_number).dump(),
        Attribute.VALUE: cert.public_bytes(Encoding.DER),
    }



def check_name(name: str) -> None:
    if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
        raise UsageError("An identity name must have 1 to 64 printable characters.")



class Token(RuntimeToken):
    """A token with the provisioning operations (``fusion-keys``, the Archiver's signer set-up)
    on top of the runtime path of ``RuntimeToken``."""

    # objects made by provisioning (callers hold the lock)
    def _unused_id(self) -> bytes:
        while True:  # a random 16-byte CKA_ID: unique without coordinating with anyone
            key_id = secrets.token_bytes(16)
            if not self._objects(id=key_id):
                return key_id

    def _destroy_id(self, key_id: bytes) -> None:
        """Remove everything created under key_id (certificate first); best effort."""
        order = {ObjectClass.CERTIFICATE: 0, ObjectClass.PRIVATE_KEY: 1, ObjectClass.PUBLIC_KEY: 2}
        self._slot.key_cache.pop(key_id, None)
        try:
            objs = self._objects(id=key_id)
            for obj in sorted(objs, key=lambda o: order.get(o[Attribute.CLASS], 3)):
                obj.destroy()
        except p11.PKCS11Error:
            pass

    def _store_certificate(self, cert: x509.Certificate, label: str, key_id: bytes) -> None:
        self._session().create_object(certificate_template(cert, label, key_id))

    def adopt(self, object_name: str | None = None, *,
              site_ca: tuple[x509.Certificate, ...] = (),
              now: datetime | None = None) -> Adoption:
        """Check an existing key + certificate (a site-issued identity, e.g. in PIV slot 9D) for
        use as a viewer: they match, the certificate is a valid viewer certificate (issued by
        ``site_ca`` when given), the token decrypts with the key, and with which OAEP hash."""
        name = object_name if object_name is not None else self._uri.object
        if name is None and self._uri.id is None:
            name = self._adoptable_label()
        ident = self.identity(name) if name is not None else self.identity()
        with self._lock:
            if isinstance(ident.public_key, ec.EllipticCurvePublicKey):
                ok = self._probe_ecdh(ident.key_id, ident.certificate)
                hashes_ok: tuple[KeyScheme, ...] = (KeyScheme.ECDH_P256,) if ok else ()
            else:
                hashes_ok = self._oaep_hashes(ident.key_id, ident.public_key)
        if not hashes_ok:
            # OpenSC takes a PIV key's public half from the certificate, so a certificate for
            # another key looks like a match until the card is asked to decrypt.
            raise CertificateError(f"Token '{self.label}' does not open what is encrypted to the "
                                   f"certificate of '{ident.label}' (RSA-OAEP or ECDH): "
                                   "the certificate belongs to another key, or this key cannot "
                                   "decrypt (use the key-management slot 9D); have the card's "
                                   "key certified again.")
        recorded = certs.read_oaep_hash(ident.certificate)
        if recorded is not None and recorded not in hashes_ok:
            raise CertificateError(f"The certificate of '{ident.label}' says its token opens "
                                   f"OAEP with {certs.oaep_hash_name(recorded)}, but token "
                                   f"'{self.label}' cannot; have the certificate reissued.")
        oaep_hash = recorded or hashes_ok[0]
        # Without --site-ca, shape only: whom to trust is the Archiver's decision (its --site-ca).
        certs.validate_viewer_certificate(ident.certificate, now=now or datetime.now(UTC),
                                          site_ca=site_ca, oaep_hash=oaep_hash,
                                          trust_decision=False)
        result = self.selftest(ident.label)  # the full round trip, timed
        # An EC certificate needs no recorded hash: its scheme is fixed by the key type.
        return Adoption(ident.label, ident.key_id, ident.certificate, oaep_hash,
                        recorded is not None or oaep_hash.is_ec, result.decrypt_ms)

    def _adoptable_label(self) -> str:
        """The only key with a certificate; else PIV slot 9D (CKA_ID 03)."""
        candidates = [info for info in self.identities(probe=False) if info.fingerprint_hex]
        if len(candidates) == 1:
            return candidates[0].label
        piv_9d = [info for info in candidates if info.id_hex == "03"]
        if len(piv_9d) == 1:
            return piv_9d[0].label
        have = ", ".join(repr(info.label) for info in candidates) or "none"
        raise UsageError(f"Token '{self.label}' has {len(candidates)} keys with a certificate "
                         f"({have}); name one with ;object=NAME or ;id=%03 in the URI.")

    def supports_ec_viewers(self) -> bool:
        """Can this token make EC P-256 viewer keys and do ECDH with them?"""
        have = self._mechanisms()
        return all(m in have for m in (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE,
                                       Mechanism.ECDSA))

    def enroll(self, name: str, *, bits: int = DEFAULT_RSA_BITS, days: int = certs.VIEWER_DAYS,
               csr: bool = False, now: datetime | None = None,
               key_type: str = "rsa") -> Enrollment:
        """Generate a viewer key pair on the token and a certificate (or CSR) signed by it.
        ``key_type`` "rsa" (``bits``) or "ec" (P-256, ECDH epoch openers)."""
        check_name(name)
        if key_type == "ec":
            return self._enroll_ec(name, days=days, csr=csr, now=now or datetime.now(UTC))
        if key_type != "rsa":
            raise UsageError("The key type must be rsa or ec.")
        if bits not in RSA_SIZES:
            raise UsageError(f"RSA key size must be one of {', '.join(map(str, RSA_SIZES))}.")
        if not 1 <= days <= 3650:
            raise UsageError("Certificate validity must be 1 to 3650 days.")
        when = now or datetime.now(UTC)
        with self._lock, guard("enrol a viewer identity", self.label):
            if self._objects(label=name):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{name}'; "
                                   "choose another name or remove it with fusion-keys delete.")
            self._refuse_card_enrolment()
            self._require_mechanisms(Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_OAEP,
                                     purpose="make RSA viewer keys")
            self._check_key_size(bits)
            key_id = self._unused_id()
            try:
                public_obj, private_obj = self._session().generate_keypair(
                    KeyType.RSA, bits, id=key_id, label=name, store=True,
                    capabilities=(pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT
                                  | pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY),
                    public_template={Attribute.PRIVATE: False},
                    # The private key never leaves the token: SENSITIVE and not EXTRACTABLE
                    # (so ALWAYS_SENSITIVE / NEVER_EXTRACTABLE hold too), no UNWRAP or DERIVE.
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False})
                public = self._rsa_public(public_obj)
                del public_obj, private_obj  # may be bound to a session _probe_oaep replaces
                oaep_hash = self._probe_oaep(key_id, public)
                signing_key = TokenRsaKey(self, key_id, public)
                if csr:
                    request = certs.build_viewer_csr(signing_key, name, oaep_hash=oaep_hash)
                    return Enrollment(name, key_id, bits, oaep_hash, None, request)
                cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                                      now=when, days=days)
                self._store_certificate(cert, name, key_id)
                return Enrollment(name, key_id, bits, oaep_hash, cert, None)
            except BaseException:
                self._destroy_id(key_id)  # nothing half-created is left on the token
                raise

    def _refuse_card_enrolment(self) -> None:
        if Mechanism.EC_KEY_PAIR_GEN not in self._mechanisms() and (
                Mechanism.RSA_PKCS_KEY_PAIR_GEN not in self._mechanisms()):
            raise MechanismUnsupported(
                f"Token '{self.label}' cannot generate keys through this PKCS#11 module (OpenSC's "
                "PIV driver cannot, for one). Put a key and a site-CA certificate on the card "
                "with the card's own tool (e.g. yubico-piv-tool -a generate -s 9d, then -a "
                "import-certificate -s 9d), then run fusion-keys adopt.")
        if self.kind == "ykcs11":
            raise UsageError(f"Token '{self.label}' is a PIV card (ykcs11): enrolment writes its "
                             "slot 9D and needs the card's management key as SO PIN; give "
                             "--so-pin-source FILE or set FUSION_SO_PIN.")

    def _enroll_ec(self, name: str, *, days: int, csr: bool, now: datetime) -> Enrollment:
        if not 1 <= days <= 3650:
            raise UsageError("Certificate validity must be 1 to 3650 days.")
        with self._lock, guard("enrol a viewer identity", self.label):
            if self._objects(label=name):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{name}'; "
                                   "choose another name or remove it with fusion-keys delete.")
            self._refuse_card_enrolment()
            self._require_mechanisms(Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE,
                                     Mechanism.ECDSA, purpose="make EC P-256 viewer keys")
            key_id = self._unused_id()
            try:
                public_obj, _ = self._session().generate_keypair(
                    KeyType.EC, id=key_id, label=name, store=True,
                    capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.DERIVE,
                    # As for the signer: leave what the token derives itself unset (tpm2-pkcs11).
                    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                        "secp256r1"), Attribute.PRIVATE: False, Attribute.ENCRYPT: pkcs11.DEFAULT,
                        Attribute.WRAP: pkcs11.DEFAULT, Attribute.VERIFY: pkcs11.DEFAULT},
                    # Never leaves the token; SIGN for its own certificate, DERIVE for ECDH.
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                      Attribute.DERIVE: True, Attribute.DECRYPT: pkcs11.DEFAULT,
                                      Attribute.UNWRAP: pkcs11.DEFAULT})
                public = ec_public_key(public_obj[Attribute.EC_POINT])
                del public_obj
                signing_key = TokenEcKey(self, key_id, public)
                cert = certs.build_viewer_certificate(signing_key, name,
                                                      oaep_hash=KeyScheme.ECDH_P256, now=now,
                                                      days=days)
                if not self._probe_ecdh(key_id, cert):
                    raise MechanismUnsupported(
                        f"Token '{self.label}' made an EC key but cannot do ECDH with it, so it "
                        "cannot open streams; enrol with --key-type rsa.")
                if csr:
                    request = certs.build_viewer_csr(signing_key, name,
                                                     oaep_hash=KeyScheme.ECDH_P256)
                    return Enrollment(name, key_id, 256, KeyScheme.ECDH_P256, None, request)
                self._store_certificate(cert, name, key_id)
                return Enrollment(name, key_id, 256, KeyScheme.ECDH_P256, cert, None)
            except BaseException:
                self._destroy_id(key_id)
                raise

    def import_certificate(self, cert: x509.Certificate,
                           object_name: str | None = None) -> ImportResult:
        """Store a CA-issued certificate next to the token key it belongs to."""
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise CertificateError("The certificate holds neither an RSA nor an EC key, so it is "
                                   "not a viewer certificate from fusion-keys enroll --csr.")
        name = object_name if object_name is not None else self._uri.object
        with self._lock, guard("import the certificate", self.label):
            match = None
            for key in self._private_keys(name):
                key_type = key[Attribute.KEY_TYPE]
                if key_type == KeyType.RSA:
                    mine: object = self._rsa_public(key)
                elif key_type == KeyType.EC:
                    mine = self._ec_public(bytes(key[Attribute.ID]))
                else:
                    continue
                if certs.same_public_key(mine, public):
                    match = key
                    break
            if match is None:
                where = f" '{name}'" if name else ""
                raise CertificateError(f"The certificate's public key belongs to no key{where} on "
                                       f"token '{self.label}'; it was issued for another token or "
                                       "identity.")
            label, key_id = match[Attribute.LABEL], bytes(match[Attribute.ID])
            if self._certificate_object(key_id) is not None:
                raise ObjectExists(f"'{label}' on token '{self.label}' already has a certificate; "
                                   "it is never overwritten (delete and enrol again to replace).")
            if isinstance(public, ec.EllipticCurvePublicKey):
                if not self._probe_ecdh(key_id, cert):
                    raise MechanismUnsupported(f"Token '{self.label}' cannot do ECDH with "
                                               f"'{label}', so it cannot open streams.")
                oaep_hash = KeyScheme.ECDH_P256
            else:
                oaep_hash = self._probe_oaep(key_id, public)
            # Shape only: the Archiver decides whom to trust (--site-ca), not the viewer's token.
            certs.validate_viewer_certificate(cert, now=datetime.now(UTC), oaep_hash=oaep_hash,
                                              trust_decision=False)
            self._store_certificate(cert, label, key_id)
        # EC: the key type fixes the scheme, nothing to record.
        return ImportResult(label, oaep_hash, oaep_hash.is_ec
                            or certs.read_oaep_hash(cert) is not None)

    def delete(self, object_name: str | None = None) -> int:
        """Remove an identity (certificate, private and public key); returns objects removed."""
        name = object_name if object_name is not None else self._uri.object
        if name is None:
            raise UsageError("The token URI names no identity to delete; add ;object=NAME.")
        with self._lock, guard("delete the identity", self.label):
            objs = self._objects(label=name)
            ids = {bytes(o[Attribute.ID]) for o in objs
                   if o[Attribute.CLASS] == ObjectClass.PRIVATE_KEY}
            for key_id in ids:
                objs += self._objects(id=key_id)
                self._slot.key_cache.pop(key_id, None)
            unique = {o.handle: o for o in objs}
            if not unique:
                raise ObjectNotFound(f"Token '{self.label}' has no object named '{name}'; "
                                     "fusion-keys list shows what is there.")
            order = {ObjectClass.CERTIFICATE: 0, ObjectClass.PRIVATE_KEY: 1}
            for obj in sorted(unique.values(), key=lambda o: order.get(o[Attribute.CLASS], 2)):
                obj.destroy()
        return len(unique)

    def selftest(self, object_name: str | None = None) -> SelftestResult:
        """Wrap a random key to the certificate in software, unwrap on the token, compare."""
        ident = self.identity(object_name)
        secret = secrets.token_bytes(32)
        if isinstance(ident.public_key, ec.EllipticCurvePublicKey):
            oaep_hash = KeyScheme.ECDH_P256
        else:
            recorded = certs.read_oaep_hash(ident.certificate)
            with self._lock:
                oaep_hash = recorded or self._probe_oaep(ident.key_id, ident.public_key)
        wrapped = Recipient(ident.certificate, oaep_hash).wrap(secret, TOKEN_PROBE_CONTEXT)
        start = time.perf_counter()
        try:
            opened = ident.unwrap(wrapped, TOKEN_PROBE_CONTEXT)
        except IntegrityError:
            opened = b""
        elapsed = (time.perf_counter() - start) * 1000
        if not hmac.compare_digest(opened, secret):
            raise TokenError(f"Self-test failed: token '{self.label}' could not open a key "
                             f"wrapped to '{ident.label}'; the token or certificate is broken.")
        return SelftestResult(ident.label, oaep_hash, ident.public_key.key_size, elapsed,
                              fingerprint(ident.certificate).hex())

    def ensure_signer(self, label: str, common_name: str) -> TokenSigner:
        """The Archiver's ECDSA P-256 signing key and self-signed certificate: load or create."""
        check_name(label)
        with self._lock, guard("prepare the signing key", self.label):
            keys = self._private_keys(label)
            if len(keys) > 1:
                raise ObjectExists(f"Token '{self.label}' has {len(keys)} keys named '{label}'; "
                                   "remove the extra ones.")
            if keys:
                key = keys[0]
                if key[Attribute.KEY_TYPE] != KeyType.EC:
                    raise ObjectExists(f"'{label}' on token '{self.label}' is not an EC signing "
                                       "key; choose another label.")
                key_id = bytes(key[Attribute.ID])
                public = self._ec_public(key_id)
                cert_obj = self._certificate_object(key_id)
                if cert_obj is not None:
                    cert = certs.load_certificate(bytes(cert_obj[Attribute.VALUE]))
                    if not certs.same_public_key(cert.public_key(), public):
                        raise CertificateError(f"The certificate stored for signing key '{label}' "
                                               "belongs to another key; delete both and restart.")
                    return TokenSigner(self, label, key_id, cert)
                cert = certs.build_archiver_certificate(TokenEcKey(self, key_id, public),
                                                        common_name, now=datetime.now(UTC))
                self._store_certificate(cert, label, key_id)
                return TokenSigner(self, label, key_id, cert)
            if self._objects(label=label):
                raise ObjectExists(f"Token '{self.label}' already has an object named '{label}'; "
                                   "choose another label for the signing key.")
            self._require_mechanisms(Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA,
                                     purpose="make ECDSA signing keys")
            key_id = self._unused_id()
            try:
                public_obj, _ = self._session().generate_keypair(
                    KeyType.EC, id=key_id, label=label, store=True,
                    capabilities=pkcs11.MechanismFlag.SIGN,
                    # Leave ENCRYPT/VERIFY/DECRYPT unset: tpm2-pkcs11 rejects templates that
                    # contradict the usage it derives itself (GeneralError, a leaked TPM handle).
                    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                        "secp256r1"), Attribute.PRIVATE: False, Attribute.ENCRYPT: pkcs11.DEFAULT,
                        Attribute.WRAP: pkcs11.DEFAULT, Attribute.VERIFY: pkcs11.DEFAULT},
                    private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                      Attribute.DECRYPT: pkcs11.DEFAULT,
                                      Attribute.UNWRAP: pkcs11.DEFAULT,
                                      Attribute.DERIVE: pkcs11.DEFAULT})
                public = ec_public_key(public_obj[Attribute.EC_POINT])
                cert = certs.build_archiver_certificate(TokenEcKey(self, key_id, public),
                                                        common_name, now=datetime.now(UTC))
                self._store_certificate(cert, label, key_id)
            except BaseException:
                self._destroy_id(key_id)
                raise
        return TokenSigner(self, label, key_id, cert)

    def _require_mechanisms(self, *needed: Any, purpose: str) -> None:
        have = self._mechanisms()
        missing = [m.name for m in needed if m not in have]
        if missing:
            raise MechanismUnsupported(f"Token '{self.label}' cannot {purpose} (it lacks "
                                       f"{', '.join(missing)}); use another token.")

    def _check_key_size(self, bits: int) -> None:
        info = self._slot.p11token.slot.get_mechanism_info(Mechanism.RSA_PKCS_KEY_PAIR_GEN)
        low, high = info.min_key_length, info.max_key_length
        if high and not low <= bits <= high:
            raise MechanismUnsupported(f"Token '{self.label}' makes RSA keys of {low} to {high} "
                                       f"bits, not {bits}; choose another --key size.")


