"""A site of several Archivers, as the viewer reaches it (issue 21, item 3).

The viewer talks to one Archiver (the *entry*). When another Archiver of the site holds the
range asked for, the entry answers 307 with the holder's name and URL; a range recorded by
several (a camera moved) is played part by part, each part asked of the entry and followed to
its holder. Following is careful, never blind:

- the target must be an Archiver the site lists (the registry, ``GET /v1/site/archivers``),
  at exactly the URL listed, and the redirect must keep the request's path and query;
- its HTTPS is verified under the same trust as the entry's (``--tls-ca``);
- its signing certificate must be pinned for that URL (known_archivers, e.g. pinned once with
  ``--archiver-cert``) or issued by the site CA (``--site-ca``: ``trust_followed``, the one
  place that decides); never trusted on first use on another Archiver's word;
- the viewer logs in there with the same open token (the PIN was asked once; never retried).

Each part's stream is verified against its own signer, and the switch from one Archiver to the
next is reported at the signed edges: the old one's last segment end, the new one's first
segment start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from client.logins import Login, stream
from client.pinning import KnownArchivers, PinDecision, PinOutcome, check_archiver
from client.session import (
    ArchiverSession,
    HeldElsewhere,
    LoginResult,
    NoRecording,
    PlacementView,
    RecordingExpired,
)
from keyservice.errors import ArchiverMismatch, RequestRefused, UsageError
from keyservice.identity import Identity, fingerprint
from keyservice.records import FrozenRecord
from keyservice.request_policy import StreamRequest
from keyservice.timespec import format_duration, format_ms

if TYPE_CHECKING:
    from cryptography import x509

    from client.answers import SiteArchiver

__all__ = ["HANDOVER_MS", "FollowCheck", "Part", "Site", "Switch", "UntrustedArchiver",
           "nothing_at_the_end", "plan_parts", "played_part", "start_after", "trust_followed"]

# Decides whether the signing certificate a followed Archiver presents at ``url`` is the
# site's; returns how (a PinDecision), raises ArchiverMismatch otherwise.
FollowCheck = Callable[[str, "x509.Certificate"], PinDecision]


class UntrustedArchiver(ArchiverMismatch):
    """A redirect to an Archiver the viewer does not follow: not in the site's list, not at
    the listed URL, or with a signing certificate neither pinned nor under the site CA."""


# How long after the directory's move time the old Archiver may still record the camera: it
# re-reads the cameras it holds every 2 s, and a pulled camera's new Archiver waits up to 20 s
# for it to let go (archiver/registry.py). What it recorded then is the camera's video too.
HANDOVER_MS = 30_000


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Part(FrozenRecord):
    """One stretch of a range and the Archiver that recorded it (``entry``: the one asked)."""

    archiver: str
    from_ms: int
    to_ms: int
    entry: bool
    url: str | None = None  # the registry's URL of its Archiver
    # A redundant camera's part: every Archiver holding a copy (name, URL), in the camera's
    # order; ``archiver`` is the copy to play (the entry's if it holds one, else the first).
    copies: tuple[tuple[str, str | None], ...] = ()
    # Another Archiver's recording the entry consolidated (issue 22, item 4): ``stream_from``
    # plays it from the entry, verified against ``archiver``'s certificate (END against the
    # entry's); evidence, grants and the browser still reach ``archiver``.
    consolidated: bool = False


@dataclass(eq=False, repr=False)  # frozen, eq, hash, repr: FrozenRecord's
class Switch(FrozenRecord):
    """Where playing went from one Archiver to the next, at signed edges: ``last_end_ms`` is
    the end of the old one's last verified segment, ``first_start_ms`` the start of the new
    one's first (None: that part had no video)."""

    from_archiver: str
    to_archiver: str
    last_end_ms: int | None
    first_start_ms: int | None

    def describe(self) -> str:
        """The switch at its signed edges, for a person (play, evidence, grants, the page)."""
        old = (f"{self.from_archiver}'s last segment ends {format_ms(self.last_end_ms)} "
               "(signed)" if self.last_end_ms is not None else f"{self.from_archiver} had no "
               "video in its part")
        new = (f"{self.to_archiver}'s first segment starts {format_ms(self.first_start_ms)} "
               "(signed)" if self.first_start_ms is not None else f"{self.to_archiver} had "
               "no video in its part")
        between = ""
        if self.last_end_ms is not None and self.first_start_ms is not None:
            between = (f"; {format_duration(max(0, self.first_start_ms - self.last_end_ms))} "
                       "between them")
        return f"switch from Archiver {self.from_archiver} to {self.to_archiver}: {old}; " \
               f"{new}{between}"


def plan_parts(placements: list[PlacementView] | None, entry: str | None, from_ms: int,
               to_ms: int) -> list[Part]:
    """The parts of [from_ms, to_ms] (inclusive), oldest first, cut where the directory says
    the camera moved: each instant belongs to exactly one part (the directory's placement times
    are the authority, so two Archivers never both answer for the same moment). No placements
    (an Archiver from before sites): one part, the entry's."""
    if not placements:
        return [Part(entry or "", from_ms, to_ms, True)]
    parts = []
    for p in placements:
        start = max(from_ms, p.since_ms)
        end = to_ms if p.until_ms is None else min(to_ms, p.until_ms - 1)
        if start > end:
            continue
        if len(p.copies) > 1:
            # Redundant: the copy of the Archiver asked, if it holds one (no redirect, no
            # second login), else the first; client/copies.py fills its gaps from the others.
            urls = dict(p.copies)
            mine = entry if entry in urls else p.copies[0][0]
            parts.append(Part(mine, start, end, mine == entry, urls[mine], p.copies))
        else:
            # Consolidated at the entry (issue 22, item 4): ``stream_from`` plays it there, as
            # its Archiver signed it; everything else still reaches its Archiver.
            parts.append(Part(p.archiver, start, end, p.archiver == entry, p.url,
                              consolidated=p.copy_here and p.archiver != entry))
    return parts or [Part(entry or "", from_ms, to_ms, True)]


def played_part(parts: Sequence[Part], i: int, previous_end: int | None) -> Part | None:
    """The range part ``i`` of ``parts`` (plan_parts) is played over, as play, evidence, grants
    and the web page all ask it: the directory's move time cuts the plan, but the old Archiver
    records until it notices the move, so each part but the last reaches HANDOVER_MS into the
    next, and the next starts just after the old one's signed video ended (``previous_end``:
    the last end of video played so far, see ``start_after``; a camera's segments follow one
    another, so nothing is played twice and nothing recorded is left out). None: nothing is
    left of this part (the old Archiver's video reached past it)."""
    planned = parts[i]
    to_ms = planned.to_ms if i == len(parts) - 1 else min(
        parts[-1].to_ms, parts[i + 1].from_ms + HANDOVER_MS)
    from_ms = planned.from_ms if previous_end is None else start_after(previous_end, to_ms)
    return None if from_ms > to_ms else replace(planned, from_ms=from_ms, to_ms=to_ms)


def start_after(previous_end: int, to_ms: int) -> int:
    """Where the next Archiver's share of a range ending at ``to_ms`` (inclusive) starts, after
    verified video up to ``previous_end`` (a signed segment end: the first instant that video
    does not hold). An Archiver answers [from, to] with every segment overlapping it, both ends
    inclusive, so asking from ``previous_end + 1`` leaves out a segment of the next Archiver
    that ends where the played video ends (it repeats it). But when the played video ends
    exactly at ``to_ms``, the instant ``to_ms`` is still unplayed: the next Archiver's segment
    holding it (one starting at --to) is in the range, as its single play includes it, so that
    share is [to_ms, to_ms] (an empty [to_ms + 1, to_ms] would leave it out)."""
    return to_ms if previous_end == to_ms else previous_end + 1


def nothing_at_the_end(exc: BaseException, part: Part, previous_end: int | None) -> bool:
    """Whether ``exc``, raised asking ``part`` (played_part's), means only that the next
    Archiver has no video at the instant --to where the played video ended (``start_after``'s
    [to, to] share: often a gap at the switch). That share then holds no video, as before it
    was not asked at all; anything else (expired video, any other refusal) is a failure."""
    return (isinstance(exc, NoRecording) and not isinstance(exc, RecordingExpired)
            and previous_end is not None and part.from_ms == part.to_ms == previous_end)


def trust_followed(store: KnownArchivers,
                   site_ca: Sequence[x509.Certificate] = ()) -> FollowCheck:
    """The check of a followed Archiver's signing certificate. With ``site_ca``
    (``--site-ca``): client.pinning.check_archiver's rule (issued by the site CA, and a pin
    for the URL, if there is one, must match too). Without: the pin for its URL (a mismatch
    is loud), else refused: another Archiver's redirect is no first use to trust."""

    def check(url: str, cert: x509.Certificate) -> PinDecision:
        if site_ca:
            return check_archiver(url, cert, store=store, allow_first_use=False,
                                  site_ca=site_ca)
        presented = fingerprint(cert)
        pinned = store.lookup(url)
        if pinned is not None:
            if pinned != presented:
                raise UntrustedArchiver(
                    f"The Archiver at {url}, where the site sent this request, presented "
                    f"signing certificate sha256 {presented.hex()}, but {store.path} pins "
                    f"sha256 {pinned.hex()}; someone may be impersonating it.",
                    "Nothing was decrypted. If its key really changed, pin the new certificate "
                    "with --archiver URL --archiver-cert FILE.")
            return PinDecision(PinOutcome.MATCHED, presented, store.path)
        raise UntrustedArchiver(
            f"The site sent this request to the Archiver at {url}, whose signing certificate "
            f"(sha256 {presented.hex()}, {cert.subject.rfc4514_string()}) is neither pinned "
            "nor issued by a site CA given with --site-ca; refused.",
            f"Nothing was sent to it. Pin it once (fusion-client cameras --archiver {url} "
            "--archiver-cert FILE) or give --site-ca.")

    return check


class Site:
    """The site reached through one logged-in entry Archiver: follows its redirects (checked,
    logging in with the same token), and remembers the Archiver that answered last."""

    def __init__(self, entry: ArchiverSession, login: Login, identity: Identity, *,
                 check: FollowCheck) -> None:
        self.entry = entry
        self.entry_login = login
        self.identity = identity
        self._check = check
        self._archivers: list[SiteArchiver] | None = None
        self._sessions: dict[str, tuple[ArchiverSession, Login]] = {}
        self._stack = ExitStack()
        self._entry_name: str | None = None
        self._named = False
        self._lock = threading.Lock()  # the web viewer follows from several threads
        # The Archiver whose stream is being read (its login: the signer to verify against).
        self.current: tuple[str, Login] = (entry.url, login)
        # Playing a consolidated part: the Archiver that recorded and signed it (listed).
        self.content_signer: SiteArchiver | None = None
        self.logins = 0  # logins to followed Archivers (one token operation each)

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sessions to followed Archivers (not the entry's: the caller's)."""
        self._stack.close()

    @property
    def entry_name(self) -> str | None:
        """The entry Archiver's name in the site (None: an Archiver from before sites)."""
        if not self._named:
            self._entry_name, self._named = self.entry.name(), True
        return self._entry_name

    def archivers(self) -> list[SiteArchiver]:
        """The site's Archivers, as the entry lists them (asked once)."""
        if self._archivers is None:
            self._archivers = self.entry.site_archivers()
        return self._archivers

    def parts(self, camera: str, from_ms: int, to_ms: int) -> list[Part]:
        """[from_ms, to_ms] of ``camera`` cut into parts by the Archivers that recorded it."""
        placements, name = self.entry.placements_and_name(camera, from_ms, to_ms)
        if name is not None and not self._named:
            # The answer names the entry: no second round trip for its name (start-up).
            self._entry_name, self._named = name, True
        return plan_parts(placements, self.entry_name, from_ms, to_ms)

    def holder(self, camera: str, from_ms: int, to_ms: int,
               what: str) -> tuple[ArchiverSession, Login]:
        """The session (logged in, checked) to the one Archiver that recorded [from_ms, to_ms]
        of ``camera``; UsageError naming the parts if several did (``what`` cannot span them:
        e.g. "an evidence package holds one Archiver's signed stream")."""
        parts = self.parts(camera, from_ms, to_ms)
        if len(parts) > 1:
            from keyservice.timespec import format_ms
            raise UsageError(
                f"Camera {camera} was recorded by several Archivers in this range ("
                + ", ".join(f"{p.archiver} {format_ms(p.from_ms)} .. {format_ms(p.to_ms)}"
                            for p in parts)
                + f"); {what}: do each part on its own.")
        return self.reach(parts[0])

    def signer_fingerprint(self) -> bytes:
        """The signing certificate the stream being read must carry: the answering Archiver's."""
        return self.current[1].archiver_fingerprint

    def follow(self, held: HeldElsewhere) -> tuple[ArchiverSession, Login]:
        """The session (logged in) to the Archiver a 307 names, after checking it (see the
        module's docstring)."""
        url = held.url.rstrip("/")
        target = self._listed(held.archiver, url, f"sent this request to {held.archiver!r} "
                              f"at {held.url}")
        if held.location != url + held.asked:
            raise UntrustedArchiver(
                f"The Archiver at {self.entry.url} redirected to {held.location!r}, not to the "
                f"same request at {held.archiver}'s URL {url}; refused.",
                "Nothing was sent there.")
        return self._logged_in(target)

    def reach(self, part: Part) -> tuple[ArchiverSession, Login]:
        """The session (logged in) to the Archiver that recorded ``part`` (the entry's own
        for its parts), checked as a redirect is."""
        if part.entry:
            return self.entry, self.entry_login
        url = (part.url or "").rstrip("/")
        return self._logged_in(self._listed(part.archiver, url, f"named {part.archiver!r} at "
                                            f"{part.url} as the recorder of the range"))

    def _listed(self, archiver: str, url: str, what: str) -> SiteArchiver:
        listed = {a.url: a for a in self.archivers()}
        target = listed.get(url)
        if target is None or target.name != archiver:
            known = ", ".join(f"{a.name} ({a.url})" for a in listed.values()) or "none"
            raise UntrustedArchiver(
                f"The Archiver at {self.entry.url} {what}, which is not an Archiver of the "
                f"site (the site lists: {known}); refused.",
                "Nothing was sent there. Ask the site's admin.")
        return target

    def _logged_in(self, target: SiteArchiver) -> tuple[ArchiverSession, Login]:
        url = target.url
        with self._lock:
            if url in self._sessions:
                return self._sessions[url]
            if urlsplit(url).scheme != urlsplit(self.entry.url).scheme:
                raise UntrustedArchiver(
                    f"The site sent this request from {self.entry.url} to {url}: another "
                    "scheme (http/https) than the entry's; refused.", "Nothing was sent there.")
            session = self._stack.enter_context(ArchiverSession(url, trust=self.entry.trust,
                                                                timeout=self.entry.timeout))
            decisions: list[PinDecision] = []

            def check(cert: x509.Certificate) -> None:
                decisions.append(self._check(url, cert))
                registered = fingerprint(target.certificate)
                if fingerprint(cert) != registered:
                    raise UntrustedArchiver(
                        f"The Archiver at {url} presented signing certificate sha256 "
                        f"{fingerprint(cert).hex()}, not the one the site registered for "
                        f"{target.name} (sha256 {registered.hex()}); refused.",
                        "Nothing was decrypted.")

            result: LoginResult = session.login(self.identity, check)
            self.logins += 1
            login = Login(url, result, decisions[-1])
            self._sessions[url] = (session, login)
            return session, login

    @contextmanager
    def stream_from(self, part: Part, request: StreamRequest) -> Iterator[Iterator[bytes]]:
        """``client.viewer.stream`` straight to the Archiver that recorded ``part`` (no
        redirect: a request that reaches into the next part's time, for the old Archiver's
        last seconds, would be answered by whichever Archiver was asked)."""
        # A consolidated part is asked of the entry, which holds it as its Archiver signed it.
        session, login = ((self.entry, self.entry_login) if part.consolidated
                          else self.reach(part))
        self.current = (part.archiver, login)
        self.content_signer = None
        self.expect_consolidated(part)
        with stream(session, request,
                    copy_of=part.archiver if part.consolidated else None) as chunks:
            yield chunks

    def expect_consolidated(self, part: Part) -> None:
        """A consolidated part is about to be read: its signer must be the Archiver the site
        lists for it, at its listed URL, trusted as a followed one is (pinned there, or the
        site CA's)."""
        if part.consolidated:
            self.content_signer = self._listed(part.archiver, (part.url or "").rstrip("/"),
                                               f"named {part.archiver!r} at {part.url} as the "
                                               "signer of a consolidated part")

    def check_stream_signer(self, cert: x509.Certificate) -> None:
        """The reader's check of each certificate a stream names: the answering Archiver's
        (logged in to), or, in a consolidated part, the listed signer's (trusted as a followed
        Archiver: its pin or the site CA); anything else is refused."""
        if fingerprint(cert) == self.signer_fingerprint():
            return
        signer = self.content_signer
        if signer is not None and fingerprint(cert) == fingerprint(signer.certificate):
            self._check(signer.url, cert)
            return
        raise ArchiverMismatch(
            f"The stream names Archiver certificate sha256 {fingerprint(cert).hex()}, neither "
            f"the answering Archiver's (sha256 {self.signer_fingerprint().hex()}) nor the "
            "signer of a consolidated part the site lists; nothing was decrypted.")

    @contextmanager
    def stream(self, request: StreamRequest, *,
               grant_id: str | None = None) -> Iterator[Iterator[bytes]]:
        """``client.viewer.stream`` on the entry, following one checked redirect to the
        Archiver that holds the range; ``current`` names the one answering (a second redirect
        is refused: a loop)."""
        self.current = (self.entry_name or self.entry.url, self.entry_login)
        try:
            with stream(self.entry, request, grant_id=grant_id) as chunks:
                yield chunks
            return
        except HeldElsewhere as held:
            session, login = self.follow(held)
            self.current = (held.archiver, login)
        try:
            with stream(session, request, grant_id=grant_id) as chunks:
                yield chunks
        except HeldElsewhere as again:
            raise RequestRefused(
                f"The Archiver {self.current[0]} sent the request on again, to "
                f"{again.archiver}; refused (the site's directory disagrees with itself: try "
                "again in a moment).") from None
