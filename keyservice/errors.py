"""The error family shared by the library, the Archiver and the viewer.

Every error carries one sentence saying what is wrong and, where there is one, what to do.
CLIs print ``str(error)`` and exit with ``error.exit_code``; nobody prints a traceback.

Decryption and verification failures are deliberately *one* opaque type (IntegrityError):
telling an attacker which check failed (tag, signature, chain, commitment) helps them.
"""

from __future__ import annotations


class KeyServiceError(Exception):
    """Base of every error a user may see. ``wire_code`` and ``http_status``: what the
    Archiver answered, when the error is its refusal (keyservice.wire.ErrorCode's value)."""

    exit_code = 1
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

    exit_code = 10


class IntegrityError(KeyServiceError):
    """Authentication failed. Opaque on purpose: no hint which check failed."""

    exit_code = 11

    def __init__(self, message: str = "The stream failed authentication: it was altered, "
                 "reordered, truncated or forged.", advice: str | None = None) -> None:
        super().__init__(message, advice)


class NoMatchingIdentity(KeyServiceError):
    """Nothing in the stream is addressed to this viewer's certificate."""

    exit_code = 12


class RequestMismatch(KeyServiceError):
    """The stream is genuine but does not answer this request: another nonce (a replayed or
    relayed stream), camera, mode or range, footage outside the requested range, or a live
    stream that is not fresh. Not opaque: the Archiver's signatures verified (or will be
    checked), the question is only whether this is what was asked for."""

    exit_code = 13


class RangeIncomplete(KeyServiceError):
    """The stream is authentic and answers the request, but it cannot show that it covers the
    whole requested range: recorded segments are missing, or its first or last manifest is not
    proven to be the edge of the range."""

    exit_code = 53


# --- tokens (PKCS#11) --------------------------------------------------------------------
class TokenError(KeyServiceError):
    exit_code = 20


class PinIncorrect(TokenError):
    exit_code = 21


class PinLocked(TokenError):
    exit_code = 22


class TokenNotFound(TokenError):
    exit_code = 23


class ObjectNotFound(TokenError):
    exit_code = 24


class ObjectExists(TokenError):
    exit_code = 25


class MechanismUnsupported(TokenError):
    exit_code = 26


class ModuleNotFound(TokenError):
    exit_code = 27


class TokenRemoved(TokenError):
    exit_code = 28


# --- the Archiver's HTTP API, seen from a CLI (exit codes documented in docs/client.md) -----
class ArchiverUnreachable(KeyServiceError):
    """No answer: TLS verification failed, the connection was refused or timed out, no DNS."""

    exit_code = 40


class RequestRefused(KeyServiceError):
    """The Archiver refused the request (a 4xx without a more specific class)."""

    exit_code = 41


class ArchiverFailed(KeyServiceError):
    """The Archiver failed (5xx) or answered something that is not its API."""

    exit_code = 42


# --- certificates and usage --------------------------------------------------------------
class CertificateError(KeyServiceError):
    """A certificate is unreadable, expired, too weak, or not what it should be."""

    exit_code = 30


class ArchiverMismatch(KeyServiceError):
    """The Archiver's certificate differs from the pinned one (possible impersonation)."""

    exit_code = 31


class TlsCaError(KeyServiceError):
    """The TLS CA given (--tls-ca or FUSION_TLS_CA) cannot be used: missing, unreadable, or
    holds no CA certificate. Its own code: nothing was sent, and no Archiver was judged."""

    exit_code = 32


class UsageError(KeyServiceError):
    """A command-line value or URI is malformed."""

    exit_code = 2
