"""Records of fusion stream v2: exact encoding, strict decoding, the splitter's framing rules."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace

import pytest

from keyservice.errors import FormatError
from keyservice.format import (
    MAGIC,
    MAX_SEGMENT_BODY,
    MAX_SMALL_BODY,
    VERSION,
    ChainRecipients,
    ChainRecord,
    DataStream,
    End,
    EpochOpener,
    Header,
    KeyCommitment,
    Manifest,
    ManifestEntry,
    Mode,
    Segment,
    chain_statement_number,
    decode_record,
    encode_record,
    segment_digest,
    stream_prefix,
    validate_name,
)
from keyservice.framing import RecordSplitter
from keyservice.keyscheme import KeyScheme


def b(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


HEADER = Header(b"\x30\x03\x02\x01\x01", b(32, 1), b(16, 2), 1_700_000_000_000, Mode.LIVE,
                5, 6, ("cam-1", "cam.2"))
OPENER = EpochOpener(b(16, 3), b(32, 1), KeyScheme.RSA_OAEP_SHA1, 60, 28_333_333, b(256, 4))
KEY_RECORD = ChainRecord(b(16, 3), 7, "cam-1", DataStream.AUDIO, b(12, 5), 28_333_333,
                         b(12, 6), b(48, 7))
SEGMENT = Segment("cam-1", DataStream.METADATA, 2**64 - 1, 123, b(16, 5), 1, b(40, 8), 2000)
ENTRY = ManifestEntry(DataStream.METADATA, 2**64 - 1, 123, b(16, 5), b(16, 8), b(32, 9), 2000)
MANIFEST = Manifest("cam-1", 4, b(32, 10), 99, 0, (ENTRY,), (KeyCommitment(b(16, 5), b(32, 11)),),
                    b(70, 12))
END = End(b(16, 2), 2, b(32, 13), b(71, 14))
GRANT = ChainRecipients("cam-1", DataStream.VIDEO, b(12, 5), 28_333_333, 0, 1,
                        (b(32, 1), b(32, 2)), b(70, 15))
ALL = [HEADER, OPENER, KEY_RECORD, SEGMENT, MANIFEST, GRANT, END]


def test_chain_recipients_list_viewers_canonically_in_parts() -> None:
    with pytest.raises(FormatError, match="part i of n"):
        replace(GRANT, part=1, parts=1)
    assert decode_record(encode_record(replace(GRANT, part=2, parts=3))).part == 2
    with pytest.raises(FormatError, match="ascending"):
        replace(GRANT, viewers=(b(32, 2), b(32, 1)))
    with pytest.raises(FormatError, match="distinct"):
        replace(GRANT, viewers=(b(32, 1), b(32, 1)))
    with pytest.raises(FormatError):
        replace(GRANT, viewers=(b(31, 1),))


def test_a_statement_number_is_read_at_its_place_as_decoding_reads_it() -> None:
    """The Archiver indexes its own signed statements by chain_statement_number (not by
    decoding them on the ingest path): it must agree with the decoder for start parts, join
    statements and any camera-name length, and refuse any other record."""
    many = tuple(bytes([i // 256, i % 256]) + b(30, 0) for i in range(2000))
    for statement in (GRANT, replace(GRANT, camera="c", part=2, parts=3, viewers=many),
                      replace(GRANT, camera="x" * 64, part=7, parts=3, join_step=9),
                      replace(GRANT, part=0xFFFF, parts=1, join_step=2**32 - 1)):
        raw = encode_record(statement)
        assert chain_statement_number(raw) == decode_record(raw).part == statement.part
    for other in (KEY_RECORD, MANIFEST, END):
        with pytest.raises(FormatError, match="Not a chain-recipients record"):
            chain_statement_number(encode_record(other))  # type: ignore[arg-type]
    for cut in (b"", encode_record(GRANT)[:5], encode_record(GRANT)[:32]):
        with pytest.raises(FormatError):
            chain_statement_number(cut)


@pytest.mark.parametrize("record", ALL, ids=lambda r: type(r).__name__)
def test_round_trip(record: object) -> None:
    data = encode_record(record)  # type: ignore[arg-type]
    assert data[0] == record.record_type  # type: ignore[attr-defined]
    assert struct.unpack(">I", data[1:5])[0] == len(data) - 5
    assert decode_record(data) == record


def test_layout_of_a_chain_record_byte_by_byte() -> None:
    # Written out from the spec, field by field, not from the encoder.
    expected = (b"\x03" + struct.pack(">I", 16 + 4 + 6 + 1 + 12 + 8 + 12 + 48)
                + b(16, 3) + struct.pack(">I", 7) + b"\x05cam-1" + b"\x01" + b(12, 5)
                + struct.pack(">Q", 28_333_333) + b(12, 6) + b(48, 7))
    assert encode_record(KEY_RECORD) == expected


def test_layout_of_chain_recipients_byte_by_byte() -> None:
    unsigned = (b"\x05cam-1" + b"\x00" + b(12, 5) + struct.pack(">QHHH", 28_333_333, 0, 1, 2)
                + b(32, 1) + b(32, 2))
    assert GRANT.signed_bytes() == b"FSE2 chain-recipients\x00" + unsigned
    assert encode_record(GRANT) == (b"\x07" + struct.pack(">I", len(unsigned) + 2 + 70)
                                    + unsigned + b"\x00\x46" + b(70, 15))


def test_layout_of_a_segment_and_its_tag() -> None:
    expected = (b"\x04" + struct.pack(">I", 6 + 1 + 8 + 8 + 4 + 16 + 1 + 40) + b"\x05cam-1\x02"
                + b"\xff" * 8 + struct.pack(">Q", 123) + struct.pack(">I", 2000) + b(16, 5)
                + b"\x01" + b(40, 8))
    assert encode_record(SEGMENT) == expected
    assert SEGMENT.tag == b(16, 8) and SEGMENT.last
    assert segment_digest(SEGMENT) == hashlib.sha256(expected).digest()


def test_signed_bytes_exclude_the_signature_and_carry_a_label() -> None:
    assert MANIFEST.signed_bytes().startswith(b"FSE1 manifest\x00")
    assert replace(MANIFEST, signature=b"other").signed_bytes() == MANIFEST.signed_bytes()
    body = encode_record(MANIFEST)[5:]
    assert body == MANIFEST.signed_bytes()[len(b"FSE1 manifest\x00"):] + b"\x00\x46" + b(70, 12)
    assert END.signed_bytes() == b"FSE1 end\x00" + b(16, 2) + b"\x02" + b(32, 13) + b"\x00"
    with_heads = replace(END, heads=(("cam-1", 7),))
    assert with_heads.signed_bytes() == (b"FSE1 end\x00" + b(16, 2) + b"\x02" + b(32, 13)
                                         + b"\x01\x05cam-1" + struct.pack(">Q", 7))
    assert decode_record(encode_record(with_heads)) == with_heads


def test_prefix() -> None:
    assert stream_prefix() == MAGIC + struct.pack(">H", VERSION) == b"FUSNSTRM\x00\x02"


@pytest.mark.parametrize("name", ["a", "cam-01", "Gate_2.north", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "x" * 65, "a/b", "caméra", "a b", "a\n", 7])
def test_invalid_names(name: object) -> None:
    with pytest.raises(FormatError):
        validate_name(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda: replace(SEGMENT, flags=2),  # reserved flag bit
    lambda: replace(SEGMENT, ciphertext=b(15, 0)),  # shorter than the tag
    lambda: replace(SEGMENT, key_id=b(15, 0)),
    lambda: replace(SEGMENT, seq=2**64),
    lambda: replace(SEGMENT, stream=3),
    lambda: replace(HEADER, cameras=("a", "a")),
    lambda: replace(HEADER, cameras=()),
    lambda: replace(HEADER, cameras="cam"),
    lambda: replace(HEADER, mode=3),
    lambda: replace(OPENER, period_s=0),
    lambda: replace(OPENER, period_s=86401),
    lambda: replace(OPENER, key_scheme=3),
    lambda: replace(OPENER, ciphertext=b""),
    lambda: replace(END, reason=0),
    lambda: replace(MANIFEST, flags=0x80),
    lambda: replace(MANIFEST, commitments=()),  # a key in use without commitment
    lambda: replace(MANIFEST, commitments=MANIFEST.commitments * 2),
    lambda: replace(MANIFEST, entries=(ENTRY, ENTRY)),
    lambda: replace(KEY_RECORD, wrapped=b(47, 0)),
], ids=range(19))
def test_models_refuse_malformed_fields(make: object) -> None:
    with pytest.raises(FormatError):
        make()  # type: ignore[operator]


def test_decoding_refuses_every_truncation_and_trailing_bytes() -> None:
    for record in ALL:
        data = encode_record(record)
        # A segment's ciphertext is "the rest of the body": cutting it is only malformed
        # below the 16-byte tag.
        valid_from = len(data) - 24 if isinstance(record, Segment) else len(data)
        for cut in range(5, valid_from):
            framed = data[:1] + struct.pack(">I", cut - 5) + data[5:cut]
            with pytest.raises(FormatError):
                decode_record(framed)
        if not isinstance(record, Segment):  # (for a segment it is one more ciphertext byte)
            with pytest.raises(FormatError, match="trailing"):
                decode_record(data[:1] + struct.pack(">I", len(data) - 4) + data[5:] + b"\x00")
        with pytest.raises(FormatError):
            decode_record(data[:-1])  # length field disagrees


def test_decoding_refuses_unknown_type_and_oversized_length() -> None:
    with pytest.raises(FormatError, match="Unknown record type 8"):
        decode_record(b"\x08\x00\x00\x00\x00")
    with pytest.raises(FormatError, match="limit"):
        decode_record(b"\x03" + struct.pack(">I", MAX_SMALL_BODY + 1))


def test_oversized_manifest_cannot_be_encoded() -> None:
    entries = tuple(replace(ENTRY, seq=i) for i in range(MAX_SMALL_BODY // ManifestEntry.SIZE + 1))
    manifest = replace(MANIFEST, entries=entries)
    with pytest.raises(FormatError, match="fewer segments"):
        encode_record(manifest)


def _stream() -> bytes:
    return stream_prefix() + b"".join(encode_record(r) for r in ALL)


def test_splitter_in_one_piece_and_byte_by_byte() -> None:
    data = _stream()
    whole = RecordSplitter().feed(data)
    assert [r for r, _ in whole] == ALL
    assert [raw for _, raw in whole] == [encode_record(r) for r in ALL]
    splitter = RecordSplitter()
    pieces = [item for i in range(len(data)) for item in splitter.feed(data[i:i + 1])]
    assert pieces == whole
    assert splitter.finished_cleanly and splitter.ended


def test_splitter_refuses_bytes_after_end() -> None:
    splitter = RecordSplitter()
    splitter.feed(_stream())
    with pytest.raises(FormatError, match="follow the end"):
        splitter.feed(b"\x00")
    with pytest.raises(FormatError):  # and stays failed
        splitter.feed(b"")


def test_splitter_names_an_unknown_version() -> None:
    # Version 1 (key records per minute) is no longer read: no release was made with it.
    with pytest.raises(FormatError, match="version 1; this reader supports version 2"):
        RecordSplitter().feed(MAGIC + b"\x00\x01")


def test_splitter_refuses_wrong_magic_at_the_first_byte() -> None:
    with pytest.raises(FormatError, match="magic"):
        RecordSplitter().feed(b"G")
    splitter = RecordSplitter()
    assert splitter.feed(b"FUSN") == []
    assert not splitter.finished_cleanly


def test_splitter_checks_the_length_before_the_body_arrives() -> None:
    splitter = RecordSplitter()
    splitter.feed(stream_prefix())
    with pytest.raises(FormatError, match="limit"):
        splitter.feed(b"\x04" + struct.pack(">I", MAX_SEGMENT_BODY + 1))


def test_splitter_reports_a_partial_record() -> None:
    splitter = RecordSplitter()
    data = _stream()
    splitter.feed(data[:-3])
    assert not splitter.finished_cleanly
    assert splitter.feed(data[-3:])[-1][0] == END
    assert splitter.finished_cleanly


def test_splitter_yields_records_one_at_a_time() -> None:
    # A consumer acts on (and may fail at) record n before record n+1 is parsed.
    data = stream_prefix() + encode_record(HEADER) + b"\x08\x00\x00\x00\x00"
    iterator = RecordSplitter().iter_feed(data)
    assert next(iterator)[0] == HEADER
    with pytest.raises(FormatError, match="Unknown record type 8"):
        next(iterator)


def test_decoded_segment_views_its_record_without_copying() -> None:
    data = encode_record(SEGMENT)
    segment = decode_record(data)
    assert isinstance(segment, Segment) and isinstance(segment.ciphertext, memoryview)
    assert segment.ciphertext.obj is data and segment.ciphertext.readonly
    assert segment == SEGMENT and hash(segment) == hash(SEGMENT) and segment.tag == SEGMENT.tag
    assert encode_record(segment) == data
    # A decoded bytearray is copied first, so the record cannot change afterwards.
    mutable = bytearray(data)
    copy = decode_record(mutable)  # type: ignore[arg-type]
    mutable[-1] ^= 1
    assert copy == SEGMENT


def test_a_writable_view_is_refused() -> None:
    with pytest.raises(FormatError, match="read-only"):
        replace(SEGMENT, ciphertext=memoryview(bytearray(40)))


@pytest.mark.parametrize("record", ALL, ids=lambda r: type(r).__name__)
def test_record_parts_join_to_the_record(record: object) -> None:
    from keyservice.format import encode_record_parts

    parts = encode_record_parts(record)  # type: ignore[arg-type]
    assert b"".join(parts) == encode_record(record)  # type: ignore[arg-type]
    if isinstance(record, Segment):
        assert parts[1] is record.ciphertext  # not copied


def test_splitter_refuses_bytes_after_end_in_the_same_piece() -> None:
    splitter = RecordSplitter()
    records = []
    with pytest.raises(FormatError, match="follow the end"):
        for record, _ in splitter.iter_feed(_stream() + b"\x00"):
            records.append(record)
    assert records == ALL  # the END itself was delivered first, then the error


def test_splitter_copies_a_record_at_most_once_and_pins_little() -> None:
    big = replace(SEGMENT, ciphertext=bytes(range(256)) * 40)
    record = encode_record(big)
    splitter = RecordSplitter()
    splitter.feed(stream_prefix() + encode_record(HEADER))
    # A record that is the whole piece (or most of it) is a view of the piece: no copy.
    [(segment, raw)] = splitter.feed(record)
    assert isinstance(raw, memoryview) and raw.obj is record and raw.readonly
    assert isinstance(segment, Segment) and segment.ciphertext.obj is record and segment == big
    # A record split over pieces is joined once into its own bytes.
    assert splitter.feed(record[:3000]) == []
    [(segment, raw)] = splitter.feed(record[3000:])
    assert type(raw) is bytes and raw == record and segment == big
    assert segment.ciphertext.obj is raw  # the segment views the joined bytes, no second copy
    # A small record inside a large piece is copied, so that keeping it (a reader holds
    # segments until their manifest) does not keep the whole piece alive.
    piece = encode_record(KEY_RECORD) + record
    [(_, small), (_, large)] = splitter.feed(piece)
    assert type(small) is bytes and small == encode_record(KEY_RECORD)
    assert isinstance(large, memoryview) and large.obj is piece
    assert splitter.finished_cleanly


def test_splitter_takes_bytes_like_pieces_and_copies_mutable_ones() -> None:
    data = bytearray(_stream())
    splitter = RecordSplitter()
    records = splitter.feed(data)  # type: ignore[arg-type]
    data[:] = bytes(len(data))  # the caller reuses its buffer
    assert [r for r, _ in records] == ALL
    assert [bytes(raw) for _, raw in records] == [encode_record(r) for r in ALL]
