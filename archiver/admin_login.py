"""An admin's login on the admin's own PKCS#11 token (``fusion-archiver admins login``): the
viewers' proof of possession under the admin context label (keyservice.crypto).

The Archiver encrypts a challenge to the admin's registered certificate; the token decrypts it
(one token operation) and the answer is a MAC over (Archiver, admin, challenge): the secret never
leaves the host, and the proof is good for this Archiver only. The Archiver's certificate in the
challenge is checked against ``--archiver-fingerprint`` *before* the token's key is used.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import Encoding

from archiver.admin_client import raise_for_refusal
from keyservice.crypto import LoginChallenge, admin_login_context, answer_login_challenge
from keyservice.errors import (
    ArchiverFailed,
    ArchiverMismatch,
    UsageError,
)
from keyservice.exits import unreachable
from keyservice.identity import fingerprint


@dataclass(frozen=True)
class AdminLogin:
    """An admin logged in from the CLI: the session, who it is, and the Archiver it was opened
    with (pinned)."""

    session_token: str
    name: str
    fingerprint: str
    actor: str
    expires_ms: int
    archiver_fingerprint: str


def _post(http: httpx.Client, url: str, path: str, body: Any) -> Any:
    try:
        response = http.post(path, json=body)
    except httpx.InvalidURL as exc:
        raise UsageError(f"The Archiver URL {url!r} is not usable: {exc}.") from None
    except httpx.TransportError as exc:
        raise unreachable(url, exc) from None
    raise_for_refusal(response)
    try:
        return response.json()
    except ValueError:
        raise ArchiverFailed(f"The Archiver's answer to {path} is not JSON; is {url} really a "
                             "Fusion Archiver?") from None


def login_admin(url: str, verify: ssl.SSLContext | bool, token_uri: str,
                archiver_fingerprint: str | None, timeout: float = 30) -> AdminLogin:
    # Imported here: the token layer loads a PKCS#11 module, which `--help` does not need.
    from keyservice.token import RuntimeToken

    expected = archiver_fingerprint.strip().lower().replace(":", "") if archiver_fingerprint \
        else None
    if expected is not None and (len(expected) != 64
                                 or any(c not in "0123456789abcdef" for c in expected)):
        raise UsageError("--archiver-fingerprint must be 64 hex digits (as 'fusion-archiver "
                         "certificate' prints it).")
    with RuntimeToken.open(token_uri, prompt=True) as token:  # a wrong PIN is never retried
        identity = token.identity()
        pem = identity.certificate.public_bytes(Encoding.PEM).decode()
        with httpx.Client(base_url=url.rstrip("/"), timeout=timeout, verify=verify,
                          follow_redirects=False) as http:
            challenge = LoginChallenge.from_answer(
                _post(http, url, "/v1/sessions/admin/challenge", {"certificate": pem}))
            challenge_id = challenge.challenge_id
            archiver_fp = fingerprint(challenge.archiver_certificate)
            if expected is not None and archiver_fp.hex() != expected:
                # Before the token's key is used: a relaying impostor gets no proof.
                raise ArchiverMismatch(f"{url} presented Archiver certificate sha256 "
                                       f"{archiver_fp.hex()}, not the one given with "
                                       "--archiver-fingerprint; someone may be impersonating it.")
            context = admin_login_context(archiver_fp, fingerprint(identity.certificate),
                                          challenge_id)
            proof = answer_login_challenge(identity, challenge.ciphertext,
                                           challenge.key_scheme, context)
            opened = _post(http, url, "/v1/sessions/admin", {
                "challenge_id": challenge_id.hex(), "proof": base64.b64encode(proof).decode()})
    try:
        return AdminLogin(str(opened["session_token"]), str(opened["name"]),
                            str(opened["fingerprint"]), str(opened["actor"]),
                            int(opened["expires_ms"]), archiver_fp.hex())
    except (KeyError, TypeError, ValueError):
        raise ArchiverFailed("The Archiver's admin session answer is malformed.") from None
