"""The error family shared by the library, the Archiver and the viewer.

Every error carries one sentence saying what is wrong and, where there is one, what to do.
CLIs print ``str(error)`` and exit with ``error.exit_code``; nobody prints a traceback.

Decryption and verification failures are deliberately *one* opaque type (IntegrityError):
telling an attacker which check failed (tag, signature, chain, commitment) helps them.
A stream that merely *stops* early is not one of them: StreamTruncated says that what came
verified and that the Archiver's signed end record did not come (its own exit code, 50), and
RangeIncomplete that an authentic stream cannot show it covers the whole range (53). (The
format-level reader, held to the spec and its test vectors, still calls a stream without END an
IntegrityError when asked to finish; the viewer library checks for the end record first and
says StreamTruncated, which is what users and scripts see.) A value
the user typed that is not acceptable (a camera name, a time, a URI) is a UsageError (2), not
a FormatError: FormatError is for bytes received or read that are not a fusion stream.

Each class's ``exit_code`` is a member of keyservice.exitcodes.ExitCode (one meaning per code
across the three CLIs and the web page).
"""

from __future__ import annotations

from keyservice.exitcodes import ExitCode


class KeyServiceError(Exception):
    """Base of every error a user may see. ``wire_code`` and ``http_status``: what the
    Archiver answered, when the error is its refusal (keyservice.wire.ErrorCode's value)."""

    exit_code: ExitCode = ExitCode.UNEXPECTED
    wire_code: str | None = None
    http_status: int | None = None

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.advice = advice

    def __str__(self) -> str:
        return f"{self.message} {self.advice}" if self.advice else self.message


# --- the fusion stream -------------------------------------------------------------------
class FormatError(KeyServiceError):
    """The bytes are not a well-formed fusion stream (or archive record)."""

    exit_code = ExitCode.FORMAT


class IntegrityError(KeyServiceError):
    """Authentication failed. Opaque on purpose: no hint which check failed."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, message: str = "The stream failed authentication: it was altered, "
                 "reordered, truncated or forged.", advice: str | None = None) -> None:
        super().__init__(message, advice)


class NoMatchingIdentity(KeyServiceError):
    """Nothing in the stream is addressed to this viewer's certificate."""

    exit_code = ExitCode.NO_MATCHING_IDENTITY


class RequestMismatch(KeyServiceError):
    """The stream is genuine but does not answer this request: another nonce (a replayed or
    relayed stream), camera, mode or range, footage outside the requested range, or a live
    stream that is not fresh. Not opaque: the Archiver's signatures verified (or will be
    checked), the question is only whether this is what was asked for."""

    exit_code = ExitCode.REQUEST_MISMATCH


class RangeIncomplete(KeyServiceError):
    """The stream is authentic and answers the request, but it cannot show that it covers the
    whole requested range: recorded segments are missing, or its first or last manifest is not
    proven to be the edge of the range."""

    exit_code = ExitCode.RANGE_INCOMPLETE


class StreamTruncated(KeyServiceError):
    """The stream stopped before the Archiver's signed end record: it was cut, the connection
    broke, or the Archiver dropped this viewer. Not an IntegrityError: everything released so
    far verified; what is missing is the proof that nothing follows (the output is kept as
    ``.incomplete``, never passed off as complete)."""

    exit_code = ExitCode.STREAM_TRUNCATED


# --- tokens (PKCS#11) --------------------------------------------------------------------
class TokenError(KeyServiceError):
    exit_code = ExitCode.TOKEN


class PinIncorrect(TokenError):
    exit_code = ExitCode.PIN_INCORRECT


class PinLocked(TokenError):
    exit_code = ExitCode.PIN_LOCKED


class TokenNotFound(TokenError):
    exit_code = ExitCode.TOKEN_NOT_FOUND


class ObjectNotFound(TokenError):
    exit_code = ExitCode.OBJECT_NOT_FOUND


class ObjectExists(TokenError):
    exit_code = ExitCode.OBJECT_EXISTS


class MechanismUnsupported(TokenError):
    exit_code = ExitCode.MECHANISM_UNSUPPORTED


class ModuleNotFound(TokenError):
    exit_code = ExitCode.MODULE_NOT_FOUND


class TokenRemoved(TokenError):
    exit_code = ExitCode.TOKEN_REMOVED


# --- the Archiver's HTTP API, seen from a CLI (exit codes documented in docs/client.md) -----
class ArchiverUnreachable(KeyServiceError):
    """No answer: TLS verification failed, the connection was refused or timed out, no DNS."""

    exit_code = ExitCode.ARCHIVER_UNREACHABLE


class RequestRefused(KeyServiceError):
    """The Archiver refused the request (a 4xx without a more specific class)."""

    exit_code = ExitCode.REQUEST_REFUSED


class ArchiverFailed(KeyServiceError):
    """The Archiver failed (5xx) or answered something that is not its API."""

    exit_code = ExitCode.ARCHIVER_FAILED


# --- certificates and usage --------------------------------------------------------------
class CertificateError(KeyServiceError):
    """A certificate is unreadable, expired, too weak, or not what it should be."""

    exit_code = ExitCode.CERTIFICATE


class ArchiverMismatch(KeyServiceError):
    """The Archiver's certificate differs from the pinned one (possible impersonation)."""

    exit_code = ExitCode.ARCHIVER_MISMATCH


class TlsCaError(KeyServiceError):
    """The TLS CA given (--tls-ca or FUSION_TLS_CA) cannot be used: missing, unreadable, or
    holds no CA certificate. Its own code: nothing was sent, and no Archiver was judged."""

    exit_code = ExitCode.TLS_CA


class UsageError(KeyServiceError):
    """A command-line value or URI is malformed."""

    exit_code = ExitCode.USAGE
