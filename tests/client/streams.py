"""Fusion streams built in-process with the real crypto core and software test keys, for the
player's unit tests (the end-to-end tests use a real Archiver and real tokens instead)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.certs import build_archiver_certificate, build_viewer_certificate
from keyservice.crypto import Epoch, KeyChain, seal_segment
from keyservice.format import DataStream, Header
from keyservice.fusion_writer import ManifestChain, StreamWriter, issue_chain_recipients
from keyservice.identity import (
    OaepHash,
    Recipient,
    SoftwareIdentity,
    SoftwareSigner,
    fingerprint,
)

T0 = 1_748_779_200_000  # 2025-06-01T12:00:00Z
PERIOD_S = 60


def software_viewer(name: str) -> SoftwareIdentity:
    key = rsa.generate_private_key(65537, 2048)
    cert = build_viewer_certificate(key, name, oaep_hash=OaepHash.SHA256,
                                    now=dt.datetime.now(dt.UTC))
    return SoftwareIdentity(cert, key)


def software_signer(name: str = "archiver") -> SoftwareSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return SoftwareSigner(build_archiver_certificate(key, name, now=dt.datetime.now(dt.UTC)), key)


@dataclass(frozen=True)
class Seg:
    capture_ms: int
    data: bytes
    authorized: bool = True
    duration_ms: int = 0


def build_stream(viewer: SoftwareIdentity, signer: SoftwareSigner, plan: list[Seg], *,
                 camera: str = "cam1", end: bool = True,
                 range_ms: tuple[int, int] = (T0, T0 + 3_600_000),
                 nonce: bytes = bytes(16)) -> tuple[bytes, list[int]]:
    """A playback stream as the Archiver serves it (one key chain per segment, as after an
    authorization change every time): a segment's chain record and ciphertext only when the
    viewer was authorized; the signed manifest always. Returns the bytes and the
    offset of each segment record actually sent (for tampering). ``range_ms`` and ``nonce``:
    the request the header answers."""
    writer = StreamWriter(Header(
        archiver_cert_der=signer.certificate.public_bytes(Encoding.DER),
        viewer_fingerprint=fingerprint(viewer.certificate), request_id=os.urandom(16),
        created_ms=T0, mode=1, range_from_ms=range_ms[0], range_to_ms=range_ms[1],
        cameras=(camera,), request_nonce=nonce))
    parts = [writer.start()]
    epoch, opener = Epoch.start(Recipient(viewer.certificate, OaepHash.SHA256), PERIOD_S, T0)
    opener_sent = False
    chain = ManifestChain(camera)
    offsets = []
    for seq, seg in enumerate(plan):
        key_chain, seed = KeyChain.start(camera, DataStream.VIDEO, PERIOD_S, seg.capture_ms)
        key = key_chain.key_at(seg.capture_ms)
        sealed = seal_segment(key, seq, seg.capture_ms, seg.data, duration_ms=seg.duration_ms)
        _manifest, manifest_bytes = chain.issue([sealed], [key], signer, seg.capture_ms)
        if not seg.authorized:  # the signed recipients show it was not authorized then
            parts += [writer.add(part) for part in issue_chain_recipients(key_chain, [], signer)]
        if seg.authorized:
            if not opener_sent:
                parts.append(writer.add(opener))
                opener_sent = True
            parts.append(writer.add(epoch.wrap_chain(key_chain, seed, seg.capture_ms)))
            offsets.append(sum(map(len, parts)))
            parts.append(writer.add(sealed))
        parts.append(writer.add(manifest_bytes))
    if end:
        parts.append(writer.end(signer, 1))
    return b"".join(parts), offsets
