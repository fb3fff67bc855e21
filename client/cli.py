"""fusion-client: watch and export video from a Fusion Archiver with a token-held viewer key.

Thin: argument parsing, wiring (token, pin, session, player, output), messages and exit codes.
Every failure is one sentence on stderr and a distinct non-zero exit code (docs/client.md),
never a traceback; video goes only to the output, messages only to stderr.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from cryptography import x509

from client.grants import register as register_grants
from client.pinning import KnownArchivers, PinDecision, PinOutcome, check_archiver
from client.player import (
    FileOutput,
    Output,
    OutputFailed,
    PipeOutput,
    Player,
    Summary,
    archiver_pin_check,
)
from client.session import (
    MAX_LIVE_S,
    ArchiverSession,
    LoginResult,
    live_request,
    playback_request,
)
from client.timespec import format_duration, format_ms, parse_range
from keyservice.errors import CertificateError, KeyServiceError, UsageError
from keyservice.format import Header, Mode
from keyservice.identity import Identity, fingerprint
from keyservice.stream import DEFAULT_MAX_SKEW_MS, StreamRequest
from keyservice.text import printable

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Watch and export video from a Fusion Archiver; keys are opened on your "
                       "token, video is decrypted and verified on this machine.")

# Typer >= 0.2x vendors click; find its ClickException either way (usage errors).
_CLICK_EXCEPTION: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
EXIT_INTERRUPTED = 130
EXIT_UNEXPECTED = 1
DEFAULT_URL = "http://127.0.0.1:8080"
_CAMERA = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_READ_CHUNK = 1 << 20

ArchiverOpt = Annotated[str, typer.Option("--archiver", envvar="FUSION_ARCHIVER_URL",
                                          help="The Archiver's base URL.")]
TokenOpt = Annotated[str, typer.Option(
    "--token", envvar="FUSION_TOKEN",
    help="PKCS#11 URI of your viewer key, e.g. 'pkcs11:token=viewers;object=alice'. The PIN comes "
         "from pin-value/pin-source in the URI, FUSION_PIN, or a prompt.")]
CameraOpt = Annotated[str, typer.Option("--camera", help="Camera name.")]
OutputOpt = Annotated[str, typer.Option("--output", "-o",
                                        help="Output MPEG-TS file, or '-' for standard output.")]
ArchiverCertOpt = Annotated[Path | None, typer.Option(
    "--archiver-cert", help="Pin this Archiver certificate (PEM) instead of trusting on first "
                            "use; also replaces an older pin after a legitimate key change.")]
TlsCaOpt = Annotated[Path | None, typer.Option(
    "--tls-ca", help="CA certificate (PEM) to verify the Archiver's HTTPS certificate.")]
SaveOpt = Annotated[Path | None, typer.Option(
    "--save-stream", help="Also keep the raw fusion stream (encrypted, signed) in this file, "
                          "e.g. as evidence a third party can verify with 'fusion-client open'.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no summary.")]


# --- small helpers ------------------------------------------------------------------------
def _say(message: str) -> None:
    # Messages quote the Archiver, certificates and files: never let them drive the terminal.
    typer.echo(f"fusion-client: {printable(message)}", err=True)


def _fail(message: str, code: int) -> NoReturn:
    _say(message)
    raise SystemExit(code)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_camera(name: str) -> str:
    if not _CAMERA.match(name):
        raise UsageError(f"{name!r} is not a camera name (1-64 of A-Z a-z 0-9 . _ -).")
    return name


def _load_cert(path: Path | None) -> x509.Certificate | None:
    if path is None:
        return None
    from keyservice.certs import load_certificate
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        return load_certificate(data)
    except CertificateError as exc:
        raise CertificateError(f"{path}: {exc}") from None


def _open_output(target: str) -> Output:
    if target == "-":
        if sys.stdout.isatty():
            raise UsageError("Refusing to write video to a terminal; pipe it "
                             "(... -o - | ffplay -) or give -o FILE.")
        return PipeOutput(sys.stdout.buffer)
    path = Path(target)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name for the video.")
    return FileOutput(path)


def _open_identity(stack: ExitStack, uri: str) -> Identity:
    # Imported here: the token layer loads a PKCS#11 module, which `--help` does not need.
    from keyservice.token import Token
    token = Token.open(uri, prompt=True)  # a wrong PIN raises PinIncorrect: never retried
    stack.callback(token.close)
    return token.identity()


def _operations(identity: Identity) -> int:
    return int(getattr(identity, "operations", 0))


def _login(session: ArchiverSession, identity: Identity, url: str,
           explicit: x509.Certificate | None) -> LoginResult:
    store = KnownArchivers.default()
    decisions: list[PinDecision] = []

    def check(cert: x509.Certificate) -> None:
        decisions.append(check_archiver(url, cert, store=store, explicit=explicit))

    result = session.login(identity, check)
    decision = decisions[-1]
    if decision.outcome is PinOutcome.FIRST_USE:
        _say(f"trusting the Archiver at {url} on first use: certificate sha256 "
             f"{decision.fingerprint.hex()} (pinned in {decision.stored_in}); compare it with "
             "the fingerprint your admin gives you.")
    elif decision.replaced is not None:
        _say(f"replaced the pinned certificate of {url} (sha256 {decision.replaced.hex()}) with "
             f"the one given by --archiver-cert (sha256 {decision.fingerprint.hex()}).")
    return result


class _Progress:
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

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def segment(self, event: Any) -> None:
        if self._bar is not None:
            done = max(0, min(self._to, event.capture_ms) - self._from)
            self._bar.update(self._task, completed=done,
                             description=f"{event.camera} {format_ms(event.capture_ms)}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _token_line(login_ops: int, token_ops: int, epoch_openings: int) -> str:
    return (f"token operations: {token_ops} ({login_ops} login, {epoch_openings} epoch "
            "opener(s))")


def _print_summary(summary: Summary, login_ops: int, token_ops: int, where: str) -> None:
    if summary.segments:
        assert summary.first_ms is not None and summary.last_ms is not None
        _say(f"{summary.segments} segment(s), {_mib(summary.bytes)}, captured "
             f"{format_ms(summary.first_ms)} .. {format_ms(summary.last_ms)} "
             f"({format_duration(summary.last_ms - summary.first_ms)})")
    else:
        _say("no segments")
    _say(_token_line(login_ops, token_ops, summary.epoch_openings))
    for gap in sorted(summary.gaps, key=lambda g: g.from_ms):
        _say(f"gap: {gap.describe()}")
    _say(where)


class _DeferredInterrupt:
    """Ctrl-C while a segment is being written and counted takes effect right after it, so
    the summary and "output stops after ..." always match the bytes written."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending = False
        self._previous: Any = None

    def __enter__(self) -> _DeferredInterrupt:
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
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        # Reached only when the segment was written: an error in flight is not masked.
        if not self._depth and self._pending:
            self._pending = False
            raise KeyboardInterrupt


def _run_stream(*, identity: Identity, output: Output, save: FileOutput | None,
                fetch: Callable[[], AbstractContextManager[Iterator[bytes]]],
                check: Callable[[x509.Certificate], None], progress: _Progress,
                login_ops: Callable[[], int], live: bool, quiet: bool,
                request: StreamRequest | None, saved: bool = False,
                known_keys: Mapping[bytes, bytes] | None = None) -> None:
    """Feed the stream to the player; on success give the output its final name, on failure
    keep the verified part under a name that says so and say where it stops. ``request``:
    what was asked for, checked by the reader; None only for a saved stream (``saved``),
    whose header is then printed as what it is."""
    interrupts = _DeferredInterrupt()
    player = Player(identity, check, output, on_segment=progress.segment,
                    critical=interrupts.critical, request=request, known_keys=known_keys)
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
        _report_failure(exc, player, kept, saved, output)
        if not quiet:
            _say(_token_line(login_ops(), _operations(identity), player.summary.epoch_openings))
        raise SystemExit(_exit_code(exc)) from None
    try:
        final = output.commit()
        saved_final = save.commit() if save is not None else None
    except OutputFailed as exc:
        output.abort()
        if save is not None:
            save.abort()
        _say(str(exc))
        raise SystemExit(exc.exit_code) from None
    if not quiet:
        token_ops = _operations(identity)
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
                _say(line)
        _print_summary(summary, login_ops(), token_ops, where)


def describe_saved(header: Header) -> list[str]:
    """What a saved stream is, from its header (authenticated by the verified END record):
    it answered one request in the past, and says which."""
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


def _report_failure(exc: BaseException, player: Player, kept: Path | None, saved: Path | None,
                    output: Output) -> None:
    _say(_message(exc))
    if player.summary.segments:
        where = f"output stops {player.where()}"
        if kept is not None:
            where += f"; the verified video up to there is in {kept}"
        elif isinstance(output, PipeOutput):
            where += " (the video sent to standard output is verified up to there)"
        _say(where)
    else:
        _say("no video was written.")
    if saved is not None:
        _say(f"the raw fusion stream received so far is in {saved}")


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, KeyServiceError):
        return str(exc)
    if isinstance(exc, httpx.HTTPError):
        return f"The connection to the Archiver failed ({exc.__class__.__name__})."
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "") + "."
    return f"Unexpected error ({exc.__class__.__name__}: {exc})."


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, KeyServiceError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, httpx.HTTPError):
        return 40
    return EXIT_UNEXPECTED


def _recorded_part(session: ArchiverSession, camera: str, from_ms: int,
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


def _stream_command(*, url: str, token: str, output_target: str, archiver_cert: Path | None,
                    tls_ca: Path | None, save_stream: Path | None, quiet: bool, live: bool,
                    progress_range: tuple[int, int] | None, progress_camera: str = "",
                    make_request: Callable[[], StreamRequest],
                    request: Callable[[ArchiverSession, StreamRequest],
                                      AbstractContextManager[Iterator[bytes]]],
                    known_keys: Callable[[ArchiverSession, Identity], Mapping[bytes, bytes]]
                    | None = None) -> None:
    """``known_keys``: after login, minute keys from outside the stream (an access grant
    opened on the token: client/grants.py)."""
    explicit = _load_cert(archiver_cert)
    with ExitStack() as stack:
        output = _open_output(output_target)
        save = FileOutput(save_stream) if save_stream is not None else None
        try:
            session = stack.enter_context(ArchiverSession(url, tls_ca=tls_ca))
            identity = _open_identity(stack, token)
            login = _login(session, identity, url, explicit)
        except BaseException:
            output.abort()
            if save is not None:
                save.abort()
            raise
        after_login = _operations(identity)
        try:
            keys = known_keys(session, identity) if known_keys is not None else None
        except BaseException:
            output.abort()
            if save is not None:
                save.abort()
            raise
        start, end = (0, 0)
        show_progress = progress_range is not None and not quiet and sys.stderr.isatty()
        if show_progress and progress_range is not None:
            start, end = _recorded_part(session, progress_camera, *progress_range)
        # A fresh nonce per request, made just before it is sent (live: the local clock then
        # is the start the stream's freshness is judged against).
        asked = make_request()
        _run_stream(identity=identity, output=output, save=save,
                    fetch=lambda: request(session, asked),
                    check=archiver_pin_check(login.archiver_fingerprint),
                    progress=_Progress(show_progress, start, end),
                    login_ops=lambda: after_login, live=live, quiet=quiet, request=asked,
                    known_keys=keys)


# --- commands -----------------------------------------------------------------------------
@app.command()
def play(
    camera: CameraOpt,
    from_: Annotated[str, typer.Option("--from", help="Start: ISO 8601 (UTC unless an offset "
                                       "is given), relative (-10m, -2h) or 'now'.")],
    output: OutputOpt,
    to: Annotated[str, typer.Option("--to", help="End, same forms as --from.")] = "now",
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    save_stream: SaveOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a recorded time range of a camera as verified, decrypted MPEG-TS."""
    from_ms, to_ms = parse_range(from_, to, _now_ms())
    _check_camera(camera)
    _stream_command(url=archiver, token=token, output_target=output, archiver_cert=archiver_cert,
                    tls_ca=tls_ca, save_stream=save_stream, quiet=quiet, live=False,
                    progress_range=(from_ms, to_ms), progress_camera=camera,
                    make_request=lambda: playback_request(camera, from_ms, to_ms),
                    request=lambda s, asked: s.recording(camera, from_ms, to_ms, asked))


@app.command()
def live(
    camera: CameraOpt,
    output: OutputOpt,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="Seconds to watch (default: until Ctrl-C, at most a day).",
        min=0.1, max=MAX_LIVE_S)] = None,
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    save_stream: SaveOpt = None,
    quiet: QuietOpt = False,
    max_clock_skew: Annotated[float, typer.Option(
        "--max-clock-skew", min=0.0, max=3600.0,
        help="Seconds the Archiver's clock may differ from this machine's: a live stream made, "
             "or a segment captured, earlier than the request by more is refused as not "
             "fresh (a replay).")] = DEFAULT_MAX_SKEW_MS / 1000,
) -> None:
    """Watch a camera live; each segment is written as soon as it is verified (-o - | ffplay -)."""
    _check_camera(camera)
    seconds = duration if duration is not None else MAX_LIVE_S
    skew_ms = int(max_clock_skew * 1000)
    _stream_command(url=archiver, token=token, output_target=output, archiver_cert=archiver_cert,
                    tls_ca=tls_ca, save_stream=save_stream, quiet=quiet, live=True,
                    progress_range=None,
                    make_request=lambda: live_request(camera, seconds, max_skew_ms=skew_ms),
                    request=lambda s, asked: s.live(camera, seconds, asked))


@app.command()
def cameras(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the cameras this viewer may watch, with their recorded ranges."""
    explicit = _load_cert(archiver_cert)
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(archiver, tls_ca=tls_ca))
        identity = _open_identity(stack, token)
        _login(session, identity, archiver, explicit)
        views = session.cameras()
    if as_json:
        typer.echo(json.dumps({"cameras": [v.__dict__ for v in views]}))
        return
    if not views:
        typer.echo("no cameras: this viewer is not authorized on any camera")
    for v in views:
        recorded = (f"{format_ms(v.first_ms)} .. {format_ms(v.last_ms)}"
                    if v.first_ms is not None and v.last_ms is not None else "nothing recorded")
        typer.echo(printable(f"{v.name:<24} {v.state:<12} {v.segments:>8} segments  {recorded}"))


@app.command()
def view(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                      help="Local port (default: a free one).")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser",
                                             help="Only print the URL.")] = False,
    export_dir: Annotated[Path, typer.Option("--export-dir",
                                             help="Where exports are written.")] = Path(
                                                 "fusion-exports"),
) -> None:
    """Open the operator's viewer: a local web page (127.0.0.1 only) with live cameras, a
    timeline and verified exports. Keys stay on your token; the PIN is asked here, never in the
    page. Ctrl-C stops it."""
    from client.web.backend import ViewerBackend
    from client.web.server import serve
    explicit = _load_cert(archiver_cert)
    with ExitStack() as stack:
        session = stack.enter_context(ArchiverSession(archiver, tls_ca=tls_ca))
        identity = _open_identity(stack, token)
        login = _login(session, identity, archiver, explicit)
        backend = ViewerBackend(session, identity, login,
                                lambda: _login(session, identity, archiver, explicit), export_dir)

        def announce(url: str) -> None:
            _say(f"viewer for {login.viewer_fingerprint[:16]}... on {archiver}; open this URL "
                 "(it works once; Ctrl-C stops the viewer):")
            typer.echo(url)
            sys.stdout.flush()

        serve(backend, port=port, open_browser=not no_browser, announce=announce)
    _say("viewer stopped")


@app.command("open")
def open_saved(
    stream_file: Annotated[Path, typer.Argument(help="A saved fusion stream (--save-stream).")],
    output: OutputOpt,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    archiver: Annotated[str | None, typer.Option(
        "--archiver", help="Use the certificate pinned for this Archiver URL.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Verify and decrypt a saved fusion stream offline, against a pinned or given Archiver.
    Prints what the stream is (camera, range, Archiver, when made, request nonce): it answered
    a past request and is no answer to a new one."""
    explicit = _load_cert(archiver_cert)
    if explicit is None and archiver is None:
        raise UsageError("Give --archiver-cert FILE or --archiver URL (a pinned Archiver) to say "
                         "whose signature the stream must carry.")
    store = KnownArchivers.default()

    def check(cert: x509.Certificate) -> None:
        # Offline there is no first contact to trust: the Archiver must be known already.
        check_archiver(None if explicit is not None else archiver, cert, store=store,
                       explicit=explicit, allow_first_use=False)

    try:
        fh = open(stream_file, "rb")
    except OSError as exc:
        raise UsageError(f"Cannot read {stream_file}: {exc.strerror or exc}.") from None
    with ExitStack() as stack:
        stack.callback(fh.close)
        out = _open_output(output)
        try:
            identity = _open_identity(stack, token)
        except BaseException:
            out.abort()
            raise

        def chunks() -> Iterator[bytes]:
            while data := fh.read(_READ_CHUNK):
                yield data

        _run_stream(identity=identity, output=out, save=None,
                    fetch=lambda: nullcontext(chunks()), check=check,
                    progress=_Progress(False, 0, 0), login_ops=lambda: 0, live=False,
                    quiet=quiet, request=None, saved=True)


# Access grants (client/grants.py): `grant` and `grants list|play`.
register_grants(app)


def main() -> None:
    """Entry point: no traceback ever; one sentence and a distinct exit code per failure."""
    try:
        code = app(standalone_mode=False)
    except _CLICK_EXCEPTION as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # the help text was printed already
            exc.show()
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        _say("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except SystemExit:
        raise
    except BaseException as exc:  # the last line of defence against tracebacks
        _say(_message(exc))
        raise SystemExit(_exit_code(exc)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
