"""Balanced assignments: who writes which bytes (de-duplication: ``dedup.py``)."""
from __future__ import annotations

import heapq


def balanced_cuts(boundaries: list[int], total: int, parts: int) -> list[int]:
    """``parts + 1`` cut points in ``[0, total]`` splitting bytes evenly among parts.

    A cut snaps to the nearest natural boundary (e.g. a tensor's start) when one lies
    within 1/8 of a part's share, so most tensors are written whole by one rank.
    ``boundaries`` must be sorted. Cuts inside a tensor are not aligned to its elements
    here: ``divide_writes`` knows the item sizes and aligns them.
    """
    cuts = [0]
    share = total / parts if parts else 0
    tol = share / 8
    for r in range(1, parts):
        target = round(r * share)
        i = _nearest(boundaries, target)
        cut = boundaries[i] if i is not None and abs(boundaries[i] - target) <= tol else target
        cuts.append(max(cuts[-1], min(cut, total)))
    cuts.append(total)
    return cuts


def _nearest(sorted_values: list[int], x: int) -> int | None:
    import bisect
    if not sorted_values:
        return None
    i = bisect.bisect_left(sorted_values, x)
    cands = [j for j in (i - 1, i) if 0 <= j < len(sorted_values)]
    return min(cands, key=lambda j: abs(sorted_values[j] - x))


def lpt(weights: list[int], parts: int) -> list[int]:
    """Owner of each weight under greedy longest-processing-time balancing."""
    heap = [(0, p) for p in range(parts)]
    owner = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, p = heapq.heappop(heap)
        owner[i] = p
        heapq.heappush(heap, (load + weights[i], p))
    return owner
