"""A minimal viewer's playback written against the protocol with keyservice only (independent
of the client package): fetch a recording, verify and decrypt it, and list every secret a viewer
learns from a stream. The login is fusion_testkit.viewer."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import httpx
from cryptography import x509

from keyservice.crypto import (
    ChainDeriver,
    KekRatchet,
    chain_step,
    open_epoch_opener,
    split_key_id,
    unwrap_chain_record,
)
from keyservice.format import ChainRecord, EpochOpener, Segment
from keyservice.framing import RecordSplitter
from keyservice.identity import Identity, fingerprint
from keyservice.reader import SegmentPlaintext, SegmentSkipped, StreamEnded, StreamReader


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
