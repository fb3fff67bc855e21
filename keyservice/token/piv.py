"""Enrolment on a PIV card through ykcs11 (fixed key slots, SO login = management key)."""

from __future__ import annotations

from datetime import UTC, datetime

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters

from keyservice import certs
from keyservice.errors import (
    MechanismUnsupported,
    ObjectExists,
    UsageError,
)
from keyservice.keyscheme import KeyScheme
from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.token.keys import TokenEcKey, TokenRsaKey
from keyservice.token.provisioning import Enrollment, Token, certificate_template, check_name
from keyservice.token.session import (
    ec_public_key,
    find_token,
    guard,
    load_module,
    resolve_module_path,
    resolve_pin,
    so_session,
)

# --- PIV cards -------------------------------------------------------------------------------
# CKA_ID of the PIV key slots in ykcs11 and OpenSC (9D, Key Management, is the decryption slot).
PIV_SLOT_IDS = {"9a": b"\x01", "9c": b"\x02", "9d": b"\x03", "9e": b"\x04"}


def enroll_piv(uri: str | Pkcs11Uri, name: str, *, so_pin: str, pin: str | None = None,
               prompt: bool = False, slot: str = "9d", bits: int = 2048,
               days: int = certs.VIEWER_DAYS, csr: bool = False,
               now: datetime | None = None, key_type: str = "rsa") -> Enrollment:
    """Enrol a viewer on a PIV card through ykcs11: a key pair generated in ``slot`` (SO login =
    management key), a certificate signed by that key (user PIN), stored in the slot (SO).

    PKCS#11 allows one login per token at a time, so the steps take turns: SO, user, SO. A key
    already in the slot is never replaced (it may be someone's identity): adopt it instead.
    """
    parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
    check_name(name)
    key_id = PIV_SLOT_IDS.get(slot.lower())
    if key_id is None:
        raise UsageError(f"PIV slot must be one of {', '.join(PIV_SLOT_IDS)} (9d is the "
                         "key-management slot meant for decryption).")
    if not 1 <= days <= 3650:
        raise UsageError("Certificate validity must be 1 to 3650 days.")
    module = load_module(resolve_module_path(parsed))
    with module.lock, guard("open the token", parsed.token or "(unnamed)"):
        p11token = find_token(module, parsed)
        label = p11token.label
        if p11token.slot.slot_id in module.slots:
            raise UsageError(f"Token '{label}' is already open in this process; close it first.")
    pin = resolve_pin(parsed, pin, prompt, label)
    user_uri = Pkcs11Uri(token=parsed.token, serial=parsed.serial, module_path=parsed.module_path)
    # 1. user PIN first (so a wrong one costs nothing), and the slot must be free.
    with Token.open(user_uri, pin=pin) as tok, tok._lock, guard("check the slot", label):
        if tok._private_keys(key_id=key_id):
            raise ObjectExists(f"Slot {slot} of token '{label}' already holds a key; it is never "
                               "replaced. Use it with fusion-keys adopt, or clear the slot with "
                               "the card's tool first.")
        if key_type == "rsa":
            tok._check_key_size(bits)
        elif key_type != "ec":
            raise UsageError("The key type must be rsa or ec.")
    # 2. the key pair, generated on the card (SO).
    ec_key = key_type == "ec"
    with so_session(module, p11token, so_pin, label, "generate a key pair") as session:
        if ec_key:
            public_obj, _ = session.generate_keypair(
                KeyType.EC, id=key_id, label=name, store=True,
                capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.DERIVE,
                public_template={Attribute.EC_PARAMS: encode_named_curve_parameters(
                    "secp256r1"), Attribute.PRIVATE: False},
                private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True})
            public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = ec_public_key(
                public_obj[Attribute.EC_POINT])
        else:
            public_obj, _ = session.generate_keypair(
                KeyType.RSA, bits, id=key_id, label=name, store=True,
                capabilities=(pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT
                              | pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY),
                public_template={Attribute.PRIVATE: False},
                # ykcs11 refuses CKA_EXTRACTABLE in the template (AttributeTypeInvalid); a PIV
                # key never leaves the card anyway (tests check NEVER_EXTRACTABLE).
                private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True})
            n = int.from_bytes(public_obj[Attribute.MODULUS], "big")
            e = int.from_bytes(public_obj[Attribute.PUBLIC_EXPONENT], "big")
            public = rsa.RSAPublicNumbers(e, n).public_key()
    # 3. which scheme works, and the certificate signed by the new key (user PIN).
    with Token.open(user_uri, pin=pin) as tok, tok._lock:
        key_label = tok._one_private_key(None, key_id)[Attribute.LABEL]
        signing_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if isinstance(public, ec.EllipticCurvePublicKey):
            oaep_hash = KeyScheme.ECDH_P256
            signing_key = TokenEcKey(tok, key_id, public)
            probe_cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                                        now=now or datetime.now(UTC), days=days)
            if not tok._probe_ecdh(key_id, probe_cert):
                raise MechanismUnsupported(f"Token '{label}' cannot do ECDH with the new key; "
                                           "enrol with --key-type rsa.")
            bits = 256
        else:
            oaep_hash = tok._probe_oaep(key_id, public)
            signing_key = TokenRsaKey(tok, key_id, public)
        if csr:
            request = certs.build_viewer_csr(signing_key, name, oaep_hash=oaep_hash)
            return Enrollment(key_label, key_id, bits, oaep_hash, None, request)
        cert = certs.build_viewer_certificate(signing_key, name, oaep_hash=oaep_hash,
                                              now=now or datetime.now(UTC), days=days)
    # 4. the certificate into the slot, replacing ykcs11's placeholder (SO).
    with so_session(module, p11token, so_pin, label, "store the certificate") as session:
        session.create_object(certificate_template(cert, key_label, key_id))
    return Enrollment(key_label, key_id, bits, oaep_hash, cert, None)


