"""Boxes: axis-aligned sub-blocks of a tensor, in global element coordinates."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Box:
    """A hyper-rectangle ``[offsets, offsets + sizes)`` of a tensor.

    Attributes:
        offsets: first element index along each dimension (global coordinates).
        sizes: extent along each dimension; 0 is allowed (an empty piece).
    A scalar's box has ``offsets == sizes == ()`` and one element.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def full(shape) -> "Box":
        shape = tuple(int(s) for s in shape)
        return Box((0,) * len(shape), shape)

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def is_empty(self) -> bool:
        return self.volume == 0

    def intersect(self, other: "Box") -> "Box | None":
        """The common part of two boxes, or None when it holds no element."""
        offs, sizes = [], []
        for o1, s1, o2, s2 in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(o1, o2), min(o1 + s1, o2 + s2)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offs), tuple(sizes))

    def contains(self, other: "Box") -> bool:
        return all(o1 <= o2 and o2 + s2 <= o1 + s1 for o1, s1, o2, s2
                   in zip(self.offsets, self.sizes, other.offsets, other.sizes))

    def shifted(self, origin: tuple[int, ...]) -> "Box":
        """This box in the coordinates of a box starting at ``origin``."""
        return Box(tuple(o - b for o, b in zip(self.offsets, origin)), self.sizes)

    def to_dict(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes)}

    @staticmethod
    def from_dict(d: dict) -> "Box":
        return Box(tuple(int(x) for x in d["offsets"]), tuple(int(x) for x in d["sizes"]))

    def __str__(self) -> str:
        if not self.sizes:
            return "[scalar]"
        return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes)) + "]"


def array_split_piece(length: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of piece ``index`` when ``length`` is cut like ``numpy.array_split``.

    The first ``length % parts`` pieces are one element larger; pieces may be empty.
    """
    q, r = divmod(length, parts)
    return index * q + min(index, r), q + (1 if index < r else 0)


def array_split_bounds(length: int, parts: int) -> list[int]:
    """The ``parts + 1`` boundaries of an array_split of ``length``."""
    return [array_split_piece(length, parts, i)[0] for i in range(parts)] + [length]
