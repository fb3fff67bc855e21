"""The command line's side of the viewer (shared by client/cli.py, grants.py, evidence.py):
logging in with messages, and what a stream command does from the first byte to the last:
progress, interruptions, the summary, and what to say when a stream fails (how much verified
video was kept, and where).

The work itself is the viewer library's (client/viewer.py); this module prints and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from client.logins import (  # not client.viewer: play does not load the whole library
    Login,
    Signer,
    load_certificate_file,
    load_site_ca,
    login,
    open_identity,
)
from client.pinning import KnownArchivers, PinDecision, PinOutcome
from client.player import (
    FileOutput,
    Gap,
    Output,
    OutputFailed,
    PartOutput,
    PipeOutput,
    Player,
    ReaderClosed,
    Summary,
    archiver_pin_check,
)
from client.preload import import_in_background
from client.session import ArchiverSession, playback_request
from client.site import Part, Site, Switch, nothing_at_the_end, played_part, trust_followed
from keyservice.errors import KeyServiceError, UsageError
from keyservice.exits import failure
from keyservice.format import Header, Mode
from keyservice.identity import Identity, fingerprint
from keyservice.request_policy import StreamRequest
from keyservice.text import printable
from keyservice.timespec import format_duration, format_ms

if TYPE_CHECKING:
    from cryptography import x509

    from client.copies import Selection, Stretch

# client.copies (a redundant camera's copies) is imported by play_copies, its only user: a
# play of one Archiver's range does not load it (issue 23: start-up).

__all__ = ["DeferredInterrupt", "PartOutput", "Progress", "describe_saved", "logged_in",
           "login_and_say", "mib", "open_output", "operations", "pin_message", "play_copies", "play_parts",
           "print_summary", "reader_closed", "recorded_part", "report_failure", "run_stream",
           "say", "signed_by", "stream_command", "switch_line", "token_line"]


def say(message: str) -> None:
    """One message on stderr, prefixed ``fusion-client:``, control characters escaped."""
    # Messages quote the Archiver, certificates and files: never let them drive the terminal.
    typer.echo(f"fusion-client: {printable(message)}", err=True)


def pin_message(url: str, decision: PinDecision) -> str | None:
    """What to tell the user about how the Archiver's certificate was trusted (None: it
    matched the pin, nothing to say)."""
    if decision.outcome is PinOutcome.FIRST_USE:
        return (f"trusting the Archiver at {url} on first use: certificate sha256 "
                f"{decision.fingerprint.hex()} (pinned in {decision.stored_in}); compare it "
                "with the fingerprint your admin gives you.")
    if decision.outcome is PinOutcome.SITE_CA:
        return (f"the Archiver at {url} presented {decision.subject} (sha256 "
                f"{decision.fingerprint.hex()}), issued by your site CA (--site-ca): accepted "
                "without a pin.")
    if decision.replaced is not None:
        return (f"replaced the pinned certificate of {url} (sha256 {decision.replaced.hex()}) "
                f"with the one given by --archiver-cert (sha256 {decision.fingerprint.hex()}).")
    return None


def login_and_say(session: ArchiverSession, identity: Identity,
                  explicit: x509.Certificate | None,
                  site_ca: Sequence[x509.Certificate] = ()) -> Login:
    """``client.viewer.login``, saying a first-use pin, a replaced pin or a site-CA
    acceptance on stderr."""
    result = login(session, identity, archiver_cert=explicit, site_ca=site_ca)
    message = pin_message(session.url, result.pin)
    if message is not None:
        say(message)
    return result


@contextmanager
def logged_in(url: str, token: str, archiver_cert: Path | None, tls_ca: Path | None,
              site_ca: Path | None = None) -> Iterator[tuple[ArchiverSession, Identity, Login]]:
    """A session to the Archiver at ``url``, the token's identity (PIN prompted if needed)
    and the login (``site_ca``: --site-ca), for the ``with`` block."""
    explicit = load_certificate_file(archiver_cert) if archiver_cert is not None else None
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(url, tls_ca=tls_ca))
        identity = stack.enter_context(open_identity(token, prompt=True))
        yield session, identity, login_and_say(session, identity, explicit, cas)


def open_output(target: str) -> Output:
    """The video's destination: a file (FILE.partial until verified), or '-' for standard
    output (never a terminal)."""
    if target == "-":
        if sys.stdout.isatty():
            raise UsageError("Refusing to write video to a terminal; pipe it "
                             "(... -o - | ffplay -) or give -o FILE.")
        return PipeOutput(sys.stdout.buffer)
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for the video.")
    if path.exists() and not path.is_file():  # a named pipe or a device: written as it comes
        try:
            return PipeOutput(open(path, "wb"), str(path), owned=True)
        except OSError as exc:
            raise OutputFailed(f"Cannot write {path}: {exc.strerror or exc}.") from None
    return FileOutput(path)


def operations(identity: Identity) -> int:
    """Token operations the identity has made so far (0 if it does not count them)."""
    return int(getattr(identity, "operations", 0))


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (never in logs or pipes)."""

    def __init__(self, enabled: bool, from_ms: int, to_ms: int) -> None:
        self._bar: Any = None
        self._from, self._to = from_ms, to_ms
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("decrypting", total=max(1, to_ms - from_ms))

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def segment(self, event: Any) -> None:
        """Move the bar to a verified segment's capture time."""
        if self._bar is not None:
            done = max(0, min(self._to, event.capture_ms) - self._from)
            self._bar.update(self._task, completed=done,
                             description=f"{event.camera} {format_ms(event.capture_ms)}")


def mib(n: int) -> str:
    """A byte count for a person (KiB or MiB)."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def token_line(login_ops: int, token_ops: int, epoch_openings: int) -> str:
    """The summary's line about token operations."""
    return (f"token operations: {token_ops} ({login_ops} login, {epoch_openings} epoch "
            "opener(s))")


def print_summary(summary: Summary, login_ops: int, token_ops: int, where: str) -> None:
    """The stream command's summary on stderr: segments, range, token operations, gaps."""
    if summary.segments:
        assert summary.first_ms is not None and summary.last_ms is not None
        say(f"{summary.segments} segment(s), {mib(summary.bytes)}, captured "
             f"{format_ms(summary.first_ms)} .. {format_ms(summary.last_ms)} "
             f"({format_duration(summary.last_ms - summary.first_ms)})")
    else:
        say("no segments")
    say(token_line(login_ops, token_ops, summary.epoch_openings))
    for gap in sorted(summary.gaps, key=lambda g: g.from_ms):
        say(f"gap: {gap.describe()}")
    say(where)


class DeferredInterrupt:
    """Ctrl-C while a segment is being written and counted takes effect right after it, so
    the summary and "output stops after ..." always match the bytes written."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Any = None

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum: int, frame: object) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self) -> Iterator[None]:
        """Defer Ctrl-C until the block (one segment written and counted) is done."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        # Reached only when the segment was written: an error in flight is not masked.
        if not self._depth and self._pending:
            self._pending = False
            raise KeyboardInterrupt


def run_stream(*, identity: Identity, output: Output, save: FileOutput | None,
                fetch: Callable[[], AbstractContextManager[Iterator[bytes]]],
                check: Callable[[x509.Certificate], None], progress: Progress,
                login_ops: Callable[[], int], live: bool, quiet: bool,
                request: StreamRequest | None, saved: bool = False,
                known_keys: Mapping[bytes, bytes] | None = None) -> Summary:
    """Feed the stream to the player; on success give the output its final name, on failure
    keep the verified part under a name that says so and say where it stops. ``request``:
    what was asked for, checked by the reader; None only for a saved stream (``saved``),
    whose header is then printed as what it is. Returns what was verified and written."""
    interrupts = DeferredInterrupt()
    if request is None:
        # `fusion-client open`: a saved stream, verified offline; it answered a past request.
        player = Player.for_saved_stream(identity, check, output, on_segment=progress.segment,
                                         critical=interrupts.critical)
    else:
        player = Player(identity, check, output, request=request, on_segment=progress.segment,
                        critical=interrupts.critical, known_keys=known_keys)
    stopped_by_user = False
    try:
        with interrupts, progress, fetch() as chunks:
            try:
                for chunk in chunks:
                    if save is not None:
                        save.write(chunk)
                    player.feed(chunk)
            except KeyboardInterrupt:
                if not live:
                    raise
                stopped_by_user = True  # live viewing ends when the viewer says so
        summary = player.summary if stopped_by_user else player.finish()
    except BaseException as exc:
        kept = output.abort()
        saved = save.abort() if save is not None else None
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, ReaderClosed):
            reader_closed(player, saved, quiet)
            raise SystemExit(ReaderClosed.exit_code) from None
        report_failure(exc, player, kept, saved, output)
        if not quiet:
            say(token_line(login_ops(), operations(identity), player.summary.epoch_openings))
        raise SystemExit(failure(exc)[1]) from None
    try:
        final = output.commit()
        saved_final = save.commit() if save is not None else None
    except OutputFailed as exc:
        output.abort()
        if save is not None:
            save.abort()
        say(str(exc))
        raise SystemExit(exc.exit_code) from None
    if not quiet:
        token_ops = operations(identity)
        if saved:
            where = ("verified saved stream (signed end record); it answered the request "
                     "described above, not a new one")
        elif stopped_by_user:
            where = "stopped by you (live; no end record)"
        elif live:
            where = "live stream ended (verified end record)"
        else:
            where = "complete (verified signed end record)"
        where += f"; video in {final}" if final is not None else "; video written to stdout"
        if saved_final is not None:
            where += f"; fusion stream in {saved_final}"
        if saved and player.header is not None:
            for line in describe_saved(player.header):
                say(line)
        elif player.header is not None:
            say(signed_by(player.header))
        print_summary(summary, login_ops(), token_ops, where)
    return summary


def signed_by(header: Header) -> str:
    """Which Archiver signed a verified stream: the certificate its header carries, whose key
    verified every manifest and the end record ("signed by CN=a1 (sha256 ...)")."""
    from cryptography import x509  # after the stream: the signer's names, for the user

    signer = Signer(x509.load_der_x509_certificate(header.archiver_cert_der))
    return f"signed by {_printable(str(signer))}, issued by {_printable(signer.issuer)}"


def describe_saved(header: Header) -> list[str]:
    """What a saved stream is, from its header (authenticated by the verified END record):
    it answered one request in the past, and says which."""
    from cryptography import x509

    archiver = x509.load_der_x509_certificate(header.archiver_cert_der)
    mode = "live" if header.mode == Mode.LIVE else "recording"
    return [
        f"saved {mode} stream of camera {', '.join(header.cameras)}, range "
        f"{format_ms(header.range_from_ms)} .. {format_ms(header.range_to_ms)}",
        f"made by Archiver {_printable(archiver.subject.rfc4514_string())} (certificate sha256 "
        f"{fingerprint(archiver).hex()}) at {format_ms(header.created_ms)}",
        f"request nonce {header.request_nonce.hex()}, request id {header.request_id.hex()}",
    ]


def _printable(text: str) -> str:
    """Control characters escaped: a certificate subject must not drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def reader_closed(player: Player, saved: Path | None, quiet: bool) -> None:
    """The reader of standard output stopped reading: not an error (exit 0), said quietly.
    Everything it was sent was verified; it simply did not take the rest."""
    # Whatever is still buffered for the closed pipe must not fail again at exit
    # (Python would print "Exception ignored ... BrokenPipeError").
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    if quiet:
        return
    segments = player.summary.segments
    say(f"the program reading standard output closed it after {segments} whole verified "
        f"segment{'' if segments == 1 else 's'}; stopped there (not an error: exit 0).")
    if saved is not None:
        say(f"the raw fusion stream received so far is in {saved}")


def report_failure(exc: BaseException, player: Player, kept: Path | None, saved: Path | None,
                    output: Output) -> None:
    """Say why the stream failed, and where the verified output stops and is kept."""
    say(failure(exc)[0])
    if player.summary.segments:
        where = f"output stops {player.where()}"
        if kept is not None:
            where += f"; the verified video up to there is in {kept}"
        elif isinstance(output, PipeOutput):
            where += " (the video sent to standard output is verified up to there)"
        say(where)
    else:
        say("no video was written.")
    if saved is not None:
        say(f"the raw fusion stream received so far is in {saved}")


def recorded_part(session: ArchiverSession, camera: str, from_ms: int,
                   to_ms: int) -> tuple[int, int]:
    """The part of [from, to] that is recorded, so the progress bar moves over real video."""
    try:
        view = next((v for v in session.cameras() if v.name == camera), None)
    except KeyServiceError:
        return from_ms, to_ms  # only cosmetic: the stream request reports the real problem
    if view is None or view.first_ms is None or view.last_ms is None:
        return from_ms, to_ms
    start, end = max(from_ms, view.first_ms), min(to_ms, view.last_ms)
    return (start, end) if start < end else (from_ms, to_ms)


def stream_command(*, url: str, token: str, output_target: str, archiver_cert: Path | None,
                   tls_ca: Path | None, save_stream: Path | None, quiet: bool, live: bool,
                   progress_range: tuple[int, int] | None, progress_camera: str = "",
                   make_request: Callable[[], StreamRequest], grant_id: str | None = None,
                   known_keys: Callable[[ArchiverSession, Identity], Mapping[bytes, bytes]]
                   | None = None, site_ca: Path | None = None) -> None:
    """One stream command (play, live, grants play): log in, fetch the stream bound to a
    fresh request (client.viewer.stream), verify and write it with progress and messages.
    ``known_keys``: after login, minute keys from outside the stream (an access grant opened
    on the token: client/grants.py). A range another Archiver of the site holds is followed
    there (checked: client/site.py; with ``site_ca``, an Archiver whose signing certificate
    the site CA issued is followed without a pin), and one several Archivers recorded is
    played part by part, each verified against its own signer (``play_parts``)."""
    explicit = load_certificate_file(archiver_cert) if archiver_cert is not None else None
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    with ExitStack() as stack:
        output = open_output(output_target)
        save = FileOutput(save_stream) if save_stream is not None else None
        try:
            # The stream's reader and the crypto core, imported in a thread while this one
            # waits for the token's login and the Archiver's answers (issue 23, start-up):
            # nothing in it touches the token or the network.
            import_in_background("keyservice.reader")
            session = stack.enter_context(ArchiverSession(url, tls_ca=tls_ca))
            identity = stack.enter_context(open_identity(token, prompt=True))
            login = login_and_say(session, identity, explicit, cas)
            after_login = operations(identity)
            keys = known_keys(session, identity) if known_keys is not None else None
            # Another Archiver of the site may hold the range: its redirect is followed only
            # to an Archiver the site lists, trusted by a pin or the site CA (client/site.py).
            site = stack.enter_context(Site(session, login, identity, check=trust_followed(
                KnownArchivers.default(), cas)))
            asked = make_request()
            parts = site.parts(asked.cameras[0], asked.from_ms, asked.to_ms) if (
                asked.mode == Mode.PLAYBACK and grant_id is None) else []
            redundant = any(len(p.copies) > 1 for p in parts)
            if (len(parts) > 1 or redundant) and save is not None:
                raise UsageError("--save-stream keeps one Archiver's stream, and this range was "
                                 "recorded by several" + (" (a redundant camera: each keeps a "
                                 "copy)" if redundant else "") + "; play each part on its own "
                                 "to save it.")
        except BaseException:
            output.abort()
            if save is not None:
                save.abort()
            raise
        if redundant:
            play_copies(site, identity, asked.cameras[0], parts, output, quiet=quiet,
                        login_ops=lambda: after_login + site.logins)
            return
        if len(parts) > 1 or (parts and parts[0].consolidated):
            play_parts(site, identity, asked.cameras[0], parts, output, quiet=quiet,
                       login_ops=lambda: after_login + site.logins)
            return
        start, end = (0, 0)
        show_progress = progress_range is not None and not quiet and sys.stderr.isatty()
        if show_progress and progress_range is not None:
            start, end = recorded_part(session, progress_camera, *progress_range)
        if live:
            # A fresh nonce per request, made just before it is sent (live: the local clock
            # then is the start the stream's freshness is judged against).
            asked = make_request()

        def fetch() -> AbstractContextManager[Iterator[bytes]]:
            return site.stream(asked, grant_id=grant_id)

        def check(cert: x509.Certificate) -> None:
            # The signer is the Archiver that answered (the entry, or the one followed to),
            # or a consolidated part's listed signer.
            site.check_stream_signer(cert)

        run_stream(identity=identity, output=output, save=save, fetch=fetch, check=check,
                   progress=Progress(show_progress, start, end),
                   login_ops=lambda: after_login + site.logins, live=live, quiet=quiet,
                   request=asked, known_keys=keys)


# --- a range recorded by several Archivers of the site (a camera moved, issue 21) -----------
# The parts play in order into one output, each a stream of its own (its own request and
# nonce, asked of the entry and followed to its holder), verified against its own signer; the
# output gets its final name only when every part verified (else the verified video up to
# there is kept under a name that says so, as for one stream).
def switch_line(switch: Switch) -> str:
    """The switch between two Archivers, at the signed edges, for a person (Switch.describe:
    the same words in play, evidence, grants and the web page)."""
    return switch.describe()


def _at_a_switch(gap: Gap, summary: Summary, first: bool, last: bool) -> bool:
    """A part's gap before its first or after its last segment, at a switch between Archivers
    (the switch line gives it, at the signed edges)."""
    if summary.first_ms is None or summary.last_ms is None:
        return not (first and last)
    return (not last and gap.from_ms >= summary.last_ms) or (
        not first and gap.to_ms <= summary.first_ms)


def _part_fetch(site: Site, part: Part, request: StreamRequest, previous_end: int | None,
                stack: ExitStack) -> Callable[[], AbstractContextManager[Iterator[bytes]]] | None:
    """How run_stream gets ``part``'s stream; None: there is nothing to play. A share that is
    only the instant --to where the played video ended (client.site.start_after) is opened
    here first, so that the next Archiver's "no recording" there (a gap at the switch: the
    part holds no video) is told from a failure, which run_stream reports as any part's."""
    if previous_end is None or not part.from_ms == part.to_ms == previous_end:
        return lambda: site.stream_from(part, request)
    try:
        chunks = stack.enter_context(site.stream_from(part, request))
    except Exception as exc:
        if nothing_at_the_end(exc, part, previous_end):
            return None
        failure = exc

        def failed() -> AbstractContextManager[Iterator[bytes]]:
            raise failure
        return failed
    return lambda: nullcontext(chunks)


def play_parts(site: Site, identity: Identity, camera: str, parts: list[Part], output: Output,
               *, quiet: bool, login_ops: Callable[[], int]) -> list[tuple[Part, Summary]]:
    """Play each part (client.playback.run_stream, one request each) into ``output``; commit
    it after the last, or abort it (keeping the verified part) and exit on a failure."""
    played: list[tuple[Part, Summary]] = []
    signers: list[str] = []
    try:
        previous_end: int | None = None
        for i in range(len(parts)):
            # Each part but the last reaches into the next (client.site.played_part).
            part = played_part(parts, i, previous_end)
            if part is None:
                continue  # the old Archiver's video reached past the end asked for
            request = playback_request(camera, part.from_ms, part.to_ms)

            def check(cert: x509.Certificate, _site: Site = site) -> None:
                _site.check_stream_signer(cert)

            with ExitStack() as opened:
                fetch = _part_fetch(site, part, request, previous_end, opened)
                if fetch is None:
                    continue  # no video at the instant --to, where the last part's ended
                summary = run_stream(
                    identity=identity, output=PartOutput(output), save=None, fetch=fetch,
                    check=check, progress=Progress(False, 0, 0), login_ops=login_ops,
                    live=False, quiet=True, request=request)
            answered, login = site.current
            signer = site.content_signer
            if part.consolidated and signer is not None:
                served = site.entry_name or site.entry.url
                signers.append(f"{answered} (signing certificate sha256 "
                               f"{fingerprint(signer.certificate).hex()[:16]}..., "
                               f"{signer.certificate.subject.rfc4514_string()}), "
                               f"consolidated from {answered} at {served} (signed by "
                               f"{signer.certificate.subject.rfc4514_string()})")
            else:
                signers.append(f"{answered} (signing certificate sha256 "
                               f"{login.archiver_fingerprint.hex()[:16]}..., "
                               f"{login.result.archiver_certificate.subject.rfc4514_string()})")
            played.append((part, summary))
            if summary.last_ms is not None:
                previous_end = summary.last_ms
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
            if _at_a_switch(gap, summary, i == 1, i == len(played)):
                continue  # said once, as the switch, below
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


# --- a redundant camera: one copy played, its gaps filled from another (issue 22) -----------
class _SelectionOutput(PartOutput):
    """A stretch's output: each verified segment goes to the Selection, which writes it to the
    command's output unless it repeats video another copy already gave."""

    def __init__(self, selection: Selection) -> None:
        self._selection = selection

    def write(self, data: bytes) -> None:
        """Take a verified segment (written once its signed times are known)."""
        self._selection.write(data)


class _SelectionProgress(Progress):
    """No bar; tells the Selection each written segment's signed times."""

    def __init__(self, selection: Selection) -> None:
        super().__init__(False, 0, 0)
        self._selection = selection

    def segment(self, event: Any) -> None:
        """Keep or leave out the segment just written (client/copies.py)."""
        self._selection.segment(event)


def _signer(login: Login) -> str:
    cert = login.result.archiver_certificate
    return (f"{cert.subject.rfc4514_string()} (signing certificate sha256 "
            f"{login.archiver_fingerprint.hex()[:16]}...)")


def play_copies(site: Site, identity: Identity, camera: str, parts: list[Part], output: Output,
                *, quiet: bool, login_ops: Callable[[], int]) -> None:
    """Play a redundant camera's range: per part, one copy (the entry's if it holds one),
    each of its gaps from another copy (client/copies.py); every stretch its own stream,
    verified against its own signer, the switches said at their signed edges. The output is
    committed after the last stretch, or aborted (keeping what verified) on a failure."""
    from client.copies import Selection, Stretch, plan_stretches, survey

    selection = Selection(output.write)
    lines: list[str] = []
    played: list[tuple[Stretch, Summary]] = []
    previous: tuple[str, int | None] | None = None  # the last stretch's Archiver, signed end
    try:
        for part in parts:
            stretches = [Stretch(part)]
            if len(part.copies) > 1:
                part, gaps, unused = survey(site, camera, part)
                lines += unused
                stretches = plan_stretches(part, gaps)
            for stretch in stretches:
                selection.start()
                planned = stretch.part
                request = playback_request(camera, planned.from_ms, planned.to_ms)

                def check(cert: x509.Certificate, _site: Site = site) -> None:
                    archiver_pin_check(_site.signer_fingerprint())(cert)

                summary = run_stream(
                    identity=identity, output=_SelectionOutput(selection), save=None,
                    fetch=lambda p=planned, r=request: site.stream_from(p, r), check=check,
                    progress=_SelectionProgress(selection), login_ops=login_ops, live=False,
                    quiet=True, request=request)
                _, login = site.current
                played.append((stretch, summary))
                video = (f"{selection.kept} segment(s), {mib(selection.kept_bytes)}, captured "
                         f"{format_ms(selection.first_ms)} .. {format_ms(selection.last_ms)}"
                         if selection.first_ms is not None and selection.last_ms is not None
                         else "no segments")
                if previous is not None and previous[0] != planned.archiver:
                    lines.append(switch_line(Switch(previous[0], planned.archiver, previous[1],
                                                    selection.first_ms)))
                if stretch.fills is not None and stretch.hole is not None:
                    lines.append(
                        f"gap in {stretch.fills}'s copy {format_ms(stretch.hole[0])} .. "
                        f"{format_ms(stretch.hole[1])} filled from {planned.archiver}, signed "
                        f"by {_signer(login)}: {video}")
                else:
                    lines.append(f"copy of Archiver {planned.archiver} "
                                 f"{format_ms(planned.from_ms)} .. {format_ms(planned.to_ms)}, "
                                 f"verified against {_signer(login)}: {video}")
                if selection.left_out:
                    lines.append(f"  {selection.left_out} segment(s) of {planned.archiver}'s "
                                 "copy left out: they repeat video already written from "
                                 "another copy")
                lines += [f"  gap: {g.describe()}" for g in sorted(summary.gaps,
                                                                  key=lambda g: g.from_ms)]
                if selection.first_ms is not None:
                    previous = (planned.archiver, selection.last_ms)
    except SystemExit:
        kept = output.abort()
        if kept is not None:
            say(f"the verified video of the stretches played so far is in {kept}")
        raise
    final = output.commit()
    if quiet:
        return
    for line in lines:
        say(line)
    openers = sum(s.epoch_openings for _, s in played)
    say(f"token operations: {operations(identity)} ({login_ops()} login, {openers} epoch "
        "opener(s))")
    where = "complete (every stretch's signed end record verified)"
    say(where + (f"; video in {final}" if final is not None else "; video written to stdout"))
