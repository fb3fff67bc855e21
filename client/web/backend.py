"""What the viewer page may ask for, done with the client library: camera list, verified streams
(live or a recorded range) turned into MSE-ready fragments, and verified exports to files.

One process serves one viewer identity: the token is opened and logged in to once (the PIN is
asked in the terminal, never by the page), and every stream is verified by ``client.player``
before a byte of it is remuxed. A stream that fails verification stops there with the reason.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from client.player import NOT_AUTHORIZED, DiscardOutput, FileOutput, Gap, Player
from client.session import (
    ArchiverSession,
    CameraView,
    HeldElsewhere,
    LoginRefused,
    LoginResult,
    NoRecording,
    RangeSpansArchivers,
    live_request,
    playback_request,
)
from client.site import FollowCheck, Part, Site, Switch, nothing_at_the_end, played_part
from client.viewer import Login, play_range, player_for, stream
from client.web.media import Remux, VideoInfo, remuxer
from keyservice.errors import RequestRefused
from keyservice.exitcodes import ExitCode
from keyservice.exits import failure
from keyservice.identity import Identity
from keyservice.reader import SegmentPlaintext, StreamRequest
from keyservice.timespec import format_ms

__all__ = ["BUSY_RETRY_S", "BUSY_WAIT_S", "LIVE_REQUEST_S", "RELOGIN_MARGIN_MS", "Export",
           "TileRequest", "ViewerBackend",
           "error_json", "gap_json", "recorded_ranges"]

# Live requests are re-issued by the page when they end; an hour keeps that rare.
LIVE_REQUEST_S = 3600
# Log in again this long before the Archiver's session expires (a token operation, no PIN).
RELOGIN_MARGIN_MS = 60_000
# The Archiver searches only a few requests of one viewer at a time and answers the others 429
# (Retry-After): a grid's tiles start together. A stream refused so, before any byte of it,
# asks again (a new request, with a new nonce) every BUSY_RETRY_S for up to BUSY_WAIT_S.
BUSY_RETRY_S = 1.0
BUSY_WAIT_S = 20.0
TOO_MANY_REQUESTS = 429

T = TypeVar("T")
Emit = Callable[[dict[str, Any] | bytes], None]


@dataclass(frozen=True)
class TileRequest:
    """What one tile of the page asks to play. The backend turns it into the request a fusion
    stream must answer (keyservice.reader.StreamRequest: a fresh nonce, camera, mode, range)."""

    camera: str
    live: bool
    from_ms: int = 0       # recorded range (ignored for live)
    to_ms: int = 0
    start_ms: int = 0      # segments captured before this are verified but not shown (a seek)

    def shows(self, event: SegmentPlaintext) -> bool:
        """Whether a verified segment is in the asked window: whole manifests come back, and a
        segment covers [capture_ms, capture_ms + duration_ms] (signed; without a duration, a
        point). A recorded window's next one starts where this one's last segment ends."""
        end = event.capture_ms + event.duration_ms
        if (end <= self.start_ms) if event.duration_ms else (event.capture_ms < self.start_ms):
            return False
        return self.live or event.capture_ms <= self.to_ms


def recorded_ranges(view: CameraView, gaps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The recorded ranges of a camera for the timeline: its first .. last segment, split at
    the gaps the Archiver's index reports. Gaps the signed stream shows while playing are
    added by the page."""
    if view.first_ms is None or view.last_ms is None:
        return []
    ranges, start = [], view.first_ms
    for gap_from, gap_to in sorted(gaps):
        if gap_from > start:
            ranges.append((start, min(gap_from, view.last_ms)))
        start = max(start, gap_to)
    if start < view.last_ms:
        ranges.append((start, view.last_ms))
    return ranges


def gap_json(gap: Gap) -> dict[str, Any]:
    """A gap as the page's JSON event."""
    return {"type": "gap", "kind": "unauthorized" if gap.kind == NOT_AUTHORIZED else "none",
            "from_ms": gap.from_ms, "to_ms": gap.to_ms, "segments": gap.segments,
            "text": gap.describe()}


def error_json(exc: BaseException) -> dict[str, Any]:
    """A failure as the page gets it: the CLIs' exit code (keyservice.exitcodes.ExitCode), its
    name and the one sentence the CLIs print. The same shape as the Archiver's own errors
    (``{"error": name, "message": sentence}``), plus the number."""
    message, number = failure(exc)
    try:
        code = ExitCode(number)
    except ValueError:  # every error class uses the enum (tests/test_exit_codes.py)
        code = ExitCode.UNEXPECTED
    return {"type": "error", "code": int(code), "error": code.name, "message": message}


@dataclass
class Export:
    """One export to a file the page started, and how far it got."""

    id: int
    camera: str
    from_ms: int
    to_ms: int
    path: Path
    state: str = "running"          # running | done | failed
    progress: float = 0.0
    segments: int = 0
    message: str = ""
    evidence: Path | None = None
    gaps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The export as the page's JSON."""
        return {"id": self.id, "camera": self.camera, "from_ms": self.from_ms,
                "to_ms": self.to_ms, "state": self.state, "progress": round(self.progress, 3),
                "segments": self.segments, "message": self.message, "file": self.path.name,
                "gaps": self.gaps}


class ViewerBackend:
    """The logged-in viewer: one Archiver, one identity, one pinned Archiver certificate."""

    def __init__(self, session: ArchiverSession, identity: Identity, login: Login | LoginResult,
                 relogin: Callable[[], Login | LoginResult], export_dir: Path,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 remux: Remux | None = None, follow: FollowCheck | None = None) -> None:
        """remux: how a verified segment becomes fMP4 (client.web.media.remuxer() by
        default: in-process PyAV when installed). ``follow``: how a followed Archiver of the
        site is trusted (client.site.trust_followed); None: redirects are not followed."""
        self.session = session
        self.remux = remux if remux is not None else remuxer()
        self.identity = identity
        self.login = login.result if isinstance(login, Login) else login
        self._relogin = relogin
        self._login_lock = threading.Lock()
        self.export_dir = export_dir
        self.clock = clock
        self._margin_ms = self._margin(self.login)
        self._exports: dict[int, Export] = {}
        self._export_ids = itertools.count(1)
        # Another Archiver of the site holding a camera: its redirect followed, checked.
        self._site = Site(session, login if isinstance(login, Login) else Login(
            session.url, login, None), identity,  # type: ignore[arg-type]
            check=follow) if follow is not None else None

    def close(self) -> None:
        """Close the sessions to other Archivers of the site (the entry's is the caller's)."""
        if self._site is not None:
            self._site.close()

    def _follow(self, held: HeldElsewhere) -> tuple[ArchiverSession, LoginResult]:
        """A connection of its own to the Archiver a redirect names, after the site's checks
        (client/site.py), and the login there (its signer)."""
        if self._site is None:
            raise held
        session, login = self._site.follow(held)
        child = session.sibling()
        return child, login.result

    # --- the Archiver session ------------------------------------------------------------
    def _margin(self, login: LoginResult) -> int:
        """How long before expiry to log in again: a minute, or a quarter of a short session."""
        return min(RELOGIN_MARGIN_MS, max(0, (login.expires_ms - self.clock()) // 4))

    def _fresh(self, force: bool = False) -> None:
        with self._login_lock:
            if force or self.login.expires_ms - self.clock() < self._margin_ms:
                # The token is logged in already: this proof costs one token operation and
                # never asks for (or retries) a PIN.
                again = self._relogin()
                self.login = again.result if isinstance(again, Login) else again
                self._margin_ms = self._margin(self.login)

    def _with_session(self, call: Callable[[], T]) -> T:
        self._fresh()
        try:
            return call()
        except LoginRefused:
            # The Archiver forgot the session (restart, expiry): prove possession once more.
            self._fresh(force=True)
            return call()

    def _stream_session(self) -> ArchiverSession:
        """A connection of its own for one stream, so that stopping the stream can close it
        from another thread; it carries the current Archiver session (no new login)."""
        self._fresh()
        # Same session and same trust (--tls-ca) as the login, own connection.
        child = self.session.sibling()
        child.login_result = self.login
        return child

    def cameras(self) -> list[dict[str, Any]]:
        """The cameras this viewer may watch, with recorded ranges and gaps, for the timeline."""
        out = []
        for view in self._with_session(self.session.cameras):
            gaps: list[tuple[int, int]] = []
            if view.first_ms is not None and view.last_ms is not None:
                try:
                    gaps = self._with_session(partial(self.session.gaps, view.name,
                                                      view.first_ms, view.last_ms))
                except (HeldElsewhere, RangeSpansArchivers):
                    gaps = []  # the range is (partly) another Archiver's: it tells its gaps
            since = (f"; last video {format_ms(view.last_ms)}"
                     if view.last_ms is not None and view.state != "receiving" else "")
            out.append({"name": view.name, "first_ms": view.first_ms, "last_ms": view.last_ms,
                        "segments": view.segments, "ranges": recorded_ranges(view, gaps),
                        "gaps": gaps, "state": view.state, "health": view.state + since,
                        "archiver": view.archiver})
        return out

    # --- streams to the page ---------------------------------------------------------------
    def stream(self, request: TileRequest, emit: Emit, stopped: threading.Event,
               on_session: Callable[[ArchiverSession], None] = lambda s: None) -> None:
        """Verify, decrypt and remux one stream, emitting JSON events and fMP4 chunks in
        order; ends with an "end" or "error" event (never raises). A recorded range across a
        change of Archiver is played part by part (``_stream_parts``)."""
        site = self._site
        if not request.live and site is not None:
            try:
                # Only a site of several Archivers (its list is asked once) can have a range
                # across a change of Archiver: a standalone Archiver's streams go as before.
                parts = self._with_session(partial(
                    site.parts, request.camera, request.from_ms, request.to_ms)) \
                    if len(self._with_session(site.archivers)) > 1 else []
            except BaseException as exc:  # reported to the page, as a stream's failure is
                if not stopped.is_set():
                    emit(error_json(exc))
                if not isinstance(exc, Exception):
                    raise
                return
            if len(parts) > 1:
                self._stream_parts(request, parts, emit, stopped, on_session)
                return
        info: VideoInfo | None = None
        shown = 0

        def on_segment(event: SegmentPlaintext) -> None:
            nonlocal info, shown
            if stopped.is_set() or not request.shows(event):
                return
            info, media = self._emit_segment(event, emit, info)
            shown += media

        def ask(signer: LoginResult | None = None) -> tuple[StreamRequest, Player]:
            # A fresh nonce per request: the stream must answer exactly it (issue 12).
            asked = (live_request(request.camera, LIVE_REQUEST_S) if request.live
                     else playback_request(request.camera, request.from_ms, request.to_ms))
            return asked, player_for(self.identity, signer or self.login, asked,
                                     DiscardOutput(), on_segment=on_segment)

        asked, player = ask()
        sent_gaps = 0

        def flush_gaps() -> None:
            nonlocal sent_gaps
            for gap in player.summary.gaps[sent_gaps:]:
                emit(gap_json(gap))
            sent_gaps = len(player.summary.gaps)

        child: ArchiverSession | None = None
        try:
            with ExitStack() as opened:
                busy_until = time.monotonic() + BUSY_WAIT_S
                while True:
                    child = self._stream_session()
                    on_session(child)
                    try:
                        chunks = opened.enter_context(stream(child, asked))
                        break
                    except HeldElsewhere as held:
                        # Held by another Archiver of the site: followed once, checked; the
                        # stream there is verified against that Archiver's signature.
                        child.close()
                        child, signer = self._follow(held)
                        on_session(child)
                        asked, player = ask(signer)
                        chunks = opened.enter_context(stream(child, asked))
                        break
                    except RequestRefused as exc:
                        if (exc.http_status != TOO_MANY_REQUESTS or stopped.is_set()
                                or time.monotonic() + BUSY_RETRY_S > busy_until):
                            raise
                    child.close()  # refused before any byte: nothing was verified or shown
                    if stopped.wait(BUSY_RETRY_S):
                        return
                    asked, player = ask()
                emit({"type": "start", "camera": request.camera, "live": request.live})
                for chunk in chunks:
                    if stopped.is_set():
                        return
                    player.feed(chunk)
                    flush_gaps()
            if stopped.is_set():
                return
            summary = player.finish()
            flush_gaps()
            emit({"type": "end", "segments": summary.segments, "shown": shown,
                  "last_ms": summary.last_ms, "verified": True,
                  "message": "verified signed end record"})
        except BaseException as exc:  # reported to the page; the viewer process keeps serving
            if stopped.is_set():
                return
            flush_gaps()
            event = error_json(exc)
            event["shown"] = shown
            event["where"] = player.where()
            emit(event)
            if not isinstance(exc, Exception):
                raise
        finally:
            if child is not None:
                child.close()

    def _emit_segment(self, event: SegmentPlaintext, emit: Emit,
                      info: VideoInfo | None) -> tuple[VideoInfo, bool]:
        """A verified segment to the page: the codec before the first one, its metadata, its
        fMP4; returns the stream's video info and whether media went (False: verified, but
        this browser cannot show it)."""
        remuxed = self.remux(event.data)
        if info is None:
            info = remuxed.info
            emit({"type": "codec", "codec": info.codec, "mime": info.mime,
                  "width": info.width, "height": info.height})
        meta = {"type": "segment", "seq": event.seq, "capture_ms": event.capture_ms,
                "duration_ms": event.duration_ms, "verified": True}
        if remuxed.fmp4 is None:
            emit({**meta, "media": False})
            return info, False
        emit({**meta, "media": True, "bytes": len(remuxed.fmp4)})
        emit(remuxed.fmp4)
        return info, True

    def _stream_parts(self, request: TileRequest, parts: list[Part], emit: Emit,
                      stopped: threading.Event,
                      on_session: Callable[[ArchiverSession], None]) -> None:
        """A recorded range across a change of Archiver, as one timeline: each part (the
        ranges ``play`` uses, client.site.played_part) streamed from the Archiver that recorded
        it and verified against that Archiver's signature, its segments emitted in order; at
        each switch a "switch" event and a gap of kind "switch" between the signed edges (the
        old Archiver's last segment end, the new one's first segment start)."""
        assert self._site is not None
        self._fresh()  # the entry's session (its parts are asked on it)
        info: VideoInfo | None = None
        shown = segments = 0
        last_ms: int | None = None
        player: Player | None = None
        child: ArchiverSession | None = None

        def on_segment(event: SegmentPlaintext) -> None:
            nonlocal info, shown
            if stopped.is_set() or not request.shows(event):
                return
            info, media = self._emit_segment(event, emit, info)
            shown += media

        try:
            emit({"type": "start", "camera": request.camera, "live": False,
                  "parts": [p.archiver for p in parts]})
            previous: tuple[Part, int | None] | None = None
            previous_end: int | None = None
            for i in range(len(parts)):
                part = played_part(parts, i, previous_end)
                if part is None:
                    continue
                session, login = self._site.reach(part)
                child = session.sibling()
                on_session(child)
                asked = playback_request(request.camera, part.from_ms, part.to_ms)
                player = player_for(self.identity, login.result, asked, DiscardOutput(),
                                    on_segment=on_segment)
                with ExitStack() as held:
                    try:
                        chunks = held.enter_context(stream(child, asked))
                    except NoRecording as exc:
                        if not nothing_at_the_end(exc, part, previous_end):
                            raise
                        # No video at the instant --to, where the last part's ended.
                        child.close()
                        child = None
                        continue
                    for chunk in chunks:
                        if stopped.is_set():
                            return
                        player.feed(chunk)
                if stopped.is_set():
                    return
                summary = player.finish()
                child.close()
                child = None
                if previous is not None:
                    switch = Switch(previous[0].archiver, part.archiver, previous[1],
                                    summary.first_ms)
                    text = switch.describe()
                    emit({"type": "switch", "from_archiver": switch.from_archiver,
                          "to_archiver": switch.to_archiver, "last_end_ms": switch.last_end_ms,
                          "first_start_ms": switch.first_start_ms, "text": text})
                    if switch.last_end_ms is not None and switch.first_start_ms is not None:
                        emit({"type": "gap", "kind": "switch", "from_ms": switch.last_end_ms,
                              "to_ms": switch.first_start_ms, "segments": 0, "text": text})
                for gap in summary.gaps:
                    # A part's edges at a switch are said once, as the switch.
                    at_switch = (summary.first_ms is not None and summary.last_ms is not None
                                 and ((i < len(parts) - 1 and gap.from_ms >= summary.last_ms)
                                      or (i > 0 and gap.to_ms <= summary.first_ms)))
                    if not at_switch:
                        emit(gap_json(gap))
                segments += summary.segments
                if summary.last_ms is not None:
                    previous_end = last_ms = summary.last_ms
                previous = (part, summary.last_ms)
            emit({"type": "end", "segments": segments, "shown": shown, "last_ms": last_ms,
                  "verified": True, "parts": len(parts),
                  "message": "verified each part's signed end record, each against its own "
                             "Archiver"})
        except BaseException as exc:  # reported to the page; the viewer process keeps serving
            if stopped.is_set():
                return
            event = error_json(exc)
            event["shown"] = shown
            event["where"] = player.where() if player is not None else ""
            emit(event)
            if not isinstance(exc, Exception):
                raise
        finally:
            if child is not None:
                child.close()

    # --- exports ---------------------------------------------------------------------------
    def start_export(self, camera: str, from_ms: int, to_ms: int) -> Export:
        """Start a verified export of a recorded range to a new file (in a thread)."""
        self.export_dir.mkdir(parents=True, exist_ok=True)
        stamp = "-".join(dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
                         for ms in (from_ms, to_ms))
        path = self.export_dir / f"{camera}-{stamp}.ts"
        for n in itertools.count(2):  # never replace an earlier export of the same range
            if not path.exists() and not path.with_suffix(".fusion").exists():
                break
            path = self.export_dir / f"{camera}-{stamp}-{n}.ts"
        export = Export(next(self._export_ids), camera, from_ms, to_ms, path)
        self._exports[export.id] = export
        threading.Thread(target=self._export, args=(export,), daemon=True,
                         name=f"export-{export.id}").start()
        return export

    def export(self, export_id: int) -> Export | None:
        """An export started earlier, or None."""
        return self._exports.get(export_id)

    def _export(self, export: Export) -> None:
        """The same guarantees as `fusion-client play -o FILE --save-stream`: the file gets its
        name only after the signed end record verified; otherwise it ends in .incomplete."""
        evidence: FileOutput | None = None
        span = max(1, export.to_ms - export.from_ms)

        def on_segment(event: SegmentPlaintext) -> None:
            export.segments += 1
            export.progress = min(1.0, max(0.0, (event.capture_ms - export.from_ms) / span))

        try:
            evidence = FileOutput(export.path.with_suffix(".fusion"))
            self._fresh()
            summary = play_range(self.session, self.identity, self.login, export.camera,
                                 export.from_ms, export.to_ms, output=export.path,
                                 on_segment=on_segment, on_chunk=evidence.write)
            export.evidence = evidence.commit()
            export.gaps = [g.describe() for g in summary.gaps]
            export.progress = 1.0
            export.message = (f"verified: {summary.segments} segment(s); signed end record "
                              f"checked; evidence in {export.evidence.name}")
            export.state = "done"
        except BaseException as exc:
            # play_range left the verified part as FILE.incomplete, if there was any.
            incomplete = export.path.with_name(export.path.name + ".incomplete")
            kept = incomplete if incomplete.exists() else None
            if evidence is not None:
                evidence.abort()
            export.message = error_json(exc)["message"] + (
                f" The verified part is in {kept.name}." if kept is not None else "")
            export.state = "failed"
            if not isinstance(exc, Exception):
                raise
