"""Evidence packages and access grants of a range across a change of Archiver (issue 22):
a camera moved (``cameras move``, or a failover) was recorded by one Archiver, then another,
each under its own chains and signature. Each part is taken from the Archiver that recorded it
(client.site: reached as a redirect is, checked), over the same part ranges ``play`` uses
(client.site.played_part), and verified against that Archiver's own signer.

- Evidence: one ``fusion-evidence/2`` package holding a one-part package per part
  (keyservice.evidence.parts); each part's stream is requested with a nonce derived from the
  package, so each Archiver signs its part's place in it.
- Grants: one grant per part, handed to the Archiver that recorded it (it checks the keys
  against its own index); the grantee plays them as one range, each part at its Archiver.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.player import Output, PartOutput
from client.session import NoRecording, PlacementView
from client.site import Part, Site, nothing_at_the_end, plan_parts, played_part, start_after
from client.viewer import (
    EvidencePart,
    GrantMade,
    OpenedGrantRange,
    VerifiedRange,
    check_writable,
    evidence_part,
    export_evidence,
    make_grant_for,
    now_ms,
    open_grant,
    play_grant,
)
from keyservice.errors import UsageError
from keyservice.format import Mode
from keyservice.identity import Identity
from keyservice.keyscheme import Recipient
from keyservice.reader import StreamRequest

__all__ = ["ExportAcross", "GrantPart", "export_across", "grant_across", "open_grants",
           "play_grants"]


@dataclass(frozen=True)
class ExportAcross:
    """An evidence package written: one part per Archiver that recorded the range (one part:
    a ``fusion-evidence/1`` package, exactly as before)."""

    path: Path
    sha256: str
    parts: list[tuple[Part, EvidencePart]] = field(repr=False)
    sealed_to: str | None


def export_across(site: Site, identity: Identity, camera: str, from_ms: int, to_ms: int,
                  output: Path, *, recipient: Recipient | None = None) -> ExportAcross:
    """Export [from_ms, to_ms] of ``camera`` as ONE evidence package, each part from the
    Archiver that recorded it and verified against its signer; nothing is written unless every
    part verified to its signed end record."""
    from client.evidence_zip import write_zip
    from keyservice.evidence.parts import PackagePart, build_parts_package, part_nonce

    check_writable(output)
    sealed_to = recipient.certificate.subject.rfc4514_string() if recipient else None
    planned = site.parts(camera, from_ms, to_ms)

    def one_archiver(only: Part) -> ExportAcross:
        session, login = site.reach(only)
        one = export_evidence(session, identity, login, camera, from_ms, to_ms, output,
                              recipient=recipient)
        part = EvidencePart({}, one.verified, one.manifests, one.keys)
        return ExportAcross(one.path, one.sha256, [(only, part)], sealed_to)

    if len(planned) == 1:
        return one_archiver(planned[0])
    exported_ms = now_ms()
    skipped: set[int] = set()
    while True:
        # The nonces name each part's place and the number of parts, so the parts are known
        # first; one left empty (the old Archiver's video reached past it) is dropped and the
        # export made again without it (rare: a part shorter than the handover).
        plan = [p for i, p in enumerate(planned) if i not in skipped]
        package_id = os.urandom(16)
        made: list[tuple[Part, EvidencePart]] = []
        previous_end: int | None = None
        for i in range(len(plan)):
            part = played_part(plan, i, previous_end)
            if part is None:
                skipped.add(planned.index(plan[i]))
                break
            request = StreamRequest(
                part_nonce(package_id, camera, from_ms, to_ms, i + 1, len(plan)), (camera,),
                Mode.PLAYBACK, part.from_ms, part.to_ms)
            session, login = site.reach(part)
            site.current = (part.archiver, login)
            try:
                exported = evidence_part(session, identity, login, request,
                                         recipient=recipient, exported_ms=exported_ms)
            except NoRecording as exc:
                if not nothing_at_the_end(exc, part, previous_end):
                    raise
                # No video at the instant --to, where the last part's ended: dropped as above.
                skipped.add(planned.index(plan[i]))
                break
            made.append((part, exported))
            if exported.verified.last_ms is not None:
                previous_end = exported.verified.last_ms
        else:
            break
        if len(planned) - len(skipped) < 2:
            # Only the first Archiver has video in the range after all (the next one's share
            # held none): its one-part package, as for a range it alone recorded; it answers
            # the whole range with what it holds, the video play gives. (Before: refused,
            # "export it again", which found the same.)
            return one_archiver(planned[0])
    files = build_parts_package(
        camera=camera, from_ms=from_ms, to_ms=to_ms, package_id=package_id,
        parts=[PackagePart(part.archiver, exported.files) for part, exported in made],
        exported_ms=exported_ms)
    return ExportAcross(output, write_zip(output, files), made, sealed_to)


# --- access grants ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GrantPart:
    """One part's grant, made on the Archiver that recorded the part."""

    part: Part
    made: GrantMade


def grant_across(site: Site, identity: Identity, camera: str, from_ms: int, to_ms: int,
                 recipient: Recipient, *, note: str | None = None) -> list[GrantPart]:
    """Grant [from_ms, to_ms] of ``camera`` to ``recipient``: one grant per part, each made
    from that part's verified stream on the Archiver that recorded it (which checks the keys
    against its own index and the grantor's chain records), so the grantee gets each part's
    keys from its own Archiver. One part: one grant, as before."""
    planned = site.parts(camera, from_ms, to_ms)
    grants: list[GrantPart] = []
    previous_end: int | None = None
    for i in range(len(planned)):
        part = played_part(planned, i, previous_end)
        if part is None:
            continue
        session, login = site.reach(part)
        site.current = (part.archiver, login)
        what = note if len(planned) == 1 else (
            f"part {i + 1} of {len(planned)} (recorded by {part.archiver})"
            + (f": {note}" if note else ""))
        try:
            made = make_grant_for(session, identity, login, camera, part.from_ms, part.to_ms,
                                  recipient, note=what)
        except NoRecording as exc:
            if nothing_at_the_end(exc, part, previous_end):
                continue  # no video at the instant --to, where the last part's ended
            raise
        grants.append(GrantPart(part, made))
        if made.verified.last_ms is not None:
            previous_end = made.verified.last_ms
    return grants


@dataclass(frozen=True)
class OpenedPart:
    """A grant opened on the grantee's token, and the Archiver of the site that recorded its
    range (the one its keys open)."""

    part: Part
    opened: OpenedGrantRange


def open_grants(site: Site, identity: Identity, grant_ids: Sequence[str], *,
                from_ms: int | None = None, to_ms: int | None = None) -> list[OpenedPart]:
    """Open the grants of one range across Archivers (one grant per part, given in any order)
    and match each to the Archiver that recorded it: sorted by range, of one camera, following
    one another, as many as the site has parts there. ``from_ms``/``to_ms`` narrow the range
    (inside the granted one)."""
    opened = sorted((open_grant(site.entry, identity, g) for g in grant_ids),
                    key=lambda o: o.granted_from_ms)
    camera = opened[0].camera
    if any(o.camera != camera for o in opened):
        raise UsageError("The grants are of different cameras; play each on its own.")
    for a, b in itertools.pairwise(opened):
        if not a.granted_from_ms < b.granted_from_ms <= a.granted_to_ms + 1:
            raise UsageError(f"Grants {a.grant_id} and {b.grant_id} do not follow one another "
                             "(the parts of one range do); play each on its own.")
    start, end = opened[0].granted_from_ms, opened[-1].granted_to_ms
    want_from = start if from_ms is None else from_ms
    want_to = end if to_ms is None else to_ms
    if want_from < start or want_to > end or want_to < want_from:
        raise UsageError("The range asked lies outside the grants' range.")
    # Where the grants' range was recorded, as the grantor planned it (the grantee may watch
    # no camera: the placements come with its grants, client.site.plan_parts cuts them).
    found: dict[tuple[str, int], PlacementView] = {}
    for grant in opened:
        for p in site.entry.grant_placements(grant.grant_id) or ():
            found[(p.archiver, p.since_ms)] = p
    parts = plan_parts(sorted(found.values(), key=lambda p: p.since_ms) or None,
                       site.entry_name, start, end)
    if len(parts) != len(opened):
        raise UsageError(f"The site recorded camera {camera} by {len(parts)} Archiver(s) in the "
                         f"grants' range, but {len(opened)} grant(s) were given: give one grant "
                         "per part (as 'fusion-client grant' made them).")
    out = []
    for part, grant in zip(parts, opened, strict=True):
        lo = max(want_from, grant.granted_from_ms)
        hi = min(want_to, grant.granted_to_ms)
        if lo > hi:
            continue
        narrowed = OpenedGrantRange(grant.grant_id, grant.camera, grant.granted_from_ms,
                                    grant.granted_to_ms, lo, hi, grant.keys)
        out.append(OpenedPart(part, narrowed))
    return out


def play_grants(site: Site, identity: Identity, opened: Sequence[OpenedPart],
                output: Output) -> list[tuple[OpenedPart, VerifiedRange]]:
    """Play each opened grant's range at the Archiver that recorded it, verified against that
    Archiver's signer, into ``output`` (each part's video after the one before)."""
    played = []
    previous_end: int | None = None
    for item in opened:
        grant = item.opened
        if previous_end is not None and grant.from_ms <= previous_end:
            # The old Archiver's part reaches into the next: what it played is not played again.
            # (client.site.start_after: as play and the grantor's parts cut it.)
            grant = OpenedGrantRange(grant.grant_id, grant.camera, grant.granted_from_ms,
                                     grant.granted_to_ms,
                                     start_after(previous_end, grant.to_ms), grant.to_ms,
                                     grant.keys)
            if grant.from_ms > grant.to_ms:
                continue
        session, login = site.reach(item.part)
        site.current = (item.part.archiver, login)
        verified = play_grant(session, identity, login, grant, output=PartOutput(output))
        played.append((OpenedPart(item.part, grant), verified))
        if verified.last_ms is not None:
            previous_end = verified.last_ms
    return played
