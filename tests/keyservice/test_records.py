"""FrozenRecord (keyservice/records.py, issue 23: start-up): a frozen dataclass that takes its
equality, hash and repr from it behaves exactly as one whose methods dataclasses generated."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from keyservice.crypto.segments import PeriodKey
from keyservice.format import DataStream
from keyservice.pkcs11uri import Pkcs11Uri
from keyservice.reader import SegmentMissing, SegmentPlaintext, SegmentSkipped
from keyservice.records import FrozenRecord


@dataclass(frozen=True)
class Generated:
    name: str
    secret: bytes = field(repr=False)
    count: int = 0
    note: str = field(default="", compare=False)
    extra: tuple[int, ...] = field(default=(), hash=False)


@dataclass(eq=False, repr=False)  # frozen by FrozenRecord, as the records on play's path
class Shared(FrozenRecord):
    name: str
    secret: bytes = field(repr=False)
    count: int = 0
    note: str = field(default="", compare=False)
    extra: tuple[int, ...] = field(default=(), hash=False)


@dataclass(slots=True, eq=False, repr=False)  # with slots, as the format's records
class Other(FrozenRecord):
    name: str
    secret: bytes = field(repr=False)
    count: int = 0
    note: str = field(default="", compare=False)
    extra: tuple[int, ...] = field(default=(), hash=False)


CASES = [("cam", b"k", 1, "a", (1,)), ("cam", b"k", 1, "b", (1,)), ("cam", b"k", 2, "a", (1,)),
         ("cam", b"j", 1, "a", (2,)), ("x\n'", b"", 0, "", ())]


def test_the_same_results_as_generated_methods() -> None:
    for a in CASES:
        gen, shared = Generated(*a), Shared(*a)
        assert repr(shared) == repr(gen).replace("Generated(", "Shared(")
        assert "secret" not in repr(shared)  # a repr=False field stays out of logs
        assert hash(shared) == hash(gen)
        for b in CASES:
            assert (Shared(*a) == Shared(*b)) == (Generated(*a) == Generated(*b))
            assert (Shared(*a) != Shared(*b)) == (Generated(*a) != Generated(*b))
        assert shared != Other(*a) and shared != a  # only the very same class is equal
        assert dataclasses.replace(shared, count=5) == Shared(a[0], a[1], 5, a[3], a[4])
        other = Other(*a)
        for record in (shared, other):  # frozen once made: no field, nothing else, no delete
            with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
                record.count = 3  # type: ignore[misc]
            with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
                record.added = 1  # type: ignore[attr-defined]
            with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete"):
                del record.name  # type: ignore[misc]
            assert record.count == a[2]
            for made in (copy.copy(record), copy.deepcopy(record),
                         pickle.loads(pickle.dumps(record))):
                assert made == record and made is not record and repr(made) == repr(record)
    assert len({Shared(*a) for a in CASES}) == len({Generated(*a) for a in CASES}) == 4
    assert Other(*CASES[0]) == Other(*CASES[1]) and hash(Other(*CASES[0])) == hash(Shared(
        *CASES[0]))


def test_the_readers_events_keep_their_identity() -> None:
    """A withheld segment never equals a missing one with the same fields (the player tells
    them apart); a plaintext's bytes, a period key and a PIN stay out of their reprs."""
    fields_ = ("cam", DataStream.VIDEO, 3, 1000, 2000)
    assert SegmentSkipped(*fields_) != SegmentMissing(*fields_)
    assert SegmentSkipped(*fields_) == SegmentSkipped(*fields_)
    assert hash(SegmentSkipped(*fields_)) == hash(SegmentMissing(*fields_))  # as generated
    plain = SegmentPlaintext("cam", DataStream.VIDEO, 3, 1000, b"plaintext video")
    assert "plaintext video" not in repr(plain) and repr(plain).startswith("SegmentPlaintext(")
    key = PeriodKey("cam", DataStream.VIDEO, bytes(16), b"K" * 32, 1000)
    assert "KKKK" not in repr(key) and repr(key).startswith("PeriodKey(camera='cam'")
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=o?pin-value=918273")
    assert "918273" not in repr(uri) and uri == Pkcs11Uri.parse(uri.to_uri())
