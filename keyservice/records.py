"""Frozen records: equality, hashing, repr and immutability of dataclasses, written once
(issue 23, start-up).

Python 3.11 compiles every method a dataclass generates, for every class, at every start of
the program: ``fusion-client play`` built about fifty classes on its way to the first byte,
six methods each for a frozen one (and a frozen class with slots costs more again). A record
that derives from ``FrozenRecord`` and is declared ``@dataclass(eq=False, repr=False)`` (with
``slots=True`` or not; the base freezes it) gets from here what ``frozen=True`` and the
generated ``__eq__``, ``__hash__`` and ``__repr__`` gave (a class that frozen dataclasses
subclass keeps ``frozen=True``, which a frozen subclass requires, and takes only equality,
hash and repr from here):

- equality and hash over the fields in their order (``compare``/``hash`` of ``field()``
  honoured), equal only to an instance of the very same class; ``repr`` of the fields shown
  (``repr=False`` fields stay out: keys, plaintext, PINs);
- immutability: ``__init__`` assigns each field once; any later assignment, of a field or of
  anything else, and any deletion raise ``dataclasses.FrozenInstanceError`` (what
  ``__post_init__`` normalises it sets with ``object.__setattr__``, as for a frozen
  dataclass).

Only ``__init__`` is compiled per class. Pure: no I/O.
"""

from __future__ import annotations

import reprlib
from dataclasses import FrozenInstanceError, fields

__all__ = ["FrozenRecord"]


class _Names:
    """What a record class's fields say, read once per class."""

    __slots__ = ("all", "compared", "has_dict", "hashed", "shown")

    def __init__(self, cls: type) -> None:
        found = fields(cls)  # type: ignore[arg-type]
        self.compared = tuple(f.name for f in found if f.compare)
        # dataclasses: a field is hashed if hash=True, or hash=None and it is compared.
        self.hashed = tuple(f.name for f in found if (f.compare if f.hash is None else f.hash))
        self.shown = tuple(f.name for f in found if f.repr)
        self.all = frozenset(f.name for f in found)
        self.has_dict = cls.__dictoffset__ != 0  # else its fields are slots


_NAMES: dict[type, _Names] = {}


def _names(cls: type) -> _Names:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = _Names(cls)
    return names


class FrozenRecord:
    """The base of a record dataclass declared ``@dataclass(eq=False, repr=False)``: frozen
    once ``__init__`` has set its fields, with dataclass equality, hash and repr."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        names = _NAMES.get(self.__class__) or _names(self.__class__)
        # __init__ sets each field once; then it is set, and nothing is assigned any more.
        if name not in names.all or (name in self.__dict__ if names.has_dict
                                     else hasattr(self, name)):
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        compared = _names(self.__class__).compared
        return (tuple(getattr(self, n) for n in compared)
                == tuple(getattr(other, n) for n in compared))

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _names(self.__class__).hashed))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in _names(self.__class__).shown)
        return f"{self.__class__.__qualname__}({shown})"
