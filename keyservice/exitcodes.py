"""The exit codes of the three CLIs (fusion-keys, fusion-archiver, fusion-client), in one enum.

Every code means one thing in every CLI: each error class's ``exit_code`` and every
``SystemExit`` of ours is a member of this enum, and the viewer's web page receives the same
number and name for a failure (``{"code": 11, "error": "INTEGRITY", ...}``). docs/client.md's
table lists them; tests/test_exit_codes.py checks that the table, the enum and the code agree.
Numbers are a public interface (scripts test them): a member is never renumbered or reused.
                                                                                       [pure]
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class ExitCode(IntEnum):
    OK = 0                      # also: live stopped with Ctrl-C, a reader that closed the pipe
    UNEXPECTED = 1              # a bug: one sentence, please report it
    USAGE = 2                   # a bad option, time, camera name, URL or pin file line
    # fusion-archiver's own
    ARCHIVE_DAMAGED = 3         # `check`: the archive (or its index) is damaged
    DATA_DIR_IN_USE = 4         # another Archiver or command holds the data directory
    ADDRESS_IN_USE = 5          # `serve`: the port is taken
    # the fusion stream
    FORMAT = 10                 # not a well-formed fusion stream
    INTEGRITY = 11              # authentication failed (opaque on purpose)
    NO_MATCHING_IDENTITY = 12   # nothing in the stream is addressed to this certificate
    REQUEST_MISMATCH = 13       # genuine, but not an answer to this request
    # tokens (PKCS#11)
    TOKEN = 20
    PIN_INCORRECT = 21
    PIN_LOCKED = 22
    TOKEN_NOT_FOUND = 23
    OBJECT_NOT_FOUND = 24
    OBJECT_EXISTS = 25
    MECHANISM_UNSUPPORTED = 26
    MODULE_NOT_FOUND = 27
    TOKEN_REMOVED = 28
    # certificates and TLS
    CERTIFICATE = 30
    ARCHIVER_MISMATCH = 31      # the Archiver's certificate differs from the pinned one
    TLS_CA = 32                 # the --tls-ca / FUSION_TLS_CA given cannot be used
    # the Archiver's HTTP API
    ARCHIVER_UNREACHABLE = 40
    REQUEST_REFUSED = 41
    ARCHIVER_FAILED = 42
    NOT_ENROLLED = 43
    VIEWER_REVOKED = 44
    NOT_AUTHORIZED = 45
    UNKNOWN_CAMERA = 46
    NO_RECORDING = 47
    LOGIN_REFUSED = 48
    # playing a stream
    STREAM_TRUNCATED = 50       # no signed end record: truncated, or the connection broke
    NOTHING_AUTHORIZED = 51
    OUTPUT_FAILED = 52
    RANGE_INCOMPLETE = 53       # authentic, but not shown to cover the whole range
    RECORDING_EXPIRED = 54
    GRANT_NOT_USABLE = 55
    OUTSIDE_GRANT = 56
    UNKNOWN_GRANT = 57
    REMUX_FAILED = 58           # the web viewer: a verified segment could not become MP4
    EXPIRY_UNPROVEN = 59        # withheld: an "expired" without a valid signed statement
    # fusion-client evidence
    NOT_VERIFIED = 60           # `evidence verify`: a check failed, or the package is unreadable
    PARTLY_VERIFIED = 61
    EVIDENCE_INCOMPLETE = 62
    SIGNER_NOT_ESTABLISHED = 63
    EVIDENCE_EXPORT_FAILED = 64  # `evidence export`: the package cannot be built or written
    INTERRUPTED = 130           # Ctrl-C (128 + SIGINT, as shells report it)
