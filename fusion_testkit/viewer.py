"""A viewer's login written against the protocol with keyservice only (independent of the
client package): proof of possession of the identity's private key."""

from __future__ import annotations

import base64
import ssl

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit.server import UnexpectedStatus
from keyservice.crypto import answer_login_challenge, login_context
from keyservice.identity import Identity, fingerprint
from keyservice.keyscheme import KeyScheme


def _expect(response: httpx.Response, status: int) -> httpx.Response:
    if response.status_code != status:
        raise UnexpectedStatus(f"{response.request.method} {response.request.url.path}: HTTP "
                               f"{response.status_code} (expected {status}) {response.text[:500]}")
    return response


def login(url: str, identity: Identity, verify: ssl.SSLContext | bool = True) -> str:
    """Challenge, proof computed with the identity (a token or software), session token."""
    pem = identity.certificate.public_bytes(Encoding.PEM).decode()
    with httpx.Client(timeout=30, verify=verify) as http:
        body = _expect(http.post(f"{url}/v1/sessions/challenge", json={"certificate": pem}),
                       200).json()
        archiver = x509.load_pem_x509_certificate(body["archiver_certificate"].encode())
        challenge_id = bytes.fromhex(body["challenge_id"])
        context = login_context(fingerprint(archiver), fingerprint(identity.certificate),
                                challenge_id)
        proof = answer_login_challenge(identity, base64.b64decode(body["ciphertext"]),
                                       KeyScheme.from_label(body["key_scheme"]), context)
        session = _expect(http.post(f"{url}/v1/sessions", json={
            "challenge_id": body["challenge_id"], "proof": base64.b64encode(proof).decode()}), 201)
    return session.json()["session_token"]
