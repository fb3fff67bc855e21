"""One error-to-exit policy for the three CLIs (fusion-keys, fusion-archiver, fusion-client),
without any CLI framework: a library (or the web page) maps an error to its sentence and exit
code the same way the command lines do.

Every failure is one sentence and an exit code: a KeyServiceError's own ``exit_code``
(docs/client.md lists them), 130 for an interruption, 1 for anything unexpected; never a
traceback. A connection that fails says why: TLS verification (with the reason), refused, timed
out, or a name that does not resolve. The typer side (entry point, help, ``--version``) is
keyservice.cli_support, imported by the CLIs only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from keyservice.errors import ArchiverUnreachable, KeyServiceError
from keyservice.exitcodes import ExitCode

__all__ = ["EXIT_INTERRUPTED", "EXIT_UNEXPECTED", "connection_failure", "failure", "unreachable",
           "version"]

EXIT_UNEXPECTED = ExitCode.UNEXPECTED
EXIT_INTERRUPTED = ExitCode.INTERRUPTED


def version() -> str:
    from importlib import metadata  # ~10 ms of imports, for --version only (issue 23)

    try:
        return metadata.version("fusion-keyservice")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


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
    import socket  # here, not at the top: only a failure needs them (issue 23: start-up)
    import ssl

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


def _is_abort(exc: BaseException) -> bool:
    """click's Abort (Ctrl-C at a prompt), recognized without importing the CLI framework."""
    return any(cls.__name__ == "Abort" and cls.__module__.startswith("click")
               for cls in type(exc).__mro__)


def _is_http_error(exc: BaseException) -> bool:
    # An httpx error exists only in a process that imported httpx: fusion-keys' failures need
    # not import it to be told apart (issue 23: start-up).
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.HTTPError)


def failure(exc: BaseException) -> tuple[str, int]:
    """One sentence and the exit code for any exception a CLI lets through."""
    if isinstance(exc, KeyServiceError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt) or _is_abort(exc):
        return "interrupted", EXIT_INTERRUPTED
    if _is_http_error(exc):
        error = ArchiverUnreachable(f"The connection to the Archiver failed: "
                                    f"{connection_failure(exc)}.")
        return str(error), error.exit_code
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "") + ".", EXIT_UNEXPECTED
    return (f"Unexpected error ({type(exc).__name__}: {exc}); please report it.",
            EXIT_UNEXPECTED)
