"""Issue 23 item 1, the reader's side: a join record (a chain's state from step j > 0) counts
only under the Archiver's signed join statement naming this viewer and that step; the segments
before it are reported as not authorized (before its join), never decrypted, and nothing
before step j can be derived."""

from __future__ import annotations

from dataclasses import replace

import pytest

from keyservice.crypto import KeyChain
from keyservice.errors import FormatError, IntegrityError
from keyservice.format import ChainRecipients, ChainRecord, DataStream, decode_record, encode_record
from keyservice.fusion_writer import issue_chain_join, issue_chain_recipients
from keyservice.identity import fingerprint
from keyservice.reader import SegmentPlaintext, SegmentSkipped, StreamEnded
from tests.keyservice.rig import CAM, Rig, T
from tests.vectors import generate as vectors

VIDEO = DataStream.VIDEO
MINUTE = 60_000
OTHER = bytes(range(32))  # another viewer, the chain's start recipient


def _stream(statement: str = "good", record_step: int = 2, send_last: bool = True
            ) -> tuple[Rig, bytes]:
    """Four minutes of one chain: the viewer joins at step 2 (``statement`` says how its join
    statement is made: good, missing, rogue (signed by another key), step1 (naming step 1),
    other (naming another viewer), after (sent after the record))."""
    rig = Rig(cameras=(CAM,))
    rig.rotate(CAM, VIDEO, T, wrap=False, grant=False)
    chain: KeyChain = rig.key_chains[(CAM, VIDEO)]
    for part in issue_chain_recipients(chain, [OTHER], rig.signer):
        rig.chunks.append(rig.writer.add(part))
    rig.segment(CAM, VIDEO, T + 1, send=False)  # step 0: before the join
    rig.manifest(CAM, T + 2)
    rig.step(CAM, VIDEO, T + MINUTE + 1)
    rig.segment(CAM, VIDEO, T + MINUTE + 1, send=False)  # step 1: before the join
    rig.manifest(CAM, T + MINUTE + 2)

    me = fingerprint(rig.identity.certificate)
    signer = vectors.load_signer("rogue") if statement == "rogue" else rig.signer
    joined = {"step1": 1}.get(statement, 2)
    named = [OTHER] if statement == "other" else [me]
    join_statement = issue_chain_join(chain, 1, 1, joined, named, signer)
    rig.new_epoch(T + 2 * MINUTE)
    assert rig.epoch is not None
    record = rig.epoch.wrap_chain(chain, chain.state_at(2), T + 2 * MINUTE, first_step=2)
    if record_step != 2:  # relabelled: the wrap's associated data no longer matches
        record = replace(record, first_step=record_step)
    if statement not in ("missing", "after"):
        rig.chunks.append(rig.writer.add(join_statement))
    rig.chunks.append(rig.writer.add(record))
    if statement == "after":
        rig.chunks.append(rig.writer.add(join_statement))
    for minute in (2, 3):
        rig.step(CAM, VIDEO, T + minute * MINUTE + 1)
        rig.segment(CAM, VIDEO, T + minute * MINUTE + 1, send=send_last or minute == 2)
        rig.manifest(CAM, T + minute * MINUTE + 2)
    return rig, rig.end()


def _read(rig: Rig, data: bytes) -> list[object]:
    reader = rig.reader()
    events = list(reader.feed(data))
    reader.finish()
    return events


def test_a_joining_viewer_reads_from_its_join_step_and_is_told_why_not_before() -> None:
    rig, data = _stream()
    events = _read(rig, data)
    assert events[:2] == [SegmentSkipped(CAM, VIDEO, 0, T + 1),
                          SegmentSkipped(CAM, VIDEO, 1, T + MINUTE + 1)]
    assert [e.data for e in events[2:4] if isinstance(e, SegmentPlaintext)] == rig.plaintexts
    assert len(rig.plaintexts) == 2 and events[4] == StreamEnded(1)


def test_a_segment_withheld_after_the_join_fails_as_for_any_key_the_viewer_holds() -> None:
    # From its join step on the viewer holds the chain's keys: a segment left out there is
    # an altered stream (reader rule 7), never "not authorized".
    rig, data = _stream(send_last=False)
    with pytest.raises(IntegrityError):
        _read(rig, data)


@pytest.mark.parametrize("statement", ["missing", "after", "rogue", "step1", "other"])
def test_a_join_record_without_its_signed_statement_is_refused(statement: str) -> None:
    rig, data = _stream(statement)
    with pytest.raises(IntegrityError):
        _read(rig, data)


def test_a_join_record_relabelled_to_an_earlier_step_does_not_open() -> None:
    # The statement and the record both say step 1 but the state is S_2: the wrap's associated
    # data carries the step, so the state does not unwrap (and S_2 derives no step-1 key).
    rig, data = _stream("step1", record_step=1)
    with pytest.raises(IntegrityError):
        _read(rig, data)


def test_join_encodings_are_canonical_and_start_records_are_unchanged() -> None:
    rig = Rig(cameras=(CAM,))
    rig.new_epoch(T)
    assert rig.epoch is not None
    chain, seed = KeyChain.start(CAM, VIDEO, 60, T)
    start = encode_record(rig.epoch.wrap_chain(chain, seed, T))
    assert len(start) == 5 + 16 + 4 + 1 + len(CAM) + 1 + 12 + 8 + 12 + 48  # as before joins
    chain.key_at(T)
    join = encode_record(rig.epoch.wrap_chain(chain, chain.state_at(1), T, first_step=1))
    assert len(join) == len(start) + 4 and decode_record(join).first_step == 1  # type: ignore[union-attr]
    # A first step of 0 written out is not a second spelling of a start record.
    zero = join[:1] + (len(join) - 5).to_bytes(4, "big") + join[5:-4] + b"\0\0\0\0"
    with pytest.raises(FormatError):
        decode_record(zero)
    # A join statement carries its step; a start part cannot, and a join needs one.
    with pytest.raises(FormatError):
        ChainRecipients(CAM, VIDEO, chain.chain_id, chain.start_period, 0, 1, (), join_step=3)
    with pytest.raises(FormatError):
        ChainRecipients(CAM, VIDEO, chain.chain_id, chain.start_period, 1, 1, ())
    statement = issue_chain_join(chain, 1, 1, 3, [OTHER], rig.signer)
    parsed = decode_record(statement)
    assert isinstance(parsed, ChainRecipients) and parsed.join_step == 3
    assert isinstance(decode_record(start), ChainRecord)
