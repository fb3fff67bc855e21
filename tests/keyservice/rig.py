"""A fusion stream built record by record for the reader's tests (test_stream, test_properties):
the Archiver's writer and a software viewer, one camera clock."""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyservice.crypto import (
    Epoch,
    KeyChain,
    PeriodKey,
    seal_segment,
)
from keyservice.errors import (
    ArchiverMismatch,
)
from keyservice.format import (
    DataStream,
    Header,
    Mode,
    Segment,
)
from keyservice.fusion_writer import ManifestChain, StreamWriter, issue_chain_recipients
from keyservice.identity import OaepHash, Recipient, SoftwareIdentity, fingerprint
from keyservice.reader import (
    StreamReader,
    StreamRequest,
)
from tests.vectors import generate as vectors

T = 1_748_779_200_000
CAM, CAM2 = "cam-1", "cam-2"


class Rig:
    """A minimal Archiver for one viewer, built from the public API."""

    def __init__(self, cameras: tuple[str, ...] = (CAM, CAM2), viewer: str = "viewer-a",
                 range_ms: tuple[int, int] = (T, T + 600_000)) -> None:
        self.signer = vectors.load_signer("archiver")
        base = vectors.load_identity(viewer)
        self.identity = SoftwareIdentity(base.certificate, base.private_key)
        self.recipient = Recipient(self.identity.certificate, OaepHash.SHA256)
        self.chains = {camera: ManifestChain(camera) for camera in cameras}
        self.keys: dict[tuple[str, DataStream], PeriodKey] = {}
        self.key_chains: dict[tuple[str, DataStream], KeyChain] = {}
        self.seq: dict[tuple[str, DataStream], int] = {}
        self.pending: dict[str, list[Segment]] = {camera: [] for camera in cameras}
        self.header = Header(self.signer.certificate.public_bytes(Encoding.DER),
                             fingerprint(self.identity.certificate), os.urandom(16), T,
                             Mode.PLAYBACK, *range_ms, cameras)
        self.writer = StreamWriter(self.header)
        self.chunks = [self.writer.start()]
        self.epoch: Epoch | None = None
        self.plaintexts: list[bytes] = []

    def new_epoch(self, now: int) -> None:
        self.epoch, opener = Epoch.start(self.recipient, 60, now)
        self.chunks.append(self.writer.add(opener))

    def rotate(self, camera: str, stream: DataStream, now: int, wrap: bool = True,
               grant: bool = True) -> PeriodKey:
        """A new key chain from now on, and its key of now. ``wrap``: a chain record for the
        viewer; otherwise (``grant``) the Archiver's signed chain recipients that do not list
        it, as the Archiver sends for a segment it withholds."""
        chain, seed = KeyChain.start(camera, stream, 60, now)
        self.key_chains[(camera, stream)] = chain
        key = self.keys[(camera, stream)] = chain.key_at(now)
        if not wrap and grant:
            for part in issue_chain_recipients(chain, [], self.signer):
                self.chunks.append(self.writer.add(part))
        if wrap:
            if self.epoch is None:
                self.new_epoch(now)
            assert self.epoch is not None
            self.chunks.append(self.writer.add(self.epoch.wrap_chain(chain, seed, now)))
        return key

    def step(self, camera: str, stream: DataStream, now: int) -> PeriodKey:
        """The next key of the current chain (no record: the viewer derives it)."""
        key = self.keys[(camera, stream)] = self.key_chains[(camera, stream)].key_at(now)
        return key

    def segment(self, camera: str, stream: DataStream, now: int, data: bytes | None = None,
                send: bool = True, last: bool = False) -> Segment:
        seq = self.seq.get((camera, stream), 0)
        self.seq[(camera, stream)] = seq + 1
        data = os.urandom(50 + seq) if data is None else data
        segment = seal_segment(self.keys[(camera, stream)], seq, now, data, int(last))
        self.pending[camera].append(segment)
        if send:
            self.chunks.append(self.writer.add(segment))
            self.plaintexts.append(data)
        return segment

    def manifest(self, camera: str, now: int) -> bytes:
        segments = self.pending[camera]
        _, data = self.chains[camera].issue(segments, list(self.keys.values()), self.signer, now)
        self.pending[camera] = []
        self.chunks.append(self.writer.add(data))
        return data

    def end(self) -> bytes:
        heads = [(camera, chain.next_seq) for camera, chain in self.chains.items()]
        self.chunks.append(self.writer.end(self.signer, 1, heads))
        return b"".join(self.chunks)

    def pin(self, cert: x509.Certificate) -> None:
        if fingerprint(cert) != fingerprint(self.signer.certificate):
            raise ArchiverMismatch("The Archiver's certificate is not the pinned one.")

    def request(self, from_ms: int, to_ms: int) -> StreamRequest:
        """A playback request this rig's stream answers (its header's nonce and cameras)."""
        return StreamRequest(self.header.request_nonce, self.header.cameras, Mode.PLAYBACK,
                             from_ms, to_ms)

    def reader(self, **kwargs: Any) -> StreamReader:
        return StreamReader(self.identity, self.pin, **kwargs)
