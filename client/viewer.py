"""The viewer library: everything ``fusion-client`` does, as functions with typed results.

Open an identity on a token, log in to an Archiver with pinning, play a range (or watch live)
and get a verified range, make an access grant, export an evidence package. Nothing here
prints, prompts (unless asked to for a PIN) or exits: the command line (client/cli.py), the
grant and evidence commands and the local web page are adapters over this module.

Safe by default: every fetch here is bound to the request just made (fresh nonce, camera,
mode, range), so a stream saved from another request and replayed is refused
(``RequestMismatch``). The one-call form::

    from client.viewer import fetch_range
    clip = fetch_range("https://archiver.example:8443", "pkcs11:token=viewers;object=alice",
                       "lobby", from_ms, to_ms, tls_ca=Path("site-ca.pem"))
    clip.data        # verified MPEG-TS (or output=Path("clip.ts") to write a file)
    clip.gaps, clip.segments, clip.signer.fingerprint
"""

from __future__ import annotations

import datetime as dt
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from client.logins import (
    Login,
    Signer,
    check_camera,
    load_certificate_file,
    load_site_ca,
    login,
    now_ms,
    open_identity,
    stream,
)
from client.pinning import KnownArchivers
from client.player import (
    DiscardOutput,
    FileOutput,
    Gap,
    MemoryOutput,
    Output,
    PartOutput,
    Player,
    archiver_pin_check,
)
from client.session import (
    MAX_LIVE_S,
    ArchiverSession,
    GrantInfo,
    LoginResult,
    NoRecording,
    OutsideGrant,
    live_request,
    playback_request,
)
from client.site import Part, Site, nothing_at_the_end, played_part, trust_followed
from keyservice.certs import validate_viewer_certificate
from keyservice.errors import FormatError, UsageError
from keyservice.format import Header, Mode, Record, decode_record
from keyservice.framing import RecordSplitter
from keyservice.identity import Identity
from keyservice.keyscheme import KeyScheme, Recipient
from keyservice.reader import DEFAULT_MAX_SKEW_MS, SegmentPlaintext, StreamRequest, VerifiedKey

__all__ = [
    "EvidenceExport",
    "EvidencePart",
    "GrantMade",
    "Login",
    "OpenedGrantRange",
    "Signer",
    "VerifiedRange",
    "check_camera",
    "check_writable",
    "evidence_part",
    "export_evidence",
    "fetch_range",
    "live",
    "load_certificate_file",
    "load_site_ca",
    "login",
    "make_grant_for",
    "now_ms",
    "open_grant",
    "open_identity",
    "play_grant",
    "play_range",
    "player_for",
    "recipient_for",
    "stream",
]


# --- small things ---------------------------------------------------------------------------
# --- streams ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedRange:
    """A stream verified to its signed end record (or a live stream stopped by its viewer):
    what it held and who signed it. ``data`` is the video when fetched to memory, ``path`` the
    file when written to one."""

    camera: str
    mode: str                     # "playback" or "live"
    from_ms: int                  # the range asked for
    to_ms: int
    segments: int                 # verified segments written
    bytes: int
    first_ms: int | None          # signed capture times of the video written
    last_ms: int | None
    gaps: tuple[Gap, ...]
    skipped: int                  # segments recorded while this viewer was not authorized
    signer: Signer
    request_nonce: bytes
    token_operations: int         # epoch openers opened on the token
    complete: bool                # the signed end record verified
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    # Minute keys of the released segments, each checked against its signed commitment:
    # secret, for grants and evidence packages.
    keys: Mapping[bytes, VerifiedKey] = field(default_factory=dict, repr=False)
    header: Header | None = field(default=None, repr=False)
    # A range across a change of Archiver (fetch_range in a site): each part's own verified
    # range, with its own signer (``signer`` above is the first part's). Empty: one Archiver.
    parts: tuple[VerifiedRange, ...] = field(default=(), repr=False)


def player_for(identity: Identity, signed_by: Login | LoginResult | bytes,
               request: StreamRequest, output: Output, *,
               on_segment: Callable[[SegmentPlaintext], None] | None = None,
               critical: Callable[[], AbstractContextManager[object]] | None = None,
               known_keys: Mapping[bytes, bytes] | None = None) -> Player:
    """A Player bound to ``request`` and to the pinned Archiver (``signed_by``: a login, or
    the Archiver certificate's fingerprint); the options are Player's."""
    pinned = signed_by if isinstance(signed_by, bytes) else signed_by.archiver_fingerprint
    if critical is None:
        return Player(identity, archiver_pin_check(pinned), output, request=request,
                      on_segment=on_segment, known_keys=known_keys)
    return Player(identity, archiver_pin_check(pinned), output, request=request,
                  on_segment=on_segment, critical=critical, known_keys=known_keys)


def _result(player: Player, request: StreamRequest, *, complete: bool, path: Path | None = None,
            data: bytes | None = None) -> VerifiedRange:
    s = player.summary
    header = player.header
    if header is None:
        raise FormatError("The stream ended before its header.")
    return VerifiedRange(
        camera=request.cameras[0], mode="live" if request.mode == Mode.LIVE else "playback",
        from_ms=request.from_ms, to_ms=request.to_ms, segments=s.segments, bytes=s.bytes,
        first_ms=s.first_ms, last_ms=s.last_ms,
        gaps=tuple(sorted(s.gaps, key=lambda g: g.from_ms)), skipped=s.skipped,
        signer=Signer(x509.load_der_x509_certificate(header.archiver_cert_der)),
        request_nonce=request.nonce, token_operations=s.epoch_openings, complete=complete,
        path=path, data=data, keys=dict(player.verified_keys), header=header)


def _run(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
         request: StreamRequest, output: Path | Output | None, *,
         on_segment: Callable[[SegmentPlaintext], None] | None = None,
         on_chunk: Callable[[bytes], None] | None = None,
         known_keys: Mapping[bytes, bytes] | None = None,
         grant_id: str | None = None) -> VerifiedRange:
    memory: MemoryOutput | None = None
    sink: Output
    if output is None:
        sink = memory = MemoryOutput()
    elif isinstance(output, Path):
        sink = FileOutput(output)  # the file gets its name only once the end record verified
    else:
        sink = output
    player = player_for(identity, signed_by, request, sink, on_segment=on_segment,
                        known_keys=known_keys)
    try:
        with stream(session, request, grant_id=grant_id) as chunks:
            for chunk in chunks:
                if on_chunk is not None:
                    on_chunk(chunk)
                player.feed(chunk)
        player.finish()
        final = sink.commit()
    except BaseException:
        sink.abort()  # a file left behind is named .incomplete: never passed off as good
        raise
    return _result(player, request, complete=True, path=final,
                   data=memory.data() if memory is not None else None)


def play_range(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
               camera: str, from_ms: int, to_ms: int, *, output: Path | Output | None = None,
               on_segment: Callable[[SegmentPlaintext], None] | None = None,
               on_chunk: Callable[[bytes], None] | None = None) -> VerifiedRange:
    """Fetch and verify a recorded range on a logged-in session. ``output``: a file (written
    as FILE.partial, renamed to FILE only after the signed end record verified, else
    FILE.incomplete), an Output (committed on success, aborted on failure), or None for the
    video in ``VerifiedRange.data``.
    ``on_chunk`` sees the raw fusion stream (to save it as evidence)."""
    request = playback_request(check_camera(camera), from_ms, to_ms)
    return _run(session, identity, signed_by, request, output, on_segment=on_segment,
                on_chunk=on_chunk)


def live(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
         camera: str, duration_s: float, *, output: Path | Output | None = None,
         max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
         on_segment: Callable[[SegmentPlaintext], None] | None = None) -> VerifiedRange:
    """Watch a camera live for ``duration_s`` seconds (at most a day): each segment reaches
    ``output`` (or ``on_segment``) as soon as it is verified; footage older than the request by
    more than ``max_skew_ms`` is refused as a replay."""
    if not 0 < duration_s <= MAX_LIVE_S:
        raise UsageError(f"A live stream lasts more than 0 and at most {MAX_LIVE_S} seconds.")
    request = live_request(check_camera(camera), duration_s, max_skew_ms=max_skew_ms)
    return _run(session, identity, signed_by, request, output, on_segment=on_segment)


def fetch_range(archiver: str, token: str | Identity, camera: str, from_ms: int, to_ms: int, *,
                output: Path | None = None, tls_ca: Path | None = None,
                archiver_cert: x509.Certificate | Path | None = None,
                known: KnownArchivers | None = None, pin: str | None = None,
                prompt: bool = False,
                site_ca: Path | Sequence[x509.Certificate] = ()) -> VerifiedRange:
    """One call: connect to the Archiver at ``archiver`` (HTTPS verified against ``tls_ca``,
    a site CA, if given), open ``token`` (a PKCS#11 URI, or an open Identity), log in with
    pinning (see ``login``), fetch ``camera``'s recorded range [from_ms, to_ms] bound to a
    fresh request, verify it to its signed end record, and return it: the video in ``data``,
    or written to ``output``. ``site_ca``: accept any Archiver whose signing certificate
    this site CA (a PEM file, or the certificates) issued, without a pin. Raises a
    KeyServiceError (with ``exit_code``, and the Archiver's ``wire_code``/``http_status`` for a
    refusal); never returns unverified video.

    In a site, the range is played where it was recorded, as ``play`` does it (client.site:
    only an Archiver the site lists, at its listed URL, whose signing certificate is pinned
    for that URL in ``known`` or issued by ``site_ca``; never trusted on first use). A range
    across a change of Archiver is played part by part into one output: ``parts`` holds each
    part's VerifiedRange with its own ``signer``."""
    check_camera(camera)
    explicit = load_certificate_file(archiver_cert) if isinstance(archiver_cert, Path) \
        else archiver_cert
    cas = load_site_ca(site_ca) if isinstance(site_ca, Path) else tuple(site_ca)
    store = known if known is not None else KnownArchivers.default()
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(archiver, tls_ca=tls_ca))
        identity = token if not isinstance(token, str) else stack.enter_context(
            open_identity(token, pin=pin, prompt=prompt))
        logged_in = login(session, identity, archiver_cert=explicit, known=store, site_ca=cas)
        site = stack.enter_context(Site(session, logged_in, identity,
                                        check=trust_followed(store, cas)))
        parts = site.parts(camera, from_ms, to_ms)
        if len(parts) == 1:
            holder, holder_login = site.reach(parts[0])
            return play_range(holder, identity, holder_login, camera, from_ms, to_ms,
                              output=output)
        return _fetch_parts(site, identity, camera, from_ms, to_ms, parts, output)


def _fetch_parts(site: Site, identity: Identity, camera: str, from_ms: int, to_ms: int,
                 parts: Sequence[Part], output: Path | None) -> VerifiedRange:
    """Each part at its own Archiver (client.site.played_part's ranges), verified against its
    signer, into one output: a file only once every part verified, else FILE.incomplete."""
    memory: MemoryOutput | None = None
    sink: Output
    if output is None:
        sink = memory = MemoryOutput()
    else:
        sink = FileOutput(output)
    played: list[VerifiedRange] = []
    previous_end: int | None = None
    try:
        for i in range(len(parts)):
            part = played_part(parts, i, previous_end)
            if part is None:
                continue
            holder, holder_login = site.reach(part)
            request = playback_request(camera, part.from_ms, part.to_ms)
            try:
                played.append(_run(holder, identity, holder_login, request, PartOutput(sink)))
            except NoRecording as exc:
                if nothing_at_the_end(exc, part, previous_end):
                    continue  # no video at the instant --to, where the last part's ended
                raise
            if played[-1].last_ms is not None:
                previous_end = played[-1].last_ms
        final = sink.commit()
    except BaseException:
        sink.abort()
        raise
    firsts = [p.first_ms for p in played if p.first_ms is not None]
    lasts = [p.last_ms for p in played if p.last_ms is not None]
    return VerifiedRange(
        camera=camera, mode="playback", from_ms=from_ms, to_ms=to_ms,
        segments=sum(p.segments for p in played), bytes=sum(p.bytes for p in played),
        first_ms=min(firsts) if firsts else None, last_ms=max(lasts) if lasts else None,
        gaps=tuple(g for p in played for g in p.gaps), skipped=sum(p.skipped for p in played),
        signer=played[0].signer, request_nonce=played[0].request_nonce,
        token_operations=sum(p.token_operations for p in played), complete=True, path=final,
        data=memory.data() if memory is not None else None, parts=tuple(played))


# --- access grants ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GrantMade:
    """A grant handed to the Archiver (it waits there for an admin's approval)."""

    grant: GrantInfo
    verified: VerifiedRange       # the grantor's own verified play of the range (not written)
    keys: int                     # minute keys wrapped to the grantee
    grantee: x509.Certificate


def recipient_for(cert: x509.Certificate, key_scheme: str | None = None) -> Recipient:
    """A certificate keys may be wrapped to, checked as a viewer certificate is (key type and
    size, validity now, key usage, its key scheme: ``key_scheme`` rsa-oaep-sha256|rsa-oaep-sha1
    only for an RSA certificate without the enrolment extension). Whom to trust is the
    caller's decision."""
    scheme = validate_viewer_certificate(
        cert, now=dt.datetime.now(dt.UTC), trust_decision=False,
        oaep_hash=KeyScheme.from_label(key_scheme) if key_scheme else None)
    return Recipient(cert, scheme)


def make_grant_for(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
                   camera: str, from_ms: int, to_ms: int,
                   recipient: Recipient, *, note: str | None = None) -> GrantMade:
    """Grant a recorded range this viewer can play to ``recipient`` (the grantee's
    certificate as ``recipient_for`` checked it): the range is played exactly as
    ``play_range`` would (every check), written nowhere, and exactly the period keys of the
    segments it released are wrapped to the grantee and handed to the Archiver."""
    # Imported here: a grant's code is not on the playing path (issue 23: start-up).
    from keyservice.grants import MAX_GRANT_KEYS, GrantKey, decode_grant, make_grant

    verified = play_range(session, identity, signed_by, camera, from_ms, to_ms,
                          output=DiscardOutput())
    keys = [GrantKey(k.stream, k.key_id, k.key) for k in verified.keys.values()]
    if not keys:
        raise UsageError("Nothing to grant: the range holds no segment you can decrypt.")
    if len(keys) > MAX_GRANT_KEYS:
        raise UsageError(f"The range spans {len(keys)} minute keys; a grant carries at most "
                         f"{MAX_GRANT_KEYS}. Split it into several grants.")
    blob = make_grant(recipient, camera, from_ms, to_ms, keys, now_ms())
    grant_id = decode_grant(blob).grant_id.hex()
    answer = session.create_grant(blob, note)
    if answer.grant_id != grant_id:
        raise FormatError("The Archiver answered for another grant than the one handed to it.")
    return GrantMade(answer, verified, len(keys), recipient.certificate)


@dataclass(frozen=True)
class OpenedGrantRange:
    """An approved grant opened on the grantee's token, and the part of its range to play."""

    grant_id: str
    camera: str
    granted_from_ms: int
    granted_to_ms: int
    from_ms: int
    to_ms: int
    keys: Mapping[bytes, bytes] = field(repr=False)  # minute keys by key id: secret


def open_grant(session: ArchiverSession, identity: Identity, grant_id: str, *,
               from_ms: int | None = None, to_ms: int | None = None) -> OpenedGrantRange:
    """Fetch an approved grant addressed to this viewer and open it on the token (one token
    operation; IntegrityError if it was altered). ``from_ms``/``to_ms`` (default: the grant's)
    must lie in the granted range (OutsideGrant otherwise)."""
    from keyservice.grants import open_grant as open_grant_blob

    fetched = session.grant(grant_id)
    opened = open_grant_blob(identity, fetched.grant)
    if opened.grant_id.hex() != grant_id:
        raise FormatError("The Archiver sent another grant than the one asked for.")
    start = opened.from_ms if from_ms is None else from_ms
    end = opened.to_ms if to_ms is None else to_ms
    if end < start:
        raise UsageError("The range ends before it starts.")
    if start < opened.from_ms or end > opened.to_ms:
        def when(ms: int) -> str:
            return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
        raise OutsideGrant(f"Grant {grant_id} covers camera {opened.camera} from "
                           f"{when(opened.from_ms)} to {when(opened.to_ms)} only.")
    return OpenedGrantRange(grant_id, opened.camera, opened.from_ms, opened.to_ms, start, end,
                            opened.keys)


def play_grant(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
               opened: OpenedGrantRange, *, output: Path | Output | None = None,
               ) -> VerifiedRange:
    """Play (part of) a granted range with the grant's keys, verified like any stream."""
    request = playback_request(opened.camera, opened.from_ms, opened.to_ms)
    return _run(session, identity, signed_by, request, output, known_keys=opened.keys,
                grant_id=opened.grant_id)


# --- evidence packages ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvidenceExport:
    """An evidence package written (docs/evidence.md): where, its SHA-256 (for the chain of
    custody), and what it holds."""

    path: Path
    sha256: str
    verified: VerifiedRange
    manifests: int
    keys: int
    video_bytes: int
    sealed_to: str | None         # the recipient's subject when the keys are sealed


def export_evidence(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
                    camera: str, from_ms: int, to_ms: int, output: Path, *,
                    recipient: Recipient | None = None) -> EvidenceExport:
    """Export a recorded range as an evidence package a third party verifies without any
    token: the segments and signed manifests as archived, the Archiver's certificate, exactly
    the range's minute keys (sealed to ``recipient`` if given), the verified video, SHA256SUMS.
    The range is verified first; nothing is written unless it verified completely."""
    # Imported here: evidence packages are not on the playing path (issue 23: start-up).
    from client.evidence_zip import write_zip

    check_writable(output)
    part = evidence_part(session, identity, signed_by,
                         playback_request(check_camera(camera), from_ms, to_ms),
                         recipient=recipient)
    digest = write_zip(output, part.files)
    return EvidenceExport(output, digest, part.verified, part.manifests, part.keys,
                          len(part.verified.data or b""),
                          recipient.certificate.subject.rfc4514_string()
                          if recipient is not None else None)


def check_writable(output: Path) -> None:
    """UsageError unless a package can be written at ``output`` (checked before the Archiver
    and the token are bothered)."""
    if output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name for the package.")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise UsageError(f"Cannot write the package into {output.parent}: not a writable "
                         "directory.")


@dataclass(frozen=True)
class EvidencePart:
    """A one-part package's files (not written yet) from one verified stream."""

    files: dict[str, bytes] = field(repr=False)
    verified: VerifiedRange
    manifests: int
    keys: int


def evidence_part(session: ArchiverSession, identity: Identity, signed_by: Login | LoginResult,
                  request: StreamRequest, *, recipient: Recipient | None = None,
                  exported_ms: int | None = None) -> EvidencePart:
    """Play ``request`` (a recorded range; its nonce is the one the Archiver signs) verified
    to its signed end record, and make the files of a one-part evidence package of it."""
    from keyservice.evidence.build import build_package, collect

    camera = request.cameras[0]
    received: deque[bytes] = deque()
    verified = _run(session, identity, signed_by, request, None, on_chunk=received.append)
    keys = {key_id: k.key for key_id, k in verified.keys.items()}
    collected = collect(_records(received), camera, keys)
    assert verified.data is not None
    files = build_package(camera=camera, from_ms=request.from_ms, to_ms=request.to_ms,
                          archiver_cert=verified.signer.certificate, collected=collected,
                          keys=keys, video=verified.data,
                          exported_ms=now_ms() if exported_ms is None else exported_ms,
                          recipient=recipient)
    key_count = len({decode_record(raw).key_id for raw in collected.segments})  # type: ignore[union-attr]
    return EvidencePart(files, verified, len(collected.manifests), key_count)


def _records(received: deque[bytes]) -> Iterator[tuple[Record, bytes]]:
    """The stream's records again, each chunk dropped once split: the export does not hold
    the stream twice."""
    splitter = RecordSplitter()
    while received:
        for record, raw in splitter.iter_feed(received.popleft()):
            yield record, bytes(raw)
