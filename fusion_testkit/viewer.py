"""A minimal viewer written against the protocol with keyservice only (independent of the
client package): proof-of-possession login, stream fetch, verification; and a viewer enrolled
on a throwaway token (``EnrolledViewer``), as the pytest plugin hands it to a test."""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fusion_testkit.server import UnexpectedStatus
from fusion_testkit.tokens import TokenHandle, enroll_viewer
from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    answer_login_challenge,
    chain_step,
    login_context,
    open_epoch_opener,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.format import ChainRecord, EpochOpener, Segment
from keyservice.framing import RecordSplitter
from keyservice.identity import Identity, OaepHash, fingerprint
from keyservice.reader import SegmentPlaintext, SegmentSkipped, StreamEnded, StreamReader
from keyservice.token import Token, TokenIdentity


@dataclass(frozen=True)
class EnrolledViewer:
    """A viewer identity on a throwaway token: ``uri`` names the key (with the PIN, for
    tests), ``certificate`` is its PEM file, ``env`` what a subprocess (fusion-client) needs
    to find the token."""

    name: str
    token: TokenHandle
    uri: str
    certificate: Path
    key_type: str = "rsa"

    @classmethod
    def enrol(cls, token: TokenHandle, name: str, key_type: str = "rsa",
              bits: int = 2048) -> EnrolledViewer:
        pem = enroll_viewer(token, name, bits=bits, key_type=key_type)
        return cls(name, token, token.object_uri(name), pem, key_type)

    @property
    def env(self) -> dict[str, str]:
        return self.token.env

    def identity(self) -> TokenIdentity:
        """The identity, its private key on the token (opened in this process)."""
        return Token.open(self.token.uri).identity(self.name)


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
                                       OaepHash.from_label(body["oaep_hash"]), context)
        session = _expect(http.post(f"{url}/v1/sessions", json={
            "challenge_id": body["challenge_id"], "proof": base64.b64encode(proof).decode()}), 201)
    return session.json()["session_token"]


def fetch(url: str, session: str, camera: str, from_ms: int = 0,
          to_ms: int = 2**62, verify: ssl.SSLContext | bool = True) -> httpx.Response:
    return httpx.get(f"{url}/v1/cameras/{camera}/recording",
                     params={"from_ms": from_ms, "to_ms": to_ms, "nonce": os.urandom(16).hex()},
                     headers={"Authorization": f"Bearer {session}"}, timeout=60, verify=verify)


@dataclass
class Played:
    plaintexts: list[SegmentPlaintext]
    skipped: list[SegmentSkipped]
    ended: bool

    @property
    def data(self) -> bytes:
        return b"".join(p.data for p in self.plaintexts)


def play(identity: Identity, stream: bytes, archiver_cert: x509.Certificate | None = None,
         chunk: int = 65536) -> Played:
    """Verify and decrypt a whole fusion stream (raises the reader's errors)."""
    def check(cert: x509.Certificate) -> None:
        assert archiver_cert is None or cert == archiver_cert

    reader = StreamReader(identity, check)
    played = Played([], [], False)
    for start in range(0, len(stream), chunk):
        for event in reader.feed(stream[start:start + chunk]):
            if isinstance(event, SegmentPlaintext):
                played.plaintexts.append(event)
            elif isinstance(event, SegmentSkipped):
                played.skipped.append(event)
            elif isinstance(event, StreamEnded):
                played.ended = True
    reader.finish()
    return played


def observed_secrets(identity: Identity, stream: bytes) -> set[bytes]:
    """Every secret a viewer learns from a stream: KEK0 of each epoch, each ratcheted KEK used,
    each chain state up to the last step used, and each minute key of a segment it got. The
    Archiver must have none of them at rest."""
    secrets: set[bytes] = set()
    ratchets: dict[bytes, KekRatchet] = {}
    chains: dict[bytes, tuple[bytes, ChainDeriver]] = {}
    viewer_fp = fingerprint(identity.certificate)
    for record, _raw in RecordSplitter().feed(stream):
        if isinstance(record, EpochOpener):
            kek0 = open_epoch_opener(identity, record)
            ratchets[record.epoch_id] = KekRatchet(record.epoch_id, kek0)
            secrets.add(kek0)
        elif isinstance(record, ChainRecord):
            kek = ratchets[record.epoch_id].kek_at(record.ratchet_index)
            secrets.add(kek)
            seed = unwrap_chain_record(kek, record, viewer_fp)
            chains[record.chain_id] = (seed, ChainDeriver(record, seed, 86_401))
        elif isinstance(record, Segment):
            chain_id, step = split_key_id(record.key_id)
            if chain_id in chains:
                state, deriver = chains[chain_id]
                secrets.add(deriver.key(step))
                for _ in range(step + 1):
                    secrets.add(state)
                    state = chain_step(state, chain_id)
    return secrets
