"""FrozenRecord (keyservice/records.py, issue 23: start-up): a frozen dataclass that takes its
equality, hash and repr from it behaves exactly as one whose methods dataclasses generated."""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True, eq=False, repr=False)
class Shared(FrozenRecord):
    name: str
    secret: bytes = field(repr=False)
    count: int = 0
    note: str = field(default="", compare=False)
    extra: tuple[int, ...] = field(default=(), hash=False)


@dataclass(frozen=True, eq=False, repr=False)
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
        with pytest.raises(dataclasses.FrozenInstanceError):
            shared.count = 3  # type: ignore[misc]
    assert len({Shared(*a) for a in CASES}) == len({Generated(*a) for a in CASES}) == 4


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
