"""Coverage-guided fuzz target for the fusion stream reader (atheris / libFuzzer).

The only acceptable outcomes for any input are success, FormatError, IntegrityError and
NoMatchingIdentity (or, for a playback stream whose edges do not hold, RequestMismatch and
RangeIncomplete); anything else (an IndexError, a struct.error, a hang) is a finding.

    # seeds: every test vector's stream, one file each
    python tests/fuzz/fuzz_reader.py --write-seeds fuzz-corpus
    # short run (what CI does, see tests/keyservice/test_fuzz_smoke.py)
    python tests/fuzz/fuzz_reader.py -atheris_runs=20000 fuzz-corpus
    # longer run, both cores, an hour; findings land in ./crash-*
    python tests/fuzz/fuzz_reader.py -max_total_time=3600 -jobs=2 -workers=2 \\
        -max_len=65536 fuzz-corpus

The first input byte picks how the rest is cut into pieces, so the incremental paths (a record
split anywhere) are fuzzed too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["keyservice"]):
    from keyservice.errors import (
        FormatError,
        IntegrityError,
        NoMatchingIdentity,
        RangeIncomplete,
        RequestMismatch,
    )
    from keyservice.framing import RecordSplitter  # noqa: F401  (instrumented with the rest)
    from keyservice.reader import StreamReader

from cryptography import x509  # noqa: E402

from keyservice.identity import SoftwareIdentity, fingerprint  # noqa: E402
from tests.vectors import generate  # noqa: E402

IDENTITY = generate.load_identity("viewer-a")
PINNED = fingerprint(generate.load_cert("archiver"))
CHUNK_SIZES = (1 << 30, 1, 2, 3, 5, 7, 16, 64, 255, 1000)


def pin(cert: x509.Certificate) -> None:
    if fingerprint(cert) != PINNED:
        raise IntegrityError()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = CHUNK_SIZES[data[0] % len(CHUNK_SIZES)]
    stream = data[1:]
    reader = StreamReader(SoftwareIdentity(IDENTITY.certificate, IDENTITY.private_key), pin)
    if data[0] & 0x80:  # reuse buffers for small segments too, so that path is fuzzed
        reader._buffers.min_size = 32
    try:
        for i in range(0, len(stream), step):
            reader.feed(stream[i:i + step])
        reader.finish()
    except (FormatError, IntegrityError, NoMatchingIdentity, RequestMismatch, RangeIncomplete):
        pass


def write_seeds(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted((ROOT / "tests" / "vectors" / "v2").glob("*.json")):
        vector = json.loads(path.read_text())
        if vector["viewer"] != "viewer-a":
            continue
        stream = bytes.fromhex("".join(vector["stream_hex"]))
        (directory / path.stem).write_bytes(b"\x00" + stream)  # first byte 0: one piece
        count += 1
    return count


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        print(f"wrote {write_seeds(Path(sys.argv[2]))} seeds")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
