"""Private-key operation time of one viewer identity on its token, through PKCS#11.

    python -m bench.tokens --token 'pkcs11:id=%03?module-path=...opensc-pkcs11.so' --rounds 30

What the viewer pays per epoch opener and per login: one RSA-OAEP decrypt on the token (the
identity's own OAEP hash, recorded in the certificate or measured), or for an EC P-256 identity
one ECDH (CKM_ECDH1_DERIVE and reading the derived secret). Prints min / median / max in ms.
The PIN comes as for every command (URI pin-source/pin-value, $FUSION_PIN, prompt).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyservice.certs import read_oaep_hash
from keyservice.errors import KeyServiceError
from keyservice.identity import Recipient
from keyservice.token import Token, TokenIdentity


def measure(uri: str, rounds: int) -> list[float]:
    """``rounds`` timed decrypts (ms), after one untimed warm-up."""
    with Token.open(uri, prompt=True) as token:
        ident = token.identity()
        if ident.is_ec:
            return _measure_ecdh(ident, rounds)
        oaep_hash = read_oaep_hash(ident.certificate) or token.selftest().oaep_hash
        recipient = Recipient(ident.certificate, oaep_hash)
        ident.rsa_decrypt(recipient.encrypt(secrets.token_bytes(32)), oaep_hash)
        times = []
        for _ in range(rounds):
            secret = secrets.token_bytes(32)
            ciphertext = recipient.encrypt(secret)
            start = time.perf_counter()
            opened = ident.rsa_decrypt(ciphertext, oaep_hash)
            times.append((time.perf_counter() - start) * 1000)
            assert opened == secret
    return times


def _measure_ecdh(ident: TokenIdentity, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds + 1):
        peer = ec.generate_private_key(ec.SECP256R1())
        point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        start = time.perf_counter()
        shared = ident.ecdh(point)
        times.append((time.perf_counter() - start) * 1000)
        assert shared == peer.exchange(ec.ECDH(), ident.public_key)
    return times[1:]  # the first one warms up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--token", required=True, help="PKCS#11 URI of a viewer identity")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        times = measure(args.token, args.rounds)
    except KeyServiceError as exc:
        raise SystemExit(f"bench.tokens: {exc}") from None
    print(f"private-key operation on the token, {len(times)} rounds: min {min(times):.1f} ms, "
          f"median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")


if __name__ == "__main__":
    main()
