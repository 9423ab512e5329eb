"""De-duplication: which rank stores which part of every distinct box. Pure.

A strategy's replicas (ranks holding the same box) need not all write it. Two modes:

``"whole"``   each distinct box is stored whole by one of its replicas, greedy largest
              first onto the replica with the fewest bytes so far. What MindSpore's
              loader reads (``remove_redundancy``), but unbalanced when one replicated
              tensor is a large share of the model.
``"balanced"`` (default) a large replicated box is divided among its replicas into
              slabs along its first dimension longer than one (a slab is contiguous in
              the rank's slice, so a rank writes it straight from memory), sized so that
              bytes per rank are as even as the layout allows.

Balanced planning, deterministic so every rank computes the same plan alone:

1. boxes held by one rank only are that rank's; replicated boxes too small to divide
   (below ``2 * min_piece``, or a single slab) go whole, largest first, to their
   least-loaded replica;
2. each divisible box is poured over its replicas like water (the least-loaded rise to
   a common level), largest first, then every box is poured again against the others'
   final shares, a few passes. Each pass minimises the sum of squared loads over one
   box's shares; for such transport problems that minimum is also the least possible
   maximum (the lexicographically balanced flow), so the passes approach the best
   balance any division can reach, not just a greedy one;
3. shares become whole slabs (largest remainder); a share below ``min_piece`` is given
   to the box's other replicas rather than becoming a tiny chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from ..errors import UsageError
from ..layout.box import Box
from ..layout.strategy import Strategy, TensorSpec

MODES = ("balanced", "whole")
DEFAULT_MIN_PIECE = 1 << 20   #: smaller shares of a divided box are not worth a chunk
_MAX_PASSES = 12
_PASS_WORK = 4_000_000        #: (boxes x replicas) poured per planning, at most


def dedup_mode(value: object) -> str | None:
    """``False``/``None`` -> None (full), ``True``/``"balanced"`` -> "balanced", ``"whole"``."""
    if value is None or value is False:
        return None
    if value is True:
        return "balanced"
    if isinstance(value, str) and value in MODES:
        return value
    raise UsageError(f"dedup must be True, False, 'balanced' or 'whole', not {value!r}")


@dataclass(frozen=True)
class DedupPlan:
    """Who stores what.

    Attributes:
        mode: "balanced" or "whole".
        stored: rank -> {tensor name: the box this rank stores} (a rank holds one box of a
            tensor, so it stores at most one piece of it: the whole box or a slab of it).
        bytes_per_rank: bytes each strategy rank stores.
    """

    mode: str
    stored: Mapping[int, Mapping[str, Box]]
    bytes_per_rank: tuple[int, ...]

    def box_for(self, rank: int, name: str) -> Box | None:
        """The box of ``name`` that ``rank`` stores, or None."""
        return self.stored.get(rank, {}).get(name)

    def owners(self) -> dict[tuple[str, Box], int]:
        """(tensor, stored box) -> the rank storing it."""
        return {(name, box): r for r, boxes in self.stored.items() for name, box in boxes.items()}

    @property
    def imbalance(self) -> float:
        """max / mean bytes per rank (1.0 = perfectly even; 1.0 when nothing is stored)."""
        total = sum(self.bytes_per_rank)
        if not total:
            return 1.0
        return max(self.bytes_per_rank) * len(self.bytes_per_rank) / total


@dataclass
class _Item:
    name: str
    box: Box
    ranks: tuple[int, ...]
    nbytes: int
    dim: int | None      #: dimension cut into slabs (None: indivisible)
    unit: int            #: bytes of one slab of thickness 1
    shares: list[float]  #: bytes per replica (balanced pouring)


def slab_dim(box: Box) -> int | None:
    """The dimension along which ``box``'s slabs are contiguous in C order: its first
    dimension longer than one (every dimension before it has size 1). None when the box
    has at most one element."""
    for d, s in enumerate(box.sizes):
        if s > 1:
            return d
        if s == 0:
            return None
    return None


def plan_dedup(strategy: Strategy, mode: str = "balanced",
               min_piece: int = DEFAULT_MIN_PIECE) -> DedupPlan:
    """Decide, for every distinct non-empty box, which replica(s) store it.

    Args:
        strategy: the layout being written.
        mode: "balanced" (divide large replicated boxes) or "whole".
        min_piece: in balanced mode, the smallest share worth a chunk of its own; boxes
            below twice this are stored whole.
    Returns:
        A DedupPlan; every element of every tensor is stored exactly once.

    Example:
        >>> plan = plan_dedup(strategy)             # doctest: +SKIP
        >>> plan.box_for(3, "model.embed.weight")   # rank 3's slab of the embedding
    """
    if mode not in MODES:
        raise UsageError(f"dedup mode must be one of {', '.join(MODES)}, not {mode!r}")
    world = strategy.world_size
    items: list[_Item] = []
    for t in strategy.tensors:
        isz = t.itemsize
        for box, ranks in strategy.chunks(t.name):
            items.append(_item(t, box, ranks, isz, mode, min_piece))
    load = [0.0] * world
    # stable sorts: strategy order among equal sizes, so every rank gets the same plan
    # boxes with one holder first (no choice), then the rest largest first
    whole = sorted((i for i in items if i.dim is None), key=lambda i: (len(i.ranks) > 1, -i.nbytes))
    for it in whole:
        r = min(it.ranks, key=lambda q: (load[q], q))
        it.shares = [float(it.nbytes) if q == r else 0.0 for q in it.ranks]
        load[r] += it.nbytes
    divisible = sorted((i for i in items if i.dim is not None), key=lambda i: -i.nbytes)
    if divisible:
        for it in divisible:
            it.shares = _pour(load, it.ranks, it.nbytes)
        work = sum(len(i.ranks) for i in divisible)
        for _ in range(min(_MAX_PASSES, max(1, _PASS_WORK // work))):
            before = max(load)
            for it in divisible:
                for q, s in zip(it.ranks, it.shares):
                    load[q] -= s
                it.shares = _pour(load, it.ranks, it.nbytes)
            if before - max(load) <= 1e-6 * before:
                break
    stored: dict[int, dict[str, Box]] = {}
    nbytes = [0] * world
    for it in items:
        for r, box in _pieces(it, min_piece):
            stored.setdefault(r, {})[it.name] = box
            nbytes[r] += box.volume * (it.nbytes // it.box.volume)
    return DedupPlan(mode, stored, tuple(nbytes))


def _item(t: TensorSpec, box: Box, ranks: tuple[int, ...], isz: int, mode: str,
          min_piece: int) -> _Item:
    nbytes = box.volume * isz
    dim = slab_dim(box) if mode == "balanced" and len(ranks) > 1 else None
    if dim is not None and nbytes < 2 * max(min_piece, 1):
        dim = None
    unit = nbytes // box.sizes[dim] if dim is not None else nbytes
    return _Item(t.name, box, ranks, nbytes, dim, unit, [])


def _pour(load: list[float], ranks: tuple[int, ...], amount: float) -> list[float]:
    """Water-filling: raise the least-loaded of ``ranks`` to a common level with
    ``amount``; adds the shares to ``load`` and returns them (in ``ranks`` order)."""
    order = sorted(ranks, key=lambda q: (load[q], q))
    level, acc, j = 0.0, 0.0, 0
    for j, q in enumerate(order, 1):
        acc += load[q]
        level = (amount + acc) / j
        if j == len(order) or level <= load[order[j]]:
            break
    shares = {q: max(0.0, level - load[q]) for q in order[:j]}
    for q, s in shares.items():
        load[q] += s
    return [shares.get(q, 0.0) for q in ranks]


def _pieces(it: _Item, min_piece: int) -> list[tuple[int, Box]]:
    """The item's stored boxes: (rank, box). Whole boxes, or slabs along ``it.dim`` in
    replica order with thicknesses from the shares (largest remainder rounding)."""
    if it.dim is None:
        r = next(q for q, s in zip(it.ranks, it.shares) if s > 0) if it.nbytes else it.ranks[0]
        return [(r, it.box)]
    count = it.box.sizes[it.dim]
    shares = list(it.shares)
    # a share below min_piece, and small beside the largest, is not worth a chunk: its
    # replicas' neighbours take it (shares all near min_piece are kept: dropping all but
    # one would put the whole box on one rank)
    big = max(shares, default=0.0)
    small = [k for k, s in enumerate(shares) if s < min_piece and s < big / 2]
    if len(small) < len(shares):
        for k in small:
            shares[k] = 0.0
    total = sum(shares)
    exact = [s * count / total for s in shares]
    units = [math.floor(x) for x in exact]
    rest = count - sum(units)
    for k in sorted(range(len(exact)), key=lambda k: (units[k] - exact[k], k))[:rest]:
        units[k] += 1
    out, start = [], 0
    for r, u in zip(it.ranks, units):
        if u:
            offs, sizes = list(it.box.offsets), list(it.box.sizes)
            offs[it.dim] += start
            sizes[it.dim] = u
            out.append((r, Box(tuple(offs), tuple(sizes))))
            start += u
    return out
