"""Equality, hashing and repr of frozen dataclasses, written once (issue 23, start-up).

Python 3.11 compiles every method a dataclass generates, for every class, at every start of
the program: ``fusion-client play`` built about fifty classes on its way to the first byte,
six methods each for a frozen one. A frozen record that derives from ``FrozenRecord`` and is
declared ``@dataclass(frozen=True, eq=False, repr=False)`` gets ``__eq__``, ``__hash__`` and
``__repr__`` from here instead: the same results as the generated ones (the fields in their
order, ``compare``/``hash``/``repr`` of ``field()`` honoured; equal only to an instance of the
very same class), computed from the class's fields, so only ``__init__`` and the frozen
``__setattr__``/``__delattr__`` are compiled per class.

Pure: no I/O.
"""

from __future__ import annotations

import reprlib
from dataclasses import fields

__all__ = ["FrozenRecord"]

# class -> (names compared, names hashed, names shown by repr), as the dataclass declares them
_NAMES: dict[type, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {}


def _names(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    names = _NAMES.get(cls)
    if names is None:
        found = fields(cls)  # type: ignore[arg-type]
        names = _NAMES[cls] = (
            tuple(f.name for f in found if f.compare),
            # dataclasses: a field is hashed if hash=True, or hash=None and it is compared.
            tuple(f.name for f in found if (f.compare if f.hash is None else f.hash)),
            tuple(f.name for f in found if f.repr))
    return names


class FrozenRecord:
    """The base of a frozen dataclass declared with ``eq=False, repr=False``: dataclass
    equality, hash and repr without generating them per class."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        compared = _names(self.__class__)[0]
        return (tuple(getattr(self, n) for n in compared)
                == tuple(getattr(other, n) for n in compared))

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _names(self.__class__)[1]))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in _names(self.__class__)[2])
        return f"{self.__class__.__qualname__}({shown})"
