"""One error-to-exit path for the three CLIs (fusion-keys, fusion-archiver, fusion-client).

Every failure is one sentence on stderr, prefixed with the program's name, and an exit code: a
KeyServiceError's own ``exit_code`` (docs/client.md lists them), 2 for a usage error, 130 for an
interruption, 1 for anything unexpected; never a traceback. A connection that fails says why:
TLS verification (with the reason), refused, timed out, or a name that does not resolve.
"""

from __future__ import annotations

import inspect
import socket
import ssl
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import NoReturn

import typer

from keyservice.errors import ArchiverUnreachable, KeyServiceError
from keyservice.exitcodes import ExitCode
from keyservice.text import printable

EXIT_UNEXPECTED = ExitCode.UNEXPECTED
EXIT_INTERRUPTED = ExitCode.INTERRUPTED


def version() -> str:
    try:
        return metadata.version("fusion-keyservice")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def add_version_option(app: typer.Typer, prog: str) -> None:
    """``PROG --version``: print the version and exit (before any command runs)."""

    def show(value: bool) -> None:
        if value:
            typer.echo(f"{prog} {version()}")
            raise typer.Exit()

    @app.callback()
    def _root(_version: bool = typer.Option(
            False, "--version", callback=show, is_eager=True,
            help="Print the version and exit.")) -> None:
        pass


def hidden_aliases(app: typer.Typer, aliases: Mapping[str, str]) -> None:
    """Old option spellings that keep working (scripts use them) but are not shown in help:
    ``aliases`` maps an old long option name to the current one, without the dashes
    ("url": "archiver" makes ``--url X`` mean ``--archiver X`` in every command of ``app``)."""
    settings = dict(app.info.context_settings or {})
    # click normalizes every option name, declared or given, through this function.
    settings["token_normalize_func"] = lambda name: aliases.get(name, name)
    app.info.context_settings = settings


def unwrap(text: str) -> str:
    """Help text without the line breaks of source code: paragraphs (blank lines) are kept,
    lines within one are joined, so that help is wrapped to the terminal, not to the source."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def tidy_help(app: typer.Typer) -> None:
    """Every command of ``app`` (and its groups) gets its docstring, unwrapped, as help."""
    for command in app.registered_commands:
        text = command.help or (command.callback.__doc__ if command.callback else None)
        if text:
            command.help = unwrap(text)
    for group in app.registered_groups:
        if group.help:
            group.help = unwrap(group.help)
        if group.typer_instance is not None:
            if group.typer_instance.info.help:
                group.typer_instance.info.help = unwrap(group.typer_instance.info.help)
            tidy_help(group.typer_instance)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def connection_failure(exc: BaseException) -> str:
    """Why a connection failed, in words, from the exception and what it was raised from
    (httpx wraps the socket's and the TLS layer's own errors)."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "unknown reason"
            return (f"TLS certificate verification failed ({reason}); give the CA that issued "
                    "the Archiver's certificate with --tls-ca (or FUSION_TLS_CA)")
        if isinstance(cause, ssl.SSLError):
            return f"the TLS handshake failed ({cause.reason or cause}); is it an HTTPS port?"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: nothing listens on that address and port"
        if isinstance(cause, socket.gaierror):
            return f"the host name does not resolve (DNS: {cause.strerror or cause})"
        if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
            return "no answer in time (timeout); check the address, a firewall, the network"
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def unreachable(url: str, exc: BaseException) -> ArchiverUnreachable:
    return ArchiverUnreachable(f"Cannot reach the Archiver at {url}: {connection_failure(exc)}.")


def _is_http_error(exc: BaseException) -> bool:
    import httpx  # only the two HTTP CLIs get here with one

    return isinstance(exc, httpx.HTTPError)


def failure(exc: BaseException) -> tuple[str, int]:
    """One sentence and the exit code for any exception a CLI lets through."""
    if isinstance(exc, KeyServiceError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt | typer.Abort):
        return "interrupted", EXIT_INTERRUPTED
    if _is_http_error(exc):
        error = ArchiverUnreachable(f"The connection to the Archiver failed: "
                                    f"{connection_failure(exc)}.")
        return str(error), error.exit_code
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "") + ".", EXIT_UNEXPECTED
    return (f"Unexpected error ({type(exc).__name__}: {exc}); please report it.",
            EXIT_UNEXPECTED)


def say(prog: str, message: str) -> None:
    # Messages quote tokens, certificates and the Archiver: never let them drive the terminal.
    typer.echo(f"{prog}: {printable(message, newlines=True)}", err=True)


def run(app: typer.Typer, prog: str, argv: list[str] | None = None) -> NoReturn:
    """The console-script entry point of each CLI."""
    tidy_help(app)
    try:
        code = app(args=argv, prog_name=prog, standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (bad option, missing argument)
        if type(exc).__name__ != "NoArgsIsHelpError":  # the help text was printed already
            exc.show()  # type: ignore[attr-defined]
        raise SystemExit(getattr(exc, "exit_code", ExitCode.USAGE)) from None
    except SystemExit:
        raise
    except BaseException as exc:  # the last line of defence against tracebacks
        message, code = failure(exc)
        say(prog, message)
        raise SystemExit(code) from None
    raise SystemExit(code if isinstance(code, int) else ExitCode.OK)
