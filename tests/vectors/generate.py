"""Deterministic generator of the fusion stream v2 test vectors.

    python tests/vectors/generate.py            # (re)write tests/vectors/v2/*.json and
                                                # tests/vectors/chains/derivation.json
    python tests/vectors/generate.py --check    # exit 1 unless the files are reproduced exactly
    python tests/vectors/generate.py --new-keys # replace the TEST-ONLY keys (changes every vector)

Everything is fixed: the keys (``keys/TEST-ONLY-*.pem``, test data only, never use them for
anything else), the clock, and the randomness (SHAKE-256 of a fixed seed and a counter). RSA-OAEP
padding is computed here from that randomness (``SeededRecipient``: RFC 8017 EME-OAEP + raw RSA)
and ECDSA signatures are deterministic (RFC 6979), so each run produces the same bytes. The
Archiver side uses the real ``keyservice`` code: the vectors are what the Archiver really emits.

Each vector names the ``request`` the reader is answering (nonce, cameras, mode, range, and for
live the viewer's clock and allowed skew) and states what a reader must do: ``success`` (with the
events and the SHA-256 of the concatenated plaintexts), ``format failure``, ``integrity
failure``, ``no matching identity`` or ``request mismatch``,
and where (``fails_at``: ``"prefix"``, a record index counted from 0 = the header, or
``"finish"`` when only the end of the input reveals it). The expectation is written here from
the scenario, not obtained by running the reader.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parents[1]))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from keyservice.crypto import (  # noqa: E402
    Epoch,
    KeyChain,
    PeriodKey,
    open_epoch_opener,
    seal_segment,
    split_key_id,
)
from keyservice.format import (  # noqa: E402
    MANIFEST_LAST,
    MAX_SEGMENT_BODY,
    MAX_SMALL_BODY,
    SEGMENT_LAST,
    ChainRecipients,
    DataStream,
    EndReason,
    Header,
    Mode,
    RecordType,
    Segment,
    decode_record,
    encode_record,
    stream_prefix,
)
from keyservice.fusion_writer import (  # noqa: E402
    ManifestChain,
    StreamWriter,
    issue_chain_join,
    issue_chain_recipients,
)
from keyservice.identity import (  # noqa: E402
    SoftwareEcIdentity,
    SoftwareIdentity,
    SoftwareSigner,
    fingerprint,
)
from keyservice.keyscheme import KeyScheme, Recipient  # noqa: E402

KEYS_DIR = HERE / "keys"
VECTORS_DIR = HERE / "v2"
CHAIN_VECTORS = HERE / "chains" / "derivation.json"
T0 = 1_748_779_200_000  # 2025-06-01T12:00:00Z
PERIOD_S = 60
LOBBY, GATE = "cam-lobby", "cam-gate"

SUCCESS = "success"
FORMAT = "format failure"
INTEGRITY = "integrity failure"
NO_MATCH = "no matching identity"
MISMATCH = "request mismatch"
INCOMPLETE = "range incomplete"
SKEW_MS = 30_000

KEY_FILES = {
    # name: (kind, subject)
    "viewer-a": ("rsa", "TEST ONLY viewer A (fusion stream test vectors)"),
    "viewer-b": ("rsa", "TEST ONLY viewer B (fusion stream test vectors)"),
    "archiver": ("ec", "TEST ONLY Archiver (fusion stream test vectors)"),
    "rogue": ("ec", "TEST ONLY rogue signer (fusion stream test vectors)"),
    "viewer-c": ("ec", "TEST ONLY EC P-256 viewer C (fusion stream test vectors)"),
}


# --- fixed keys, randomness and deterministic RSA-OAEP / ECDSA ----------------------------
def key_path(name: str) -> Path:
    kind = "rsa2048" if KEY_FILES[name][0] == "rsa" else "p256"
    return KEYS_DIR / f"TEST-ONLY-{name}-{kind}.key.pem"


def cert_path(name: str) -> Path:
    return KEYS_DIR / f"TEST-ONLY-{name}.cert.pem"


def make_keys(only: tuple[str, ...] = ()) -> None:
    """New TEST-ONLY keys and self-signed certificates (not deterministic: run rarely).
    ``only``: just these (e.g. a key added later), leaving the others and their vectors as
    they are."""
    KEYS_DIR.mkdir(exist_ok=True)
    for name, (kind, subject) in KEY_FILES.items():
        if only and name not in only:
            continue
        key: Any = (rsa.generate_private_key(65537, 2048) if kind == "rsa"
                    else ec.generate_private_key(ec.SECP256R1()))
        subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        cert = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(subject_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
                .not_valid_after(dt.datetime(2125, 1, 1, tzinfo=dt.UTC))
                .sign(key, hashes.SHA256()))
        key_path(name).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        cert_path(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_path(name).read_bytes())


def load_identity(name: str) -> SoftwareIdentity | SoftwareEcIdentity:
    key = serialization.load_pem_private_key(key_path(name).read_bytes(), None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return SoftwareEcIdentity(load_cert(name), key)
    assert isinstance(key, rsa.RSAPrivateKey)
    return SoftwareIdentity(load_cert(name), key)


class FixedRng:
    """rng(n): SHAKE-256(seed || counter). Deterministic stand-in for os.urandom."""

    def __init__(self, seed: str) -> None:
        self._seed = seed.encode()
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + struct.pack(">Q", self._counter)).digest(n)


def _mgf1(seed: bytes, length: int, hash_fn: Callable[[bytes], Any]) -> bytes:
    out = b"".join(hash_fn(seed + struct.pack(">I", i)).digest()
                   for i in range(-(-length // hash_fn(b"").digest_size)))
    return out[:length]


@dataclass(frozen=True)
class SeededRecipient(Recipient):
    """A Recipient whose OAEP seed comes from ``rng`` (RFC 8017, 7.1.1), under ``wrap``. TEST
    ONLY: production uses ``Recipient.encrypt`` (OpenSSL). The viewer side decrypts with OpenSSL, so every
    vector also cross-checks this encoding."""

    rng: Callable[[int], bytes] = field(default=FixedRng("unused"), compare=False, repr=False)

    def encrypt(self, plaintext: bytes) -> bytes:
        public = self.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        numbers = public.public_numbers()
        k = (numbers.n.bit_length() + 7) // 8
        hash_fn = hashlib.sha1 if self.scheme is KeyScheme.RSA_OAEP_SHA1 else hashlib.sha256
        h_len = hash_fn(b"").digest_size
        db = (hash_fn(b"").digest() + bytes(k - len(plaintext) - 2 * h_len - 2) + b"\x01"
              + plaintext)
        seed = self.rng(h_len)
        masked_db = bytes(a ^ b for a, b in zip(db, _mgf1(seed, k - h_len - 1, hash_fn),
                                                strict=True))
        masked_seed = bytes(a ^ b for a, b in zip(seed, _mgf1(masked_db, h_len, hash_fn),
                                                  strict=True))
        em = int.from_bytes(b"\x00" + masked_seed + masked_db, "big")
        return pow(em, numbers.e, numbers.n).to_bytes(k, "big")


@dataclass
class DeterministicSigner(SoftwareSigner):
    """ECDSA with RFC 6979 nonces, so signatures are reproducible. TEST ONLY."""

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def load_signer(name: str) -> DeterministicSigner:
    key = serialization.load_pem_private_key(key_path(name).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return DeterministicSigner(load_cert(name), key)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- a small simulated Archiver, using the real keyservice code ---------------------------
@dataclass
class ArchivedSegment:
    segment: Segment
    data: bytes  # encoded record
    plaintext: bytes


@dataclass
class ArchivedManifest:
    camera: str
    segments: list[ArchivedSegment]
    data: bytes


@dataclass
class Viewer:
    name: str
    recipient: SeededRecipient
    cameras: set[str]
    epoch: Epoch | None = None
    openers: dict[bytes, bytes] = field(default_factory=dict)  # epoch id -> opener record
    chain_records: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)  # chain id ->
    kek0: dict[str, str] = field(default_factory=dict)  # hex epoch id -> hex KEK0 (intermediates)


def plaintext_for(camera: str, stream: DataStream, seq: int, capture_ms: int) -> bytes:
    text = f"{camera}/{stream.name.lower()}/seq={seq}/t={capture_ms}|".encode()
    filler = hashlib.sha256(text).digest()
    return text + filler[: seq % 17]


class SimArchiver:
    def __init__(self, signer: DeterministicSigner, rng: FixedRng) -> None:
        self.signer = signer
        self.rng = rng
        self.chains = {LOBBY: ManifestChain(LOBBY), GATE: ManifestChain(GATE)}
        self.next_seq: dict[tuple[str, DataStream], int] = {}
        self.keys: dict[tuple[str, DataStream], PeriodKey] = {}
        self.key_chains: dict[tuple[str, DataStream], KeyChain] = {}
        self.chain_seeds: dict[str, str] = {}  # hex chain id -> hex S_0 (intermediates)
        self.viewers: list[Viewer] = []
        self.manifests: list[ArchivedManifest] = []
        self.pending: dict[str, list[ArchivedSegment]] = {LOBBY: [], GATE: []}
        self.minute_keys: dict[str, str] = {}  # hex key id -> hex key (intermediates)
        # chain id -> its signed recipients (parts; who its state was wrapped for)
        self.grants: dict[bytes, list[bytes]] = {}
        self.join_states: dict[str, str] = {}  # "chain id/step" -> hex S_step of a join record

    def rotate(self, camera: str, stream: DataStream, now: int, new_chain: bool = False) -> None:
        """The key of now's period: the next step of the stream's chain, or (first use,
        ``new_chain``: an authorization change on the camera) a new chain wrapped for its
        viewers."""
        chain = self.key_chains.get((camera, stream))
        if chain is None or new_chain:
            chain, seed = KeyChain.start(camera, stream, PERIOD_S, now, self.rng)
            self.key_chains[(camera, stream)] = chain
            self.chain_seeds[chain.chain_id.hex()] = seed.hex()
            self._wrap(chain, seed, now)
        key = chain.key_at(now)
        self.keys[(camera, stream)] = key
        self.minute_keys[key.key_id.hex()] = key.key.hex()

    def _wrap(self, chain: KeyChain, seed: bytes, now: int) -> None:
        camera = chain.camera
        for viewer in self.viewers:
            if camera not in viewer.cameras:
                continue
            if viewer.epoch is None:
                viewer.epoch, opener = Epoch.start(viewer.recipient, PERIOD_S, now, self.rng)
                viewer.openers[opener.epoch_id] = encode_record(opener)
                # The KEK0 is recovered by the test identity, for the intermediates only.
                kek0 = open_epoch_opener(load_identity(viewer.name), opener)
                viewer.kek0[opener.epoch_id.hex()] = kek0.hex()
            record = viewer.epoch.wrap_chain(chain, seed, now, self.rng)
            viewer.chain_records[chain.chain_id] = (viewer.epoch.epoch_id, encode_record(record))
        wrapped_for = [fingerprint(v.recipient.certificate) for v in self.viewers
                       if chain.chain_id in v.chain_records]
        self.grants[chain.chain_id] = issue_chain_recipients(chain, wrapped_for, self.signer)

    def join(self, viewer: Viewer, camera: str, stream: DataStream, now: int) -> int:
        """Issue 23: ``viewer``, authorized on ``camera`` at ``now`` while its chain runs, gets
        the chain's state from the first step that has sealed nothing yet (a join record) and
        is named in a signed join statement, the chain's next statement. Returns the step."""
        chain = self.key_chains[(camera, stream)]
        step = chain.join_step_at(now)
        viewer.cameras.add(camera)
        if viewer.epoch is None:
            viewer.epoch, opener = Epoch.start(viewer.recipient, PERIOD_S, now, self.rng)
            viewer.openers[opener.epoch_id] = encode_record(opener)
            kek0 = open_epoch_opener(load_identity(viewer.name), opener)
            viewer.kek0[opener.epoch_id.hex()] = kek0.hex()
        state = chain.state_at(step)
        self.join_states[f"{chain.chain_id.hex()}/{step}"] = state.hex()
        record = viewer.epoch.wrap_chain(chain, state, now, self.rng, first_step=step)
        viewer.chain_records[chain.chain_id] = (viewer.epoch.epoch_id, encode_record(record))
        statements = self.grants[chain.chain_id]
        parts = decode_record(statements[0]).parts  # type: ignore[union-attr]
        statements.append(issue_chain_join(chain, len(statements), parts, step,
                                           [fingerprint(viewer.recipient.certificate)],
                                           self.signer))
        return step

    def ingest(self, camera: str, stream: DataStream, now: int, last: bool = False) -> None:
        seq = self.next_seq.get((camera, stream), 0)
        self.next_seq[(camera, stream)] = seq + 1
        plaintext = plaintext_for(camera, stream, seq, now)
        segment = seal_segment(self.keys[(camera, stream)], seq, now, plaintext,
                               SEGMENT_LAST if last else 0)
        self.pending[camera].append(ArchivedSegment(segment, encode_record(segment), plaintext))

    def manifest(self, camera: str, now: int, last: bool = False) -> None:
        segments = self.pending[camera]
        keys = list({id(k): k for k in (self.keys[(camera, s.segment.stream)]
                                        for s in segments)}.values())
        _, data = self.chains[camera].issue([s.segment for s in segments], keys, self.signer,
                                            now, MANIFEST_LAST if last else 0)
        self.manifests.append(ArchivedManifest(camera, segments, data))
        self.pending[camera] = []


def run_archiver(signer: DeterministicSigner, seed: str) -> tuple[SimArchiver, Viewer, Viewer]:
    """Three minutes of two cameras. cam-lobby has video, audio and metadata, cam-gate video.
    Viewer A (SHA-256 OAEP) is authorized on cam-lobby, and on cam-gate from minute 2 on
    (which ends its first epoch and starts a new key chain on cam-gate); viewer B (SHA-1 OAEP)
    on both cameras throughout. Every data stream's chain starts at minute 0; cam-lobby's
    chains go on for the three minutes."""
    rng = FixedRng(seed)
    sim = SimArchiver(signer, rng)
    viewer_a = Viewer("viewer-a", SeededRecipient(load_cert("viewer-a"), KeyScheme.RSA_OAEP_SHA256, rng),
                      {LOBBY})
    viewer_b = Viewer("viewer-b", SeededRecipient(load_cert("viewer-b"), KeyScheme.RSA_OAEP_SHA1, rng),
                      {LOBBY, GATE})
    sim.viewers = [viewer_a, viewer_b]
    streams = [(LOBBY, DataStream.VIDEO), (LOBBY, DataStream.AUDIO),
               (LOBBY, DataStream.METADATA), (GATE, DataStream.VIDEO)]
    for minute in range(3):
        t = T0 + minute * 60_000
        if minute == 2:
            viewer_a.cameras.add(GATE)
            viewer_a.epoch = None  # an authorization change ends the viewer's epoch
        for camera, stream in streams:
            sim.rotate(camera, stream, t + 5, new_chain=minute == 2 and camera == GATE)
        final = minute == 2
        sim.ingest(LOBBY, DataStream.VIDEO, t + 1_000)
        sim.ingest(LOBBY, DataStream.AUDIO, t + 2_000)
        sim.ingest(LOBBY, DataStream.METADATA, t + 3_000)
        sim.manifest(LOBBY, t + 3_500)
        sim.ingest(GATE, DataStream.VIDEO, t + 10_000)
        sim.manifest(GATE, t + 10_500)
        sim.ingest(LOBBY, DataStream.VIDEO, t + 31_000)
        sim.ingest(LOBBY, DataStream.AUDIO, t + 32_000)
        sim.manifest(LOBBY, t + 32_500)
        sim.ingest(GATE, DataStream.VIDEO, t + 40_000, last=final)
        sim.manifest(GATE, t + 40_500, last=final)
        sim.ingest(LOBBY, DataStream.VIDEO, t + 51_000, last=final)
        sim.manifest(LOBBY, t + 51_500, last=final)
    return sim, viewer_a, viewer_b


def run_ec_archiver(signer: DeterministicSigner, seed: str) -> tuple[SimArchiver, Viewer]:
    """Two minutes of cam-lobby video for viewer C, an EC P-256 viewer (ECDH epoch opener).
    A simulation of its own, so the RSA vectors above stay byte for byte as they were."""
    rng = FixedRng(seed)
    sim = SimArchiver(signer, rng)
    viewer_c = Viewer("viewer-c", SeededRecipient(load_cert("viewer-c"), KeyScheme.ECDH_P256,
                                                  rng), {LOBBY})
    sim.viewers = [viewer_c]
    for minute in range(2):
        t = T0 + minute * 60_000
        final = minute == 1
        sim.rotate(LOBBY, DataStream.VIDEO, t + 5)
        sim.ingest(LOBBY, DataStream.VIDEO, t + 1_000)
        sim.ingest(LOBBY, DataStream.VIDEO, t + 31_000, last=final)
        sim.manifest(LOBBY, t + 31_500, last=final)
    return sim, viewer_c


def run_join_archiver(signer: DeterministicSigner, seed: str) -> tuple[SimArchiver, Viewer]:
    """Issue 23: three minutes of cam-lobby video. Viewer B holds the chain from its start;
    viewer A is authorized at minute 1 + 20 s, after minute 1's first segment was sealed: it
    joins the running chain from step 2 (nothing restarts, B's record is the only other one).
    A simulation of its own, so the vectors above stay byte for byte as they were."""
    rng = FixedRng(seed)
    sim = SimArchiver(signer, rng)
    viewer_a = Viewer("viewer-a", SeededRecipient(load_cert("viewer-a"),
                                                  KeyScheme.RSA_OAEP_SHA256, rng), set())
    viewer_b = Viewer("viewer-b", SeededRecipient(load_cert("viewer-b"),
                                                  KeyScheme.RSA_OAEP_SHA1, rng), {LOBBY})
    sim.viewers = [viewer_a, viewer_b]
    for minute in range(3):
        t = T0 + minute * 60_000
        final = minute == 2
        sim.rotate(LOBBY, DataStream.VIDEO, t + 5)
        sim.ingest(LOBBY, DataStream.VIDEO, t + 1_000)
        sim.manifest(LOBBY, t + 1_500)
        if minute == 1:
            assert sim.join(viewer_a, LOBBY, DataStream.VIDEO, t + 20_000) == 2
        sim.ingest(LOBBY, DataStream.VIDEO, t + 31_000, last=final)
        sim.manifest(LOBBY, t + 31_500, last=final)
    return sim, viewer_a


# --- assembling a viewer's fusion stream (as the Archiver serves it) ----------------------
@dataclass
class Built:
    """A stream as a list of records (index 0 = header), plus what a reader must emit."""

    records: list[bytes]
    events: list[dict[str, Any]]
    plaintext: bytes
    # record index -> key id / epoch id / camera, to aim mutations
    notes: list[dict[str, Any]] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)  # the request this stream answers

    def stream(self) -> bytes:
        return stream_prefix() + b"".join(self.records)


def assemble(sim: SimArchiver, viewer: Viewer, cameras: tuple[str, ...], mode: Mode,
             manifests: list[ArchivedManifest], rng: FixedRng, *, header_cert: bytes | None = None,
             end_signer: DeterministicSigner | None = None, created_ms: int = T0 + 200_000,
             range_ms: tuple[int, int] = (T0, T0 + 180_000), withhold: frozenset[bytes] = frozenset(),
             without_grants: bool = False,
             grant_override: dict[bytes, list[bytes]] | None = None,
             bare: tuple[ArchivedManifest, ...] = (),
             heads: dict[str, int] | None = None) -> Built:
    """``withhold``: chain ids whose chain records (and segments) are not sent although the
    viewer has them (as an Archiver whose index lost them); ``without_grants``: send no chain
    recipients; ``grant_override``: send these recipients parts instead of the genuine ones;
    ``bare``: manifests sent without their segments (the edges of a playback range); ``heads``:
    the chain heads
    END states (default: each camera's, for playback)."""
    request_id, nonce = rng(16), rng(16)
    header = Header(header_cert or der(sim.signer.certificate),
                    fingerprint(viewer.recipient.certificate), request_id, created_ms, mode,
                    *range_ms, cameras, request_nonce=nonce)
    writer = StreamWriter(header)
    start = writer.start()
    records = [start[len(stream_prefix()):]]
    notes: list[dict[str, Any]] = [{"kind": "header"}]
    events: list[dict[str, Any]] = []
    plaintext = bytearray()
    sent_epochs: set[bytes] = set()
    sent_keys: set[bytes] = set()
    sent_grants: set[bytes] = set()
    viewer_fp = fingerprint(viewer.recipient.certificate)
    for manifest in manifests:
        if any(manifest is b for b in bare):
            records.append(writer.add(manifest.data))
            notes.append({"kind": "edge", "camera": manifest.camera})
            continue
        for archived in manifest.segments:
            segment = archived.segment
            chain_id = split_key_id(segment.key_id)[0]
            found = viewer.chain_records.get(chain_id)
            step = split_key_id(segment.key_id)[1]
            # A join record (issue 23) opens its chain from its first step only.
            first_step = (0 if found is None
                          else decode_record(found[1]).first_step)  # type: ignore[union-attr]
            if found is None or chain_id in withhold or step < first_step:
                # Only the manifest is sent, with the chain's signed recipients: "skipped"
                # (withheld, not authorized) only if no part lists this viewer.
                grant = (grant_override or {}).get(chain_id, sim.grants[chain_id])
                if not without_grants and chain_id not in sent_grants:
                    for part in grant:
                        records.append(writer.add(part))
                        notes.append({"kind": "grant", "chain_id": chain_id})
                    sent_grants.add(chain_id)
                listed = any(viewer_fp in part.viewers and part.join_step <= step
                             for part in map(decode_record, grant)
                             if isinstance(part, ChainRecipients))
                kind = "missing" if without_grants or listed else "skipped"
                events.append({"event": kind, "camera": segment.camera,
                               "stream": segment.stream.name.lower(), "seq": segment.seq,
                               "capture_ms": segment.capture_ms})
                continue
            epoch_id, chain_record = found
            if first_step and chain_id not in sent_grants and not without_grants:
                # Its signed join statement goes first: the reader needs it for the record.
                for part in (grant_override or {}).get(chain_id, sim.grants[chain_id]):
                    records.append(writer.add(part))
                    notes.append({"kind": "grant", "chain_id": chain_id})
                sent_grants.add(chain_id)
            if epoch_id not in sent_epochs:
                records.append(writer.add(viewer.openers[epoch_id]))
                notes.append({"kind": "opener", "epoch_id": epoch_id})
                sent_epochs.add(epoch_id)
            if chain_id not in sent_keys:
                records.append(writer.add(chain_record))
                notes.append({"kind": "chain", "chain_id": chain_id, "epoch_id": epoch_id})
                sent_keys.add(chain_id)
            records.append(writer.add(archived.data))
            notes.append({"kind": "segment", "camera": segment.camera, "segment": segment})
            events.append({"event": "segment", "camera": segment.camera,
                           "stream": segment.stream.name.lower(), "seq": segment.seq,
                           "capture_ms": segment.capture_ms, "last": segment.last,
                           "sha256": hashlib.sha256(archived.plaintext).hexdigest()})
            plaintext += archived.plaintext
        records.append(writer.add(manifest.data))
        notes.append({"kind": "manifest", "camera": manifest.camera})
    reason = EndReason.LIVE_ENDED if mode == Mode.LIVE else EndReason.RANGE_COMPLETE
    if heads is None:  # live too: END proves the stream's end (docs/spec: live edges)
        heads = {camera: sim.chains[camera].next_seq for camera in cameras}
    records.append(writer.end(end_signer or sim.signer, reason, sorted(heads.items())))
    notes.append({"kind": "end"})
    events.append({"event": "end", "reason": int(reason)})
    if mode == Mode.LIVE:  # from the viewer's clock when asking (the header's range), read 45 s later
        request = request_json(nonce, cameras, mode, *range_ms, created_ms + 45_000)
    else:
        request = request_json(nonce, cameras, mode, *range_ms)
    return Built(records, events, bytes(plaintext), notes, request)


def request_json(nonce: bytes, cameras: tuple[str, ...], mode: Mode, from_ms: int, to_ms: int,
                 clock_ms: int | None = None) -> dict[str, Any]:
    """The viewer's request, as the vector states it (live: its clock when reading)."""
    doc: dict[str, Any] = {"nonce": nonce.hex(), "cameras": list(cameras),
                           "mode": "live" if mode == Mode.LIVE else "playback",
                           "from_ms": from_ms, "to_ms": to_ms}
    if clock_ms is not None:
        doc.update(clock_ms=clock_ms, max_skew_ms=SKEW_MS)
    return doc


# --- record-level surgery -----------------------------------------------------------------
def flip(record: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(record)
    out[offset] ^= 1 << bit
    return bytes(out)


def reencode(record: bytes, **changes: Any) -> bytes:
    return encode_record(replace(decode_record(record), **changes))


def indices(built: Built, kind: str, **match: Any) -> list[int]:
    return [i for i, note in enumerate(built.notes)
            if note["kind"] == kind and all(note.get(k) == v for k, v in match.items())]


def header_field_offset(record: bytes, field_name: str) -> int:
    cert_len = struct.unpack_from(">H", record, 5)[0]
    base = 5 + 2 + cert_len
    return {"cert_last": base - 1, "viewer_fingerprint": base, "request_id": base + 32}[
        field_name]


def transcript_intermediates(records: list[bytes]) -> dict[str, Any]:
    """The END record's transcript, step by step, computed here from the spec's rule (not by
    the keyservice code): SHA-256 of the label, the prefix and each record's SHA-256."""
    digests = [hashlib.sha256(record).digest() for record in records[:-1]]  # all but END
    transcript = hashlib.sha256(b"FSE1 transcript\x00" + stream_prefix() + b"".join(digests))
    end = decode_record(records[-1])
    assert end.transcript_hash == transcript.digest()  # type: ignore[union-attr]
    return {"record_sha256": [d.hex() for d in digests],
            "transcript_hash": transcript.hexdigest()}


# --- the vectors --------------------------------------------------------------------------
@dataclass
class Vector:
    name: str
    description: str
    expect: str
    stream: bytes
    fails_at: str | int | None = None
    viewer: str = "viewer-a"
    archiver: str = "archiver"
    built: Built | None = None
    intermediates: dict[str, Any] | None = None
    request: dict[str, Any] | None = None  # default: the request of the good stream

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "format": "fusion stream v2 (docs/spec/fusion-stream-v2.md)",
            "viewer": self.viewer,
            "archiver_pin": self.archiver,
            "request": self.request,
            "expect": self.expect,
        }
        if self.expect == SUCCESS:
            assert self.built is not None
            doc["plaintext_sha256"] = hashlib.sha256(self.built.plaintext).hexdigest()
            doc["token_operations"] = len({n["epoch_id"] for n in self.built.notes
                                           if n["kind"] == "opener"})
            doc["events"] = self.built.events
        else:
            doc["fails_at"] = self.fails_at
        if self.intermediates is not None:
            doc["intermediates"] = self.intermediates
        doc["stream_length"] = len(self.stream)
        doc["stream_hex"] = [chunk.hex() for chunk in frame(self.stream)]
        lines = []
        for key, value in doc.items():
            if key in ("events", "stream_hex"):  # one event / one record per line
                inner = ",\n".join(f"  {json.dumps(item)}" for item in value)
                lines.append(f" {json.dumps(key)}: [\n{inner}\n ]")
            else:
                text = json.dumps(value, indent=1).replace("\n", "\n ")
                lines.append(f" {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"


def frame(stream: bytes) -> list[bytes]:
    """Cut a (possibly malformed) stream for display: the 10-byte prefix, then one chunk per
    record as its length field says (the rest of the bytes if that runs past the end)."""
    chunks = [stream[:10]]
    pos = 10
    while pos < len(stream):
        length = struct.unpack(">I", stream[pos + 1:pos + 5].rjust(4, b"\0"))[0] \
            if pos + 5 <= len(stream) else 0
        end = min(len(stream), pos + 5 + length)
        chunks.append(stream[pos:end])
        pos = end
    return chunks


def vectors() -> Iterator[Vector]:
    signer = load_signer("archiver")
    rogue = load_signer("rogue")
    sim, viewer_a, viewer_b = run_archiver(signer, "fusion stream v2 vectors")
    prefix = stream_prefix()

    good = assemble(sim, viewer_a, (LOBBY, GATE), Mode.PLAYBACK, sim.manifests,
                    FixedRng("stream of viewer A"))

    def V(*args: Any, **kwargs: Any) -> Vector:  # a Vector read against good's request
        kwargs.setdefault("request", good.request)
        return Vector(*args, **kwargs)
    recs = good.records
    n_end = len(recs) - 1

    def variant(records: list[bytes]) -> bytes:
        return prefix + b"".join(records)

    def with_record(i: int, new: bytes) -> bytes:
        return variant([*recs[:i], new, *recs[i + 1:]])

    def without(*drop: int) -> bytes:
        return variant([r for i, r in enumerate(recs) if i not in drop])

    def next_manifest(after: int, camera: str) -> int:
        return next(i for i in indices(good, "manifest", camera=camera) if i > after)

    def first_use(chain_id: bytes) -> int:
        seg = next(i for i in indices(good, "segment")
                   if split_key_id(good.notes[i]["segment"].key_id)[0] == chain_id)
        return next_manifest(seg, good.notes[seg]["camera"])

    yield V(
        "good-multi-minute-multi-stream",
        "Three minutes of two cameras (cam-lobby: video, audio, metadata; cam-gate: video) "
        "for viewer A, two epochs (an authorization change at minute 2, which starts a new key "
        "chain on cam-gate). One chain record per chain: the cam-lobby chains run the three "
        "minutes (their minute keys derived by the reader). cam-gate segments of minutes 0-1 "
        "were recorded before viewer A was authorized there: the manifests list them, the "
        "segments are not sent, and the reader reports them as skipped.",
        SUCCESS, good.stream(), built=good,
        intermediates={"rng": "SHAKE-256(seed || counter u64), seed 'fusion stream v2 "
                              "vectors' (Archiver) and 'stream of viewer A' (header)",
                       "kek0_by_epoch_id": viewer_a.kek0,
                       "chain_seeds_by_chain_id": sim.chain_seeds,
                       "minute_keys_by_key_id": sim.minute_keys,
                       "transcript": transcript_intermediates(recs)})

    gate_live = [m for m in sim.manifests if m.camera == GATE][-3:]
    live_b = assemble(sim, viewer_b, (GATE,), Mode.LIVE, gate_live, FixedRng("live of B"),
                      created_ms=T0 + 125_400, range_ms=(T0 + 125_200, T0 + 185_200),
                      bare=(gate_live[0],))
    yield V(
        "good-live-sha1-oaep-joined-midway",
        "A live stream for viewer B (RSA-OAEP with SHA-1, as SoftHSM needs) that joins "
        "cam-gate's manifest chain midway: the manifest before the live start (sequence 3) "
        "bare as its opening edge, then sequences 4 and 5; it ends with reason 2 (live ended) "
        "and END states the chain head (6).",
        SUCCESS, live_b.stream(), viewer="viewer-b", built=live_b, request=live_b.request)

    lobby = [m for m in sim.manifests if m.camera == LOBBY]
    around = (lobby[2], lobby[3])  # minute 0's last and minute 1's first cam-lobby manifests
    empty = assemble(sim, viewer_a, (LOBBY,), Mode.PLAYBACK, list(around), FixedRng("empty"),
                     range_ms=(T0 + 52_000, T0 + 60_000), bare=around)
    yield V("good-empty-range", "Nothing recorded in the range: the two cam-lobby manifests "
            "around it, sent bare, link to each other, which proves it; then the signed end "
            "record.", SUCCESS, empty.stream(), built=empty, request=empty.request)
    minute1 = [m for m in sim.manifests if T0 + 60_000 <= m.segments[0].segment.capture_ms
               < T0 + 120_000]
    gate = [m for m in sim.manifests if m.camera == GATE]
    edges = (lobby[2], lobby[6], gate[1], gate[4])  # just before and after minute 1
    in_order = [m for m in sim.manifests if m in minute1 or any(m is e for e in edges)]
    edged = assemble(sim, viewer_b, (LOBBY, GATE), Mode.PLAYBACK, in_order,
                     FixedRng("minute 1 of B"), range_ms=(T0 + 60_000, T0 + 119_999), bare=edges)
    yield V("good-range-with-edges", "Minute 1 of both cameras for viewer B: each camera's "
            "manifests in the range, with the manifest just before and just after the range "
            "sent bare, so the reader can tell that nothing at either edge was left out.",
            SUCCESS, edged.stream(), viewer="viewer-b", built=edged, request=edged.request)
    no_start = assemble(sim, viewer_b, (LOBBY, GATE), Mode.PLAYBACK,
                        [m for m in in_order if m is not lobby[2]], FixedRng("minute 1 of B"),
                        range_ms=(T0 + 60_000, T0 + 119_999), bare=edges)
    yield V("range-start-unproven", "Minute 1 without cam-lobby's manifest just before the "
            "range (as from an index whose rows for the range's first minutes were deleted): "
            "nothing shows the stream starts at the range's beginning.", INCOMPLETE,
            no_start.stream(), len(no_start.records) - 1, viewer="viewer-b",
            request=no_start.request)
    no_end = assemble(sim, viewer_b, (LOBBY, GATE), Mode.PLAYBACK,
                      [m for m in in_order if m is not gate[4]], FixedRng("minute 1 of B"),
                      range_ms=(T0 + 60_000, T0 + 119_999), bare=edges)
    yield V("range-end-unproven", "Minute 1 without cam-gate's manifest just after the range, "
            "while the end record names a later chain head: the range's end may be missing.",
            INCOMPLETE, no_end.stream(), len(no_end.records) - 1, viewer="viewer-b",
            request=no_end.request)
    # Live streams prove their edges as recorded ranges do (issue 19).
    live_no_start = assemble(sim, viewer_b, (GATE,), Mode.LIVE, gate_live[1:],
                             FixedRng("live of B"), created_ms=T0 + 125_400,
                             range_ms=(T0 + 125_200, T0 + 185_200))
    yield V("live-start-unproven", "A live stream that joins cam-gate's chain midway without "
            "the bare manifest just before the live start (as from an Archiver that skipped "
            "the first segments after it): nothing shows that nothing was left out at the "
            "start.", INCOMPLETE, live_no_start.stream(), len(live_no_start.records) - 1,
            viewer="viewer-b", request=live_no_start.request)
    live_no_end = assemble(sim, viewer_b, (GATE,), Mode.LIVE, gate_live[:2],
                           FixedRng("live of B"), created_ms=T0 + 125_400,
                           range_ms=(T0 + 125_200, T0 + 185_200), bare=(gate_live[0],))
    yield V("live-end-unproven", "A live stream without cam-gate's last manifest, while the "
            "end record names a later chain head: its end may be missing.", INCOMPLETE,
            live_no_end.stream(), len(live_no_end.records) - 1, viewer="viewer-b",
            request=live_no_end.request)

    # --- one bit flipped in each record type ----------------------------------------------
    yield V("flip-header-request-id", "A bit of the header's request id flipped: the "
                 "signed end record names the original request.", INTEGRITY,
                 with_record(0, flip(recs[0], header_field_offset(recs[0], "request_id"))), n_end)
    yield V("flip-header-viewer-fingerprint", "A bit of the header's viewer fingerprint "
                 "flipped: the stream is no longer addressed to viewer A.", NO_MATCH,
                 with_record(0, flip(recs[0], header_field_offset(recs[0], "viewer_fingerprint"))),
                 0)
    yield V("flip-header-archiver-certificate", "A bit of the Archiver certificate's "
                 "signature flipped (still valid DER): it is not the pinned certificate.",
                 INTEGRITY,
                 with_record(0, flip(recs[0], header_field_offset(recs[0], "cert_last"))), 0)
    opener_1 = indices(good, "opener")[0]
    epoch_1 = good.notes[opener_1]["epoch_id"]
    first_key_of_epoch_1 = next(good.notes[i]["chain_id"]
                                for i in indices(good, "chain", epoch_id=epoch_1))
    yield V("flip-epoch-opener", "A bit of the first epoch opener's RSA ciphertext "
                 "flipped: it fails when first needed, at the first manifest whose segments "
                 "use a key of that epoch.", INTEGRITY,
                 with_record(opener_1, flip(recs[opener_1], len(recs[opener_1]) - 7)),
                 first_use(first_key_of_epoch_1))
    key_3 = indices(good, "chain")[3]
    yield V("flip-chain-record", "A bit of a wrapped chain state flipped: its unwrapping "
                 "fails at the first manifest that needs a key of that chain.", INTEGRITY,
                 with_record(key_3, flip(recs[key_3], len(recs[key_3]) - 20)),
                 first_use(good.notes[key_3]["chain_id"]))
    seg_4 = indices(good, "segment")[4]
    cam_4 = good.notes[seg_4]["camera"]
    yield V("flip-segment-ciphertext", "A bit of a segment's ciphertext flipped: the "
                 "covering manifest's digest (and the GCM tag) no longer match.", INTEGRITY,
                 with_record(seg_4, flip(recs[seg_4], len(recs[seg_4]) - 20)),
                 next_manifest(seg_4, cam_4))
    last_video = indices(good, "segment", camera=LOBBY)[-1]
    flags_offset = 5 + 1 + len(LOBBY) + 1 + 8 + 8 + 4 + 16
    yield V("flip-segment-last-flag", "The last-segment flag of the final cam-lobby "
                 "segment cleared.", INTEGRITY,
                 with_record(last_video, flip(recs[last_video], flags_offset)),
                 next_manifest(last_video, LOBBY))
    man_2 = indices(good, "manifest")[2]
    yield V("flip-manifest", "A bit of a manifest entry's segment tag flipped: the "
                 "Archiver signature fails.", INTEGRITY,
                 with_record(man_2, flip(recs[man_2], 5 + 1 + len(good.notes[man_2]["camera"])
                                         + 8 + 32 + 8 + 1 + 2 + 1 + 8 + 8 + 4 + 16 + 3)), man_2)
    yield V("flip-manifest-signature", "A bit inside a manifest's signature flipped.",
                 INTEGRITY, with_record(man_2, flip(recs[man_2], len(recs[man_2]) - 3)), man_2)
    yield V("flip-end-transcript", "A bit of the end record's transcript hash flipped.",
                 INTEGRITY, with_record(n_end, flip(recs[n_end], 5 + 16 + 1 + 5)), n_end)
    yield V("flip-record-type", "A chain record's type byte changed to 9, an unknown type.",
                 FORMAT, with_record(key_3, bytes([9]) + recs[key_3][1:]), key_3)

    # --- reordering and splicing ---------------------------------------------------------
    lobby_segs = indices(good, "segment", camera=LOBBY)
    a, b = lobby_segs[0], lobby_segs[1]
    swapped = list(recs)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    yield V("reordered-segments", "Two cam-lobby segments under one manifest swapped.",
                 INTEGRITY, variant(swapped), next_manifest(b, LOBBY))
    moved = reencode(recs[a], camera=GATE)
    yield V("segment-moved-to-other-camera", "A cam-lobby segment relabelled as a cam-gate "
                 "segment: cam-lobby's manifest misses it.", INTEGRITY,
                 with_record(a, moved), next_manifest(a, LOBBY))
    minute0_seg = lobby_segs[0]
    minute1_man = indices(good, "manifest", camera=LOBBY)[3]
    spliced = [*recs[:minute1_man], recs[minute0_seg], *recs[minute1_man:]]
    yield V("segment-replayed-in-later-minute", "A minute-0 cam-lobby segment inserted "
                 "again among minute-1 segments: the minute-1 manifest does not list it.",
                 INTEGRITY, variant(spliced), minute1_man + 1)
    later = [r for i, r in enumerate(recs) if i != minute0_seg]
    insert_at = minute1_man - 1  # index in `later` (one record earlier was removed)
    later = [*later[:insert_at], recs[minute0_seg], *later[insert_at:]]
    yield V("segment-moved-to-later-minute", "A minute-0 cam-lobby segment moved among "
                 "the minute-1 segments: minute 0's manifest misses it.", INTEGRITY,
                 variant(later), next_manifest(minute0_seg, LOBBY) - 1)
    unknown_camera = reencode(recs[a], camera="cam-attic")
    yield V("segment-for-camera-not-in-header", "A segment of a camera the header does "
                 "not announce.", INTEGRITY, with_record(a, unknown_camera), a)

    # --- truncation ----------------------------------------------------------------------
    yield V("truncated-missing-end", "The end record cut off.", INTEGRITY,
                 without(n_end), "finish")
    last_seg = indices(good, "segment")[-1]
    yield V("truncated-missing-last-segment", "The last segment removed (its manifest and "
                 "the end record kept).", INTEGRITY, without(last_seg), n_end - 2)
    yield V("truncated-after-last-segment", "The last manifest and the end record cut "
                 "off.", INTEGRITY, without(n_end - 1, n_end), "finish")
    yield V("truncated-inside-record", "The stream stops in the middle of the last "
                 "manifest.", FORMAT, variant([*recs[:n_end - 1], recs[n_end - 1][:40]]),
                 "finish")

    # --- manifests -----------------------------------------------------------------------
    lobby_mans = indices(good, "manifest", camera=LOBBY)
    yield V("manifest-missing", "A cam-lobby manifest removed: the next one covers "
                 "segments it does not list and does not link to it.", INTEGRITY,
                 without(lobby_mans[1]), lobby_mans[2] - 1)
    manifest = decode_record(recs[lobby_mans[1]])
    resigned = encode_record(replace(manifest, signature=rogue.sign(manifest.signed_bytes())))
    yield V("manifest-resigned-by-other-key", "A manifest re-signed by a key that is not "
                 "the pinned Archiver's.", INTEGRITY, with_record(lobby_mans[1], resigned),
                 lobby_mans[1])
    replay = [*recs[:lobby_mans[2] + 1], recs[lobby_mans[1]], *recs[lobby_mans[2] + 1:]]
    end = decode_record(recs[n_end])
    end_resigned = encode_record(replace(end, signature=rogue.sign(end.signed_bytes())))
    yield V("end-resigned-by-other-key", "The end record (correct transcript hash) signed by "
                 "a key that is not the pinned Archiver's.", INTEGRITY,
                 with_record(n_end, end_resigned), n_end)
    yield V("manifest-replayed", "An earlier cam-lobby manifest sent again.", INTEGRITY,
                 variant(replay), lobby_mans[2] + 1)

    # --- forgery with public information only --------------------------------------------
    forger, forger_a, _ = run_archiver(rogue, "forger")
    forged = assemble(forger, forger_a, (LOBBY, GATE), Mode.PLAYBACK, forger.manifests,
                      FixedRng("forged"), header_cert=der(signer.certificate), end_signer=rogue)
    yield V("forged-with-viewer-certificate", "A complete stream made by someone who holds "
                 "only viewer A's certificate and the Archiver's public certificate: openers, "
                 "keys and segments are valid for viewer A, but the manifests cannot carry the "
                 "Archiver's signature.", INTEGRITY, forged.stream(),
                 indices(forged, "manifest")[0], request=forged.request)
    forged_own = assemble(forger, forger_a, (LOBBY, GATE), Mode.PLAYBACK, forger.manifests,
                          FixedRng("forged"))
    yield V("forged-with-own-archiver-certificate", "The same forgery, naming the forger's "
                 "own certificate in the header: it is not the pinned one.", INTEGRITY,
                 forged_own.stream(), 0, request=forged_own.request)

    # --- identities ----------------------------------------------------------------------
    key_i = indices(good, "chain")[0]
    key_id = good.notes[key_i]["chain_id"]
    b_epoch, b_record = viewer_b.chain_records[key_id]
    with_b = [*recs[:key_i], viewer_b.openers[b_epoch], b_record, *recs[key_i + 1:]]
    yield V("chain-record-for-other-viewer", "Viewer B's epoch opener and chain record for a "
                 "key chain, in place of viewer A's chain record.", NO_MATCH, variant(with_b),
                 key_i)
    yield V("chain-record-of-unknown-epoch", "Viewer B's chain record (of an epoch this "
                 "stream never opened) in place of viewer A's.", INTEGRITY,
                 with_record(key_i, b_record), key_i)
    a_epoch = good.notes[key_i]["epoch_id"]
    relabelled = reencode(b_record, epoch_id=a_epoch)
    yield V("chain-record-for-other-viewer-relabelled", "Viewer B's chain record with its "
                 "epoch id changed to viewer A's epoch: it does not unwrap for viewer A.",
                 INTEGRITY, with_record(key_i, relabelled), first_use(key_id))
    yield V("stream-for-other-viewer", "Viewer B's live stream, read by viewer A.",
                 NO_MATCH, live_b.stream(), 0, request=live_b.request)

    # --- framing -------------------------------------------------------------------------
    yield V("unknown-version", "Version 1 (the old, unreadable format) in the prefix.",
                 FORMAT, b"FUSNSTRM\x00\x01" + b"".join(recs), "prefix")
    yield V("bad-magic", "Not a fusion stream.", FORMAT,
                 b"FUSNSTRX\x00\x02" + b"".join(recs), "prefix")
    seg_0 = lobby_segs[0]
    oversized = struct.pack(">BI", RecordType.SEGMENT, MAX_SEGMENT_BODY + 1) + recs[seg_0][5:]
    yield V("oversized-segment-length", "A segment record claiming 64 MiB + 1 bytes.",
                 FORMAT, variant([*recs[:seg_0], oversized]), seg_0)
    oversized_small = (struct.pack(">BI", RecordType.CHAIN_RECORD, MAX_SMALL_BODY + 1)
                       + recs[key_i][5:])
    yield V("oversized-chain-record-length", "A chain record claiming 64 KiB + 1 bytes.",
                 FORMAT, variant([*recs[:key_i], oversized_small]), key_i)
    yield V("bytes-after-end", "One byte after the end record.", FORMAT,
                 good.stream() + b"\x00", n_end + 1)
    yield V("first-record-not-header", "The stream starts with an epoch opener.", FORMAT,
                 variant(recs[1:]), 0)
    yield V("second-header", "The header sent twice.", FORMAT,
                 variant(recs[:1] + recs), 1)
    short = recs[seg_0][:5 + 1 + len(LOBBY) + 1 + 8 + 8 + 4 + 16 + 1 + 15]
    short = struct.pack(">BI", RecordType.SEGMENT, len(short) - 5) + short[5:]
    yield V("segment-shorter-than-tag", "A segment whose ciphertext is shorter than the "
                 "16-byte tag.", FORMAT, with_record(seg_0, short), seg_0)
    padded = recs[key_i] + b"\x00"
    padded = struct.pack(">BI", RecordType.CHAIN_RECORD, len(padded) - 5) + padded[5:]
    yield V("trailing-bytes-in-record", "A chain record with one byte too many.", FORMAT,
                 with_record(key_i, padded), key_i)

    # --- completeness: withheld segments need signed chain recipients (issue 12) ----------
    lobby_key = good.notes[indices(good, "chain", epoch_id=epoch_1)[2]]["chain_id"]
    withheld = assemble(sim, viewer_a, (LOBBY, GATE), Mode.PLAYBACK, sim.manifests,
                        FixedRng("stream of viewer A"), withhold=frozenset({lobby_key}))
    yield V("withheld-chain-record-is-missing", "The chain record (and segments) of one "
            "cam-lobby key chain are not sent although viewer A has one, as from an Archiver "
            "whose index lost that row; the chain's signed recipients list viewer A, so the "
            "reader reports those segments as missing, not as 'not authorized'.", SUCCESS,
            withheld.stream(), built=withheld, request=withheld.request)
    no_grants = assemble(sim, viewer_a, (LOBBY, GATE), Mode.PLAYBACK, sim.manifests,
                         FixedRng("stream of viewer A"), without_grants=True)
    yield V("skipped-without-chain-recipients-is-missing", "The good stream without the signed "
            "recipients of the cam-gate chain viewer A was not authorized for: nothing signed "
            "says it was not authorized, so those segments are reported as missing.", SUCCESS,
            no_grants.stream(), built=no_grants, request=no_grants.request)
    gate_grant_i = indices(good, "grant")[0]
    gate_grant = decode_record(recs[gate_grant_i])
    forged_grant = encode_record(replace(gate_grant, signature=rogue.sign(
        gate_grant.signed_bytes())))  # type: ignore[union-attr]
    yield V("chain-recipients-resigned-by-other-key", "Chain recipients signed by a key that "
            "is not the pinned Archiver's.", INTEGRITY,
            with_record(gate_grant_i, forged_grant), gate_grant_i)

    # --- streams that do not answer the request (issue 12: replay, the CCTV loop) ---------
    def asking(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
        return {**base, **changes}

    yield V("request-replayed-stream", "Viewer A's genuine, complete stream, saved and replayed "
            "by a relay as the answer to a new request for the same camera and range: the "
            "header carries the earlier request's nonce.", MISMATCH, good.stream(), 0,
            request=asking(good.request, nonce=FixedRng("a new request")(16).hex()))
    gate_only = assemble(sim, viewer_a, (GATE,), Mode.PLAYBACK,
                         [m for m in sim.manifests if m.camera == GATE], FixedRng("gate of A"))
    yield V("request-wrong-camera", "A genuine stream of cam-gate, with the nonce of the "
            "request (a relay can read it), answering a request for cam-lobby.", MISMATCH,
            gate_only.stream(), 0, request=asking(gate_only.request, cameras=[LOBBY]))
    yield V("request-wrong-range", "A genuine stream for the range of minutes 0-3 answering a "
            "request (same nonce) for minute 1 only.", MISMATCH, good.stream(), 0,
            request=asking(good.request, from_ms=T0 + 60_000, to_ms=T0 + 120_000))
    minute1 = assemble(sim, viewer_a, (LOBBY, GATE), Mode.PLAYBACK, sim.manifests,
                       FixedRng("minute 1 of A"), range_ms=(T0 + 60_000, T0 + 120_000))
    yield V("request-segment-outside-range", "A header that answers a request for minute 1, "
            "but the stream carries the signed manifests of minute 0 as well (as an Archiver "
            "whose index time columns were edited would send): the second cam-lobby manifest's "
            "signed "
            "capture time lies outside the range (the first segment of each data stream may "
            "start before the range: it may overlap its start).", MISMATCH, minute1.stream(),
            indices(minute1, "manifest", camera=LOBBY)[1], request=minute1.request)
    yield V("request-stale-live", "Viewer B's genuine live stream, replayed an hour later as the "
            "answer to a new live request (the nonce rewritten would break the END signature; "
            "here the relay even has the right nonce): the header was made an hour before the "
            "request by the viewer's clock.", MISMATCH, live_b.stream(), 0, viewer="viewer-b",
            request=asking(live_b.request, from_ms=live_b.request["from_ms"] + 3_600_000,
                           to_ms=live_b.request["to_ms"] + 3_600_000,
                           clock_ms=live_b.request["clock_ms"] + 3_600_000))
    old_live = assemble(sim, viewer_b, (GATE,), Mode.LIVE,
                        [m for m in sim.manifests if m.camera == GATE][:2], FixedRng("old live"),
                        created_ms=T0 + 125_400, range_ms=(T0 + 125_200, T0 + 185_200))
    yield V("request-live-old-segments", "A fresh live header, but the segments are from "
            "minute 0 (signed capture times two minutes before the request): old footage "
            "offered as live.", MISMATCH, old_live.stream(), indices(old_live, "manifest")[0],
            viewer="viewer-b", request=old_live.request)
    yield from ec_vectors(signer)
    yield from join_vectors(signer)


def join_vectors(signer: DeterministicSigner) -> Iterator[Vector]:
    """Issue 23: a viewer that joined a running chain (a join record and its signed join
    statement)."""
    sim, viewer_a = run_join_archiver(signer, "fusion stream v2 join vectors")
    good = assemble(sim, viewer_a, (LOBBY,), Mode.PLAYBACK, sim.manifests,
                    FixedRng("join stream of viewer A"))
    recs = good.records
    prefix = stream_prefix()
    statements = sim.grants[next(iter(sim.grants))]
    join_i = next(i for i, r in enumerate(recs) if r == statements[-1])
    record_i = indices(good, "chain")[0]

    def variant(records: list[bytes]) -> bytes:
        return prefix + b"".join(records)

    yield Vector(
        "good-join-midway",
        "Three minutes of one cam-lobby chain for viewer A, which was authorized at minute 1 + "
        "20 s, after that minute's first segment was sealed: it joined the running chain from "
        "step 2 (a join record: S_2 wrapped under its epoch KEK, first_step 2) under the "
        "Archiver's signed join statement (statement 1 after the start statement's one part). "
        "The four segments of steps 0 and 1 are reported as skipped (not authorized: the start "
        "statement does not list it and its join is at a later step); the two of step 2 are "
        "decrypted with keys derived from S_2.",
        SUCCESS, good.stream(), built=good, request=good.request,
        intermediates={"rng": "SHAKE-256(seed || counter u64), seed 'fusion stream v2 join "
                              "vectors' (Archiver) and 'join stream of viewer A' (header)",
                       "kek0_by_epoch_id": viewer_a.kek0,
                       "chain_seeds_by_chain_id": sim.chain_seeds,
                       "join_states_by_chain_id_and_step": sim.join_states,
                       "minute_keys_by_key_id": sim.minute_keys,
                       "transcript": transcript_intermediates(recs)})
    yield Vector(
        "join-record-without-join-statement",
        "The good join stream without its join statement: the join record is not covered by "
        "a signed statement naming this viewer and its step, and is refused when it arrives.",
        INTEGRITY, variant([r for i, r in enumerate(recs) if i != join_i]), record_i - 1,
        request=good.request)
    yield Vector(
        "join-statement-resigned-by-other-key",
        "The join statement signed by another key.", INTEGRITY,
        variant([*recs[:join_i], issue_chain_join(
            sim.key_chains[(LOBBY, DataStream.VIDEO)], 1, 1, 2,
            [fingerprint(viewer_a.recipient.certificate)], load_signer("rogue")),
            *recs[join_i + 1:]]), join_i, request=good.request)
    moved = reencode(recs[record_i], first_step=1)
    yield Vector(
        "join-record-relabelled-to-earlier-step",
        "The join record's first step changed from 2 to 1: no signed statement covers it.",
        INTEGRITY, variant([*recs[:record_i], moved, *recs[record_i + 1:]]), record_i,
        request=good.request)


def ec_vectors(signer: DeterministicSigner) -> Iterator[Vector]:
    """EC P-256 viewers (epoch opener kind 16: ECDH-P256, HKDF-SHA256, AES-KW), every expect."""
    sim, viewer_c = run_ec_archiver(signer, "fusion stream v2 EC vectors")
    good = assemble(sim, viewer_c, (LOBBY,), Mode.PLAYBACK, sim.manifests,
                    FixedRng("stream of viewer C"))
    recs = good.records
    prefix = stream_prefix()
    opener_i = indices(good, "opener")[0]
    first_manifest = indices(good, "manifest")[0]

    def with_record(i: int, new: bytes) -> bytes:
        return prefix + b"".join([*recs[:i], new, *recs[i + 1:]])

    yield Vector(
        "good-ec-p256-viewer",
        "Two minutes of cam-lobby video for viewer C, an EC P-256 viewer: one epoch opener of "
        "kind 16 (ephemeral point || AES-KW of KEK0 under HKDF-SHA256 of the ECDH secret), "
        "opened with one ECDH.", SUCCESS, good.stream(), viewer="viewer-c", built=good, request=good.request,
        intermediates={"rng": "SHAKE-256(seed || counter u64), seed 'fusion stream v2 EC "
                              "vectors' (Archiver; the ephemeral scalar is its first 32-byte "
                              "draw after the epoch id and KEK0) and 'stream of viewer C'",
                       "kek0_by_epoch_id": viewer_c.kek0,
                       "chain_seeds_by_chain_id": sim.chain_seeds,
                       "minute_keys_by_key_id": sim.minute_keys,
                       "transcript": transcript_intermediates(recs)})
    opener = recs[opener_i]
    yield Vector("flip-ec-epoch-opener-point", "A bit of the EC opener's ephemeral point "
                 "flipped: off the curve or another point, so the unwrap fails, when the "
                 "opener is first needed.", INTEGRITY,
                 with_record(opener_i, flip(opener, len(opener) - 105 + 10)), first_manifest,
                 viewer="viewer-c", request=good.request)
    yield Vector("flip-ec-epoch-opener-wrapped-key", "A bit of the EC opener's wrapped KEK0 "
                 "flipped: AES-KW's integrity check fails.", INTEGRITY,
                 with_record(opener_i, flip(opener, len(opener) - 3)), first_manifest,
                 viewer="viewer-c", request=good.request)
    yield Vector("ec-opener-kind-changed-to-rsa", "The EC opener's kind byte changed from 16 "
                 "to 2 (RSA-OAEP SHA-256): an RSA opener cannot be for an EC key.", INTEGRITY,
                 with_record(opener_i, reencode(opener, key_scheme=KeyScheme.RSA_OAEP_SHA256)),
                 first_manifest, viewer="viewer-c", request=good.request)
    kind_offset = 5 + 16 + 32
    yield Vector("ec-opener-unknown-kind", "The opener kind byte set to 3, a kind that does "
                 "not exist.", FORMAT, with_record(opener_i, opener[:kind_offset] + b"\x03"
                                                   + opener[kind_offset + 1:]), opener_i,
                 viewer="viewer-c", request=good.request)
    yield Vector("ec-stream-read-by-rsa-viewer", "Viewer C's stream, read by viewer A (RSA).",
                 NO_MATCH, good.stream(), 0, viewer="viewer-a", request=good.request)


# --- key chain derivation (format v2), computed independently of keyservice.crypto ---------
def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with HMAC-SHA256, written out here (not keyservice's, not `cryptography`'s
    HKDF class) so that the derivation vectors are a second implementation of the spec."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def chain_derivation() -> dict[str, Any]:
    """S_{i+1} = HKDF(S_i, salt=chain_id, info="FSE2 chain-step\\0");
    K_i = HKDF(S_i, salt=chain_id, info="FSE2 chain-minute-key\\0" || str8(camera) ||
    stream u8 || i u32); key id = chain_id || i u32; commitment = HMAC-SHA256(K_i,
    "FSE1 key-commitment" || str8(camera) || stream u8 || key id)."""
    rng = FixedRng("fusion stream v2 chain derivation")
    cases = []
    for camera, stream, steps in ((LOBBY, DataStream.VIDEO, (0, 1, 2, 59, 1440)),
                                  (GATE, DataStream.AUDIO, (0, 1, 7))):
        chain_id, seed = rng(12), rng(32)
        name = bytes((len(camera),)) + camera.encode()
        state, at = seed, 0
        rows = []
        for step in steps:
            while at < step:
                state = _hkdf_sha256(state, chain_id, b"FSE2 chain-step\x00")
                at += 1
            key = _hkdf_sha256(state, chain_id, b"FSE2 chain-minute-key\x00" + name
                               + bytes((stream,)) + struct.pack(">I", step))
            key_id = chain_id + struct.pack(">I", step)
            commitment = hmac.new(key, b"FSE1 key-commitment" + name + bytes((stream,))
                                  + key_id, hashlib.sha256).digest()
            rows.append({"step": step, "state_hex": state.hex(), "key_id_hex": key_id.hex(),
                         "minute_key_hex": key.hex(), "commitment_hex": commitment.hex()})
        cases.append({"camera": camera, "stream": int(stream), "chain_id_hex": chain_id.hex(),
                      "seed_hex": seed.hex(), "steps": rows})
    return {"description": "Key chain derivation of fusion stream v2 " + " ".join(
        (chain_derivation.__doc__ or "").split()), "cases": cases}


def render() -> dict[str, str]:
    return {f"{v.name}.json": v.to_json() for v in vectors()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--new-keys", action="store_true", help="replace the TEST-ONLY keys")
    parser.add_argument("--add-key", metavar="NAME", help="make only this TEST-ONLY key (one "
                                                          "added to KEY_FILES)")
    args = parser.parse_args(argv)
    if args.new_keys:
        make_keys()
    elif args.add_key:
        make_keys(only=(args.add_key,))
    files = render()
    chains = json.dumps(chain_derivation(), indent=1) + "\n"
    if args.check:
        if not CHAIN_VECTORS.exists() or CHAIN_VECTORS.read_text() != chains:
            print(f"differs: {CHAIN_VECTORS.name}", file=sys.stderr)
            return 1
        stale = [name for name, text in files.items()
                 if not (VECTORS_DIR / name).exists()
                 or (VECTORS_DIR / name).read_text() != text]
        extra = sorted({p.name for p in VECTORS_DIR.glob("*.json")} - set(files))
        for name in stale + extra:
            print(f"differs: {name}", file=sys.stderr)
        return 1 if stale or extra else 0
    VECTORS_DIR.mkdir(exist_ok=True)
    for old in VECTORS_DIR.glob("*.json"):
        if old.name not in files:
            old.unlink()
    for name, text in files.items():
        (VECTORS_DIR / name).write_text(text)
    CHAIN_VECTORS.parent.mkdir(exist_ok=True)
    CHAIN_VECTORS.write_text(chains)
    print(f"wrote {len(files)} vectors to {VECTORS_DIR} and {CHAIN_VECTORS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
