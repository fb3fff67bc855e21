"""The command line's side of a range recorded by several Archivers of the site (a camera moved,
issue 21): play the parts in order into one output, each part a stream of its own (its own
request and nonce, asked of the entry and followed to its holder), verified against its own
signer; report each part's signer and the switch between Archivers at the signed edges.

The output gets its final name only when every part verified; if one fails, the verified video
up to there is kept under a name that says so (as for one stream).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from client.player import Output, Summary, archiver_pin_check
from client.session import playback_request
from client.site import Part, Site, Switch
from keyservice.format import Mode
from keyservice.identity import Identity
from keyservice.timespec import format_duration, format_ms

__all__ = ["PartOutput", "play_parts", "switch_line"]


class PartOutput:
    """One part's view of the command's output: writes go through; committing or aborting is
    the whole command's, once every part is played."""

    def __init__(self, output: Output) -> None:
        self._output = output

    def write(self, data: bytes) -> None:
        """Write verified video to the command's output."""
        self._output.write(data)

    def commit(self) -> Path | None:
        """Nothing yet: the output is committed after the last part."""
        return None

    def abort(self) -> Path | None:
        """Nothing yet: the command aborts the output (keeping what verified)."""
        return None


def switch_line(switch: Switch) -> str:
    """The switch between two Archivers, at the signed edges, for a person."""
    old = (f"{switch.from_archiver}'s last segment ends {format_ms(switch.last_end_ms)} "
           "(signed)" if switch.last_end_ms is not None else f"{switch.from_archiver} had no "
           "video in its part")
    new = (f"{switch.to_archiver}'s first segment starts {format_ms(switch.first_start_ms)} "
           "(signed)" if switch.first_start_ms is not None else f"{switch.to_archiver} had no "
           "video in its part")
    between = ""
    if switch.last_end_ms is not None and switch.first_start_ms is not None:
        between = f"; {format_duration(max(0, switch.first_start_ms - switch.last_end_ms))} " \
                  "between them"
    return f"switch from Archiver {switch.from_archiver} to {switch.to_archiver}: {old}; " \
           f"{new}{between}"


def play_parts(site: Site, identity: Identity, camera: str, parts: list[Part], output: Output,
               *, quiet: bool, login_ops: Callable[[], int]) -> list[tuple[Part, Summary]]:
    """Play each part (client.playback.run_stream, one request each) into ``output``; commit
    it after the last, or abort it (keeping the verified part) and exit on a failure."""
    from client.playback import Progress, mib, operations, run_stream, say

    played: list[tuple[Part, Summary]] = []
    signers: list[str] = []
    try:
        for part in parts:
            request = playback_request(camera, part.from_ms, part.to_ms)
            assert request.mode == Mode.PLAYBACK

            def check(cert: object, _site: Site = site) -> None:
                archiver_pin_check(_site.signer_fingerprint())(cert)  # type: ignore[arg-type]

            summary = run_stream(
                identity=identity, output=PartOutput(output),
                save=None, fetch=lambda r=request: site.stream(r), check=check,
                progress=Progress(False, 0, 0), login_ops=login_ops, live=False, quiet=True,
                request=request)
            answered, login = site.current
            signers.append(f"{answered} (signing certificate sha256 "
                           f"{login.archiver_fingerprint.hex()[:16]}..., "
                           f"{login.result.archiver_certificate.subject.rfc4514_string()})")
            played.append((part, summary))
    except SystemExit:
        kept = output.abort()
        if kept is not None:
            say(f"the verified video of the parts played so far is in {kept}")
        raise
    final = output.commit()
    if quiet:
        return played
    for i, ((part, summary), signer) in enumerate(zip(played, signers, strict=True), 1):
        video = (f"{summary.segments} segment(s), {mib(summary.bytes)}, captured "
                 f"{format_ms(summary.first_ms)} .. {format_ms(summary.last_ms)}"
                 if summary.first_ms is not None and summary.last_ms is not None
                 else "no segments")
        say(f"part {i} of {len(played)}: {format_ms(part.from_ms)} .. {format_ms(part.to_ms)} "
            f"recorded by Archiver {part.archiver}, verified against {signer}: {video}")
        for gap in sorted(summary.gaps, key=lambda g: g.from_ms):
            say(f"  gap: {gap.describe()}")
        if i < len(played):
            nxt_part, nxt = played[i]
            say(switch_line(Switch(part.archiver, nxt_part.archiver, summary.last_ms,
                                   nxt.first_ms)))
    openers = sum(s.epoch_openings for _, s in played)
    say(f"token operations: {operations(identity)} ({login_ops()} login, {openers} epoch "
        "opener(s))")
    where = "complete (every part's signed end record verified)"
    say(where + (f"; video in {final}" if final is not None else "; video written to stdout"))
    return played
