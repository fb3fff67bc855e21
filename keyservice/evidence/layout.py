"""Evidence packages: the layout both the builder and the verifier use (file names, the
labels of sealed keys, EvidenceError). Pure."""

from __future__ import annotations

import datetime as dt

from keyservice import labels
from keyservice.errors import KeyServiceError
from keyservice.exitcodes import ExitCode

FORMAT = "fusion-evidence/1"
# A range across a change of Archiver: one fusion-evidence/1 package per part, each in its
# own directory (parts/01/, ...), under one index and one SHA256SUMS (keyservice.evidence.parts).
FORMAT_PARTS = "fusion-evidence/2"
INDEX = "EVIDENCE.json"
SUMS = "SHA256SUMS"
CERT = "archiver.pem"
KEYS = "keys.txt"
SEALED_KEYS = "keys.sealed"
RECIPIENT = "recipient.pem"
VIDEO = "video.ts"
# The stream the export received, as far as the Archiver's END signature covers it: its header
# record, the SHA-256 of every record before END (one hex line each, in stream order) and END.
STREAM_HEADER = "stream/header.rec"
STREAM_DIGESTS = "stream/digests.txt"
STREAM_END = "stream/end.rec"
STREAM_END_SIGNED = "stream/end.signed"
STREAM_END_SIG = "stream/end.sig"
STREAM_FILES = (STREAM_HEADER, STREAM_DIGESTS, STREAM_END, STREAM_END_SIGNED, STREAM_END_SIG)
# The package key is wrapped under keyservice.labels.evidence_key_context: it keeps a
# recipient's token from being used to open anything else (an epoch opener, a login challenge)
# through a crafted package, and those from being passed off as this. (Re-exported here.)
LABEL_EVIDENCE_KEY = labels.LABEL_EVIDENCE_KEY
LABEL_EVIDENCE_KEYS_AD = labels.LABEL_EVIDENCE_KEYS_AD
# Limits a verifier enforces before it parses anything (a package is untrusted input).
MAX_FILES = 1_000_000


class EvidenceError(KeyServiceError):
    """A package cannot be built, read or opened (its verification failures are reported,
    not raised: see Report)."""

    exit_code = ExitCode.EVIDENCE_EXPORT_FAILED


def manifest_name(seq: int, ext: str) -> str:
    return f"manifests/m{seq:020d}.{ext}"


def part_dir(index: int) -> str:
    """The directory of part ``index`` (1-based) of a fusion-evidence/2 package."""
    return f"parts/{index:02d}/"


def segment_name(index: int) -> str:
    return f"segments/s{index:08d}.seg"


def iso_time(ms: int) -> str:
    try:
        when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
