"""The strategy model: a device mesh and, for every tensor, which box each rank holds.

Pure and immutable. Boxes are derived on demand from the mesh coordinates so that a
1024-rank strategy with thousands of tensors never materialises world x tensors boxes
unless a caller asks for them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Mapping

from ..dtypes import itemsize
from .box import Box, array_split_piece
from .tensor import TensorInfo

_UNSET = object()

PP_AXIS = "pp"
#: the "format" value of a strategy document (YAML or dict)
STRATEGY_FORMAT = "hpcckpt.strategy/1"
#: refused beyond these, before anything is expanded: a mesh of 10**9 ranks or a shape of
#: 10**30 elements is a typo or a hostile file, and planning would run for ever
MAX_WORLD = 1 << 20          #: ranks in a mesh (the largest jobs today: ~10**5)
MAX_NDIM = 64                #: dimensions of a tensor (numpy's own limit)
MAX_TENSOR_BYTES = (1 << 63) - 1   #: bytes of one tensor (safetensors offsets are 64-bit)


@dataclass(frozen=True)
class Mesh:
    """Ordered device mesh; rank = row-major index over the axes, last axis fastest."""

    axes: tuple[tuple[str, int], ...]

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @cached_property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @cached_property
    def strides(self) -> dict[str, int]:
        out, stride = {}, 1
        for name, size in reversed(self.axes):
            out[name] = stride
            stride *= size
        return out

    @property
    def world_size(self) -> int:
        return math.prod(s for _, s in self.axes)

    def coords(self, rank: int) -> dict[str, int]:
        return {n: (rank // self.strides[n]) % s for n, s in self.axes}

    def rank_of(self, coords: Mapping[str, int]) -> int:
        return sum(coords.get(n, 0) * self.strides[n] for n, _ in self.axes)

    def to_dict(self) -> dict:
        return dict(self.axes)

    def __str__(self) -> str:
        return "x".join(f"{n}{s}" for n, s in self.axes) or "(single rank)"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor's layout.

    Attributes:
        name: global tensor name (dots and slashes allowed).
        shape: global shape.
        dtype: safetensors dtype name.
        split: per dimension, the mesh axes it is split over (major first); () = not split.
        stage: pipeline stage holding it (needs a ``pp`` axis); None = every stage.
        zero: axis over which dimension 0 of the local slice is split again (ZeRO).
        boxes: explicit ``{rank: Box}`` for irregular layouts; ranks not listed hold nothing.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    split: tuple[tuple[str, ...], ...] = ()
    stage: int | None = None
    zero: str | None = None
    boxes: Mapping[int, Box] | None = field(default=None, hash=False)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @cached_property
    def info(self) -> TensorInfo:
        """The tensor without its layout: name, shape, dtype."""
        return TensorInfo(self.name, self.shape, self.dtype)

    def to_dict(self) -> dict:
        d: dict = {"shape": list(self.shape), "dtype": self.dtype}
        if self.boxes is not None:
            d["boxes"] = {r: b.to_dict() for r, b in sorted(self.boxes.items())}
        elif any(self.split):
            d["split"] = [None if not a else (a[0] if len(a) == 1 else list(a)) for a in self.split]
        if self.stage is not None:
            d["stage"] = self.stage
        if self.zero is not None:
            d["zero"] = self.zero
        return d


@dataclass(frozen=True)
class Strategy:
    """A mesh plus the ordered tensor layouts. Validated on construction by the readers."""

    mesh: Mesh
    tensors: tuple[TensorSpec, ...]

    @cached_property
    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def spec(self, name: str) -> TensorSpec:
        return self.by_name[name]

    # ---- rank -> box ---------------------------------------------------------
    def box_of(self, name: str, rank: int) -> Box | None:
        """The box of ``name`` held by ``rank``, or None if the rank holds none of it."""
        t = self.by_name[name]
        if not 0 <= rank < self.world_size:
            return None
        if t.boxes is not None:
            return t.boxes.get(rank)
        return self._grid_box(t, self.mesh.coords(rank))

    def _grid_box(self, t: TensorSpec, coords: Mapping[str, int]) -> Box | None:
        if t.stage is not None and PP_AXIS in self.mesh.sizes and coords[PP_AXIS] != t.stage:
            return None
        offsets, sizes = list((0,) * len(t.shape)), list(t.shape)
        for dim, axes in enumerate(t.split):
            if axes:
                parts, index = 1, 0
                for a in axes:  # first name major
                    parts *= self.mesh.sizes[a]
                    index = index * self.mesh.sizes[a] + coords[a]
                offsets[dim], sizes[dim] = array_split_piece(t.shape[dim], parts, index)
        if t.zero is not None and t.shape:
            start, size = array_split_piece(sizes[0], self.mesh.sizes[t.zero], coords[t.zero])
            offsets[0] += start
            sizes[0] = size
        return Box(tuple(offsets), tuple(sizes))

    def rank_boxes(self, rank: int) -> Iterator[tuple[TensorSpec, Box]]:
        """Every (tensor, box) the rank holds, in strategy order."""
        if not 0 <= rank < self.world_size:
            return
        coords = self.mesh.coords(rank)
        layouts = self._grid_layouts
        boxes: dict[int, Box | None] = {}   # the rank's box per grid layout
        for t in self._on_stage.get(coords.get(PP_AXIS), self.tensors):
            if t.boxes is not None:
                box = t.boxes.get(rank)
            else:
                lay = layouts[t.name]
                box = boxes.get(lay, _UNSET)
                if box is _UNSET:
                    box = boxes[lay] = self._grid_box(t, coords)
            if box is not None:
                yield t, box

    @cached_property
    def _grid_layouts(self) -> dict[str, int]:
        """Tensor name -> an id shared by tensors laid out alike (shape, split, stage,
        zero): one rank holds the same box of each. A stage of a 70B model holds ~360
        tensors but ~20 layouts (its layers, their optimizer states), so a rank's boxes
        cost 20 box computations, not 360 (a 1024-rank verify computes 370,176)."""
        ids: dict[tuple, int] = {}
        return {t.name: ids.setdefault((t.shape, t.split, t.stage, t.zero), len(ids))
                for t in self.tensors if t.boxes is None}

    @cached_property
    def _on_stage(self) -> dict[int, tuple[TensorSpec, ...]]:
        """pp coordinate -> the tensors a rank of that stage may hold, in strategy order.
        With pp16 a rank holds 1/16 of the layers: laying out 1024 rank files tried
        every tensor on every rank (3 million box computations, 3 s) before this."""
        if PP_AXIS not in self.mesh.sizes:
            return {}
        return {c: tuple(t for t in self.tensors
                         if t.boxes is not None or t.stage is None or t.stage == c)
                for c in range(self.mesh.sizes[PP_AXIS])}

    # ---- distinct chunks and their replicas ---------------------------------
    def used_axes(self, t: TensorSpec) -> tuple[str, ...]:
        """Mesh axes whose coordinate changes the tensor's box (the rest are replica axes)."""
        used = {a for axes in t.split for a in axes}
        if t.zero is not None and t.shape:
            used.add(t.zero)
        if t.stage is not None and PP_AXIS in self.mesh.sizes:
            used.add(PP_AXIS)
        return tuple(n for n in self.mesh.names if n in used)

    def chunks(self, name: str, within: Box | None = None) -> list[tuple[Box, tuple[int, ...]]]:
        """Distinct non-empty boxes of ``name`` with the ranks holding each (replicas), sorted
        by their first rank; with ``within``, only the boxes meeting it.

        Cost is O(distinct boxes x replicas), never a scan of every rank per box; with
        ``within`` and a grid layout, O(boxes meeting it x replicas).
        """
        t = self.by_name[name]
        if t.boxes is not None:
            groups: dict[Box, list[int]] = {}
            for r, b in sorted(t.boxes.items()):
                if not b.is_empty():
                    groups.setdefault(b, []).append(r)
            out = sorted(((b, tuple(rs)) for b, rs in groups.items()), key=lambda x: x[1][0])
            return out if within is None else [c for c in out if within.intersect(c[0])]
        free = self._free_offsets(t)
        factors = self._dim_pieces(t)
        if factors is None:
            return self._chunks_by_coords(t, free, within)
        return [(box, tuple(base + o for o in free))
                for _, box, base in self._grid_chunks(factors, within)]

    def chunk_positions(self, name: str, within: Box) -> list[tuple[int, Box, tuple[int, ...]]]:
        """(position in ``chunks(name)``, box, replicas) of the boxes meeting ``within``, in
        that order: what a manifest listing one checksum per chunk needs to find a box's
        own without building the others. O(boxes meeting it) when every box of the grid
        is non-empty; otherwise positions shift past the empty ones: every box is built."""
        t = self.by_name[name]
        factors = self._dim_pieces(t) if t.boxes is None else None
        if factors is None or not factors[2]:
            return [(i, b, r) for i, (b, r) in enumerate(self.chunks(name))
                    if within.intersect(b)]
        free = self._free_offsets(t)
        return [(i, box, tuple(base + o for o in free))
                for i, box, base in self._grid_chunks(factors, within)]

    def _free_offsets(self, t: TensorSpec) -> list[int]:
        """Replica ranks of a box = its first rank + each of these offsets over the axes
        that do not move the tensor's box (computed once per tensor, sorted, so first
        rank + offsets stays sorted)."""
        used, offsets = self.used_axes(t), [0]
        for n in self.mesh.names:
            if n not in used:
                st = self.mesh.strides[n]
                offsets = [o + i * st for o in offsets for i in range(self.mesh.sizes[n])]
        return sorted(offsets)

    @staticmethod
    def _grid_chunks(factors, within: Box | None) -> list[tuple[int, Box, int]]:
        """(position, box, first rank) of a grid tensor's boxes meeting ``within``, by rank."""
        base0, pieces, _ = factors
        if within is not None:
            pieces = [[p for p in dim if max(p[0], lo) < min(p[0] + p[1], hi)]
                      for dim, lo, hi in zip(pieces, within.offsets, within.ends)]
        out = [(sum(p[3] for p in combo),
                Box(tuple(p[0] for p in combo), tuple(p[1] for p in combo)),
                base0 + sum(p[2] for p in combo)) for combo in itertools.product(*pieces)]
        out.sort(key=lambda x: x[2])
        return out

    def _dim_pieces(self, t: TensorSpec
                    ) -> tuple[int, list[list[tuple[int, int, int, int]]], bool] | None:
        """A grid tensor's boxes as a product over its dimensions: (the rank offset of its
        stage, per dimension the non-empty (offset, size, rank offset, position offset)
        pieces, whether no piece was empty). Each mesh axis then moves exactly one
        dimension, so the product's boxes are the boxes of the ranks whose coordinates
        make them, ordered by rank like the coordinates' mixed-radix number, which is
        their position in ``chunks`` when no box is empty. None for layouts where that
        does not hold (an axis splitting two dimensions, ZeRO over a split axis, pp both
        stage and split axis, scalars): ``_chunks_by_coords``."""
        axes = [a for dim_axes in t.split for a in dim_axes]
        staged = t.stage is not None and PP_AXIS in self.mesh.sizes
        if (not t.shape or len(set(axes)) != len(axes) or t.zero in axes
                or (staged and (PP_AXIS in axes or t.zero == PP_AXIS))):
            return None
        sizes, strides = self.mesh.sizes, self.mesh.strides
        # the position of a box among the tensor's boxes, by the axes that move it
        moving, dense, step = set(axes) | {t.zero} - {None}, {}, 1
        for n in reversed(self.mesh.names):
            if n in moving:
                dense[n], step = step, step * sizes[n]
        pieces, complete = [], True
        for dim, length in enumerate(t.shape):
            dim_axes = t.split[dim] if dim < len(t.split) else ()
            parts = 1
            for a in dim_axes:
                parts *= sizes[a]
            dim_pieces = []
            for index in range(parts):
                start, size = array_split_piece(length, parts, index)
                rank, position, rest = 0, 0, index   # the axes' coordinates: first name major
                for a in reversed(dim_axes):
                    rest, c = divmod(rest, sizes[a])
                    rank, position = rank + c * strides[a], position + c * dense[a]
                if dim == 0 and t.zero is not None:
                    z = sizes[t.zero]
                    for i in range(z):
                        zs, zn = array_split_piece(size, z, i)
                        dim_pieces.append((start + zs, zn, rank + i * strides[t.zero],
                                           position + i * dense[t.zero]))
                else:
                    dim_pieces.append((start, size, rank, position))
            complete = complete and all(p[1] for p in dim_pieces)
            pieces.append([p for p in dim_pieces if p[1]])
        return (t.stage * strides[PP_AXIS] if staged else 0), pieces, complete

    def _chunks_by_coords(self, t: TensorSpec, free_offsets: list[int], within: Box | None
                          ) -> list[tuple[Box, tuple[int, ...]]]:
        used, zeros = self.used_axes(t), {n: 0 for n in self.mesh.names}
        out = []
        for values in itertools.product(*(self._axis_range(t, a) for a in used)):
            coords = dict(zip(used, values))
            box = self._grid_box(t, {**zeros, **coords})
            if box is None or box.is_empty() or (within is not None and not within.intersect(box)):
                continue
            base = self.mesh.rank_of(coords)
            out.append((box, tuple(base + o for o in free_offsets)))
        out.sort(key=lambda x: x[1][0])
        return out

    def chunk_count(self, name: str) -> int:
        """``len(self.chunks(name))`` without building a box: O(dimensions x parts).

        A manifest checks its per-chunk checksums against this count; at 1024 ranks
        building every chunk of every tensor took minutes.
        """
        t = self.by_name[name]
        axes = [a for dim_axes in t.split for a in dim_axes]
        if t.boxes is not None or not t.shape or len(set(axes)) != len(axes) or t.zero in axes:
            return len(self.chunks(name))   # explicit boxes, scalars, unusual layouts

        def parts(dim: int) -> int:
            n = 1
            for a in (t.split[dim] if dim < len(t.split) else ()):
                n *= self.mesh.sizes[a]
            return n
        # array_split pieces are empty only past the length: min(length, parts) are not
        count = 1
        for dim in range(1, len(t.shape)):
            count *= min(t.shape[dim], parts(dim))
        if t.zero is None:
            return count * min(t.shape[0], parts(0))
        z = self.mesh.sizes[t.zero]
        return count * sum(min(array_split_piece(t.shape[0], parts(0), i)[1], z)
                           for i in range(parts(0)))

    def replicas(self, name: str, rank: int) -> tuple[int, ...]:
        """All ranks holding the same box of ``name`` as ``rank`` (including itself)."""
        t = self.by_name[name]
        mine = self.box_of(name, rank)
        if mine is None:
            return ()
        if t.boxes is not None:
            return tuple(r for r, b in sorted(t.boxes.items()) if b == mine)
        used = self.used_axes(t)
        coords = self.mesh.coords(rank)
        free = [n for n in self.mesh.names if n not in used]
        fixed = {a: coords[a] for a in used}
        return tuple(sorted(
            self.mesh.rank_of({**fixed, **dict(zip(free, fv))})
            for fv in itertools.product(*(range(self.mesh.sizes[n]) for n in free))))

    def _axis_range(self, t: TensorSpec, axis: str) -> range:
        if axis == PP_AXIS and t.stage is not None:
            return range(t.stage, t.stage + 1)
        return range(self.mesh.sizes[axis])

    # ---- summaries -----------------------------------------------------------
    @property
    def unique_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def rank_bytes(self, rank: int) -> int:
        return sum(b.volume * t.itemsize for t, b in self.rank_boxes(rank))

    def to_dict(self) -> dict:
        return {"format": STRATEGY_FORMAT, "mesh": self.mesh.to_dict(),
                "tensors": {t.name: t.to_dict() for t in self.tensors}}
