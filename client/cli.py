"""fusion-client: watch and export video from a Fusion Archiver with a token-held viewer key.

Thin: argument parsing, wiring (token, pin, session, player, output), messages and exit codes.
Every failure is one sentence on stderr and a distinct non-zero exit code (docs/client.md),
never a traceback; video goes only to the output, messages only to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from client.evidence import evidence_app
from client.grants import register as register_grants
from client.options import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_URL,
    MAX_LIVE_S,
    ArchiverCertOpt,
    ArchiverOpt,
    CameraOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    SaveOpt,
    SiteCaOpt,
    TlsCaOpt,
    TokenOpt,
)
from keyservice.cli_support import add_version_option, hidden_aliases, run, tidy_help
from keyservice.errors import UsageError

if TYPE_CHECKING:
    from cryptography import x509

# Each command imports what it runs (the viewer library: httpx, cryptography, the token layer;
# the web page: fastapi, uvicorn) when it runs, not when the CLI is built: `fusion-client
# --help` loads none of it, and `play` not the web page, grants or evidence (issue 23).

__all__ = ["app", "main"]

# rich_markup_mode=None: help is click's plain text; rendering it with rich costs about 80 ms
# of imports (rich, pygments) on every --help (issue 23).
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Watch and export video from a Fusion Archiver; keys are opened on your "
                       "token, video is decrypted and verified on this machine.")
add_version_option(app, "fusion-client")
hidden_aliases(app, {"oaep-hash": "key-scheme"})  # the old name of --key-scheme
READ_CHUNK = 1 << 20


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
    site_ca: SiteCaOpt = None,
    save_stream: SaveOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a recorded time range of a camera as verified, decrypted MPEG-TS."""
    from client.preload import preload_token_module

    # First thing: the token's module loads (C_Initialize) while the rest is imported. No PIN
    # is read there; the token is opened, and its PIN used once, where it always was.
    preload_token_module(token)
    from client.logins import check_camera, now_ms
    from client.playback import stream_command
    from client.session import playback_request
    from keyservice.timespec import parse_range

    from_ms, to_ms = parse_range(from_, to, now_ms())
    check_camera(camera)
    stream_command(url=archiver, token=token, output_target=output, archiver_cert=archiver_cert,
                   tls_ca=tls_ca, site_ca=site_ca, save_stream=save_stream, quiet=quiet,
                   live=False,
                   progress_range=(from_ms, to_ms), progress_camera=camera,
                   make_request=lambda: playback_request(camera, from_ms, to_ms))


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
    site_ca: SiteCaOpt = None,
    save_stream: SaveOpt = None,
    quiet: QuietOpt = False,
    max_clock_skew: Annotated[float, typer.Option(
        "--max-clock-skew", min=0.0, max=3600.0,
        help="Seconds the Archiver's clock may differ from this machine's: a live stream made, "
             "or a segment captured, earlier than the request by more is refused as not "
             "fresh (a replay).")] = DEFAULT_CLOCK_SKEW_S,
) -> None:
    """Watch a camera live; each segment is written as soon as it is verified (-o - | ffplay -)."""
    from client.preload import preload_token_module

    preload_token_module(token)  # as play: the module only, no PIN, no login
    from client.logins import check_camera
    from client.playback import stream_command
    from client.session import live_request

    check_camera(camera)
    seconds = duration if duration is not None else MAX_LIVE_S
    skew_ms = int(max_clock_skew * 1000)
    stream_command(url=archiver, token=token, output_target=output, archiver_cert=archiver_cert,
                   tls_ca=tls_ca, site_ca=site_ca, save_stream=save_stream, quiet=quiet,
                   live=True,
                   progress_range=None,
                   make_request=lambda: live_request(camera, seconds, max_skew_ms=skew_ms))


@app.command()
def cameras(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    site_ca: SiteCaOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the cameras this viewer may watch, with the site's Archiver that records each and
    their recorded ranges (on the Archiver asked)."""
    from client.playback import logged_in
    from keyservice.text import printable
    from keyservice.timespec import format_ms

    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, _identity,
                                                                         _login):
        views = session.cameras()
        # A site of several Archivers: each camera's Archiver is a column (a standalone
        # Archiver's list stays as it was).
        site = len(session.site_archivers()) > 1
    if as_json:
        typer.echo(json.dumps({"cameras": [v.__dict__ for v in views]}))
        return
    if not views:
        typer.echo("no cameras: this viewer is not authorized on any camera")
    for v in views:
        recorded = (f"{format_ms(v.first_ms)} .. {format_ms(v.last_ms)}"
                    if v.first_ms is not None and v.last_ms is not None else "nothing recorded")
        held = f"{v.archiver or '?':<16} " if site else ""
        typer.echo(printable(f"{v.name:<24} {held}{v.state:<12} {v.segments:>8} segments  "
                             f"{recorded}"))


@app.command()
def view(
    archiver: ArchiverOpt = DEFAULT_URL,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    tls_ca: TlsCaOpt = None,
    site_ca: SiteCaOpt = None,
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
    from client.pinning import KnownArchivers
    from client.playback import logged_in, login_and_say, say
    from client.site import trust_followed
    from client.viewer import load_certificate_file, load_site_ca
    from client.web.backend import ViewerBackend
    from client.web.server import serve

    explicit = load_certificate_file(archiver_cert) if archiver_cert is not None else None
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    with logged_in(archiver, token, archiver_cert, tls_ca, site_ca) as (session, identity, login):
        # A camera another Archiver of the site holds: its redirect followed, checked.
        backend = ViewerBackend(session, identity, login,
                                lambda: login_and_say(session, identity, explicit, cas),
                                export_dir, follow=trust_followed(KnownArchivers.default(), cas))

        terminal = sys.stdin.isatty()

        def announce(url: str) -> None:
            again = "; Enter here prints a new one" if terminal else ""
            say(f"viewer for {login.viewer_fingerprint[:16]}... on {archiver}; open this URL "
                f"(it works once{again}; Ctrl-C stops the viewer):")
            typer.echo(url)
            sys.stdout.flush()

        try:
            serve(backend, port=port, open_browser=not no_browser, announce=announce,
                  new_links=terminal)
        finally:
            backend.close()
    say("viewer stopped")


@app.command("open")
def open_saved(
    stream_file: Annotated[Path, typer.Argument(help="A saved fusion stream (--save-stream).")],
    output: OutputOpt,
    token: TokenOpt = ...,  # type: ignore[assignment]
    archiver_cert: ArchiverCertOpt = None,
    archiver: Annotated[str | None, typer.Option(
        "--archiver", help="Use the certificate pinned for this Archiver URL.")] = None,
    site_ca: SiteCaOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Verify and decrypt a saved fusion stream offline, against a pinned or given Archiver.
    Prints what the stream is (camera, range, Archiver, when made, request nonce): it answered
    a past request and is no answer to a new one."""
    from client.pinning import KnownArchivers, check_archiver
    from client.playback import Progress, open_output, run_stream
    from client.viewer import load_certificate_file, load_site_ca, open_identity

    explicit = load_certificate_file(archiver_cert) if archiver_cert is not None else None
    cas = load_site_ca(site_ca) if site_ca is not None else ()
    if explicit is None and archiver is None and not cas:
        raise UsageError("Give --archiver-cert FILE, --archiver URL (a pinned Archiver) or "
                         "--site-ca FILE to say whose signature the stream must carry.")
    store = KnownArchivers.default()

    def check(cert: x509.Certificate) -> None:
        # Offline there is no first contact to trust: the Archiver must be known already (or
        # its certificate issued by the site CA, checked as of now).
        check_archiver(None if explicit is not None else archiver, cert, store=store,
                       explicit=explicit, allow_first_use=False, site_ca=cas)

    try:
        fh = open(stream_file, "rb")
    except OSError as exc:
        raise UsageError(f"Cannot read {stream_file}: {exc.strerror or exc}.") from None
    with ExitStack() as stack:
        stack.callback(fh.close)
        out = open_output(output)
        try:
            identity = stack.enter_context(open_identity(token, prompt=True))
        except BaseException:
            out.abort()
            raise

        def chunks() -> Iterator[bytes]:
            while data := fh.read(READ_CHUNK):
                yield data

        run_stream(identity=identity, output=out, save=None,
                    fetch=lambda: nullcontext(chunks()), check=check,
                    progress=Progress(False, 0, 0), login_ops=lambda: 0, live=False,
                    quiet=quiet, request=None, saved=True)


# Access grants (client/grants.py): `grant` and `grants list|play`.
register_grants(app)

# Evidence packages (docs/evidence.md): export, and offline verification without a token.
app.add_typer(evidence_app, name="evidence")
tidy_help(app)  # help wraps to the terminal, not to the source's line breaks


def main() -> None:
    """Entry point: no traceback ever; one sentence and a distinct exit code per failure."""
    run(app, "fusion-client")
