"""Property tests of the exchange plan (``plan_routes``) with the choosers that load,
reshard_state and node-local reshard really use (hypothesis, random small strategies).

Each rank plans only its own part of the job, so the plans of all ranks are built
(one per rank, as the ranks would) and then checked against each other:

- every byte of every destination box a rank needs arrives exactly once (local copies
  plus receptions tile the box, no overlap, nothing it does not need);
- it comes from a provider that really holds the region in the source (its memory
  slice, its node's rank directory, or, for load, a holder of the destination box
  that reads it from the shared files);
- ``route.region`` lies inside both ``route.src.box`` and ``route.dst_box``;
- rank j's send list to k equals k's receive list from j, in the same order (the byte
  streams agree without any exchange of the plans);
- load reads each unique destination byte from disk exactly once across the job.

The planners are the pure functions the operations call: ``plan_load``,
``plan_reshard_state`` and ``plan_node_local`` (hpcckpt/planning/route_plans.py).
"""
from __future__ import annotations

from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.comm import rounds
from hpcckpt.layout.box import Box
from hpcckpt.layout.strategy import Strategy
from hpcckpt.planning import route_plans
from hpcckpt.planning.route_plans import plan_load, plan_reshard_state
from hpcckpt.planning.dedup import plan_dedup
from hpcckpt.planning.outputs import rank_files
from hpcckpt.planning.routes import RoutePlan
from hpcckpt.layout.tensor import TensorInfo
from hpcckpt.ops import route_exec
from hpcckpt.planning.sources import (SourceIndex, group_chunks,
                                      strategy_source)

import test_planning_props as gen  # the random strategy generators (same directory)

PROPS = settings(max_examples=40, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sl(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))


def _file_of_rank(r: int) -> str:
    return f"rank_{r}/p_rank_{r}.safetensors"


def _dedup_holds(s: Strategy):
    assign = plan_dedup(s, "whole").owners()

    def holds(r: int, name: str) -> bool:
        box = s.box_of(name, r)
        return box is not None and assign.get((name, box)) == r
    return holds


def _source(a: Strategy, kind: str):
    """What a checkpoint of ``a`` stores: complete file, full or de-duplicated rank files."""
    if kind == "complete":
        tensors = [TensorInfo(t.name, t.shape, t.dtype) for t in a.tensors]
        return SourceIndex(tensors, group_chunks(
            (t.name, Box.full(t.shape), "model.safetensors") for t in tensors))
    if kind == "dedup":
        return strategy_source(a, _file_of_rank, _dedup_holds(a))
    return strategy_source(a, _file_of_rank)


# ---------------------------------------------------------------------------------
# the planners, as each rank runs them
# ---------------------------------------------------------------------------------
def plan_node_local(source, src_world: int, b: Strategy, dedup: bool, size: int,
                    rank: int) -> RoutePlan:
    """reshard_node_local's planning inputs for one rank, with source rank directory d
    on job rank d % size (as the tests and job templates place them)."""
    assignment = plan_dedup(b, "whole") if dedup else None
    here = {d for d in range(src_world) if d % size == rank}
    provided = [(name, c.box) for name in source.tensors for c in source.chunks(name)
                if here.intersection(c.rank_dirs())]
    mine = [(e.name, e.box) for f in rank_files(b, "p", assignment) if f.rank % size == rank
            for e in f.entries]
    return route_plans.plan_node_local(source, b, rank, size,
                                    {d: [d % size] for d in range(src_world)}, provided, mine,
                                    assignment.owners() if assignment else None)


# ---------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------
def check_plans(plans: list[RoutePlan], needs: dict[int, set[tuple[str, Box]]],
                shapes: dict[str, tuple[int, ...]], holds) -> None:
    """``needs[k]``: the distinct (tensor, destination box) rank k must end up with;
    ``holds(route)``: the provider really has ``route.region`` in the source."""
    size = len(plans)
    for r, plan in enumerate(plans):
        assert plan.rank == r
        for route in plan.local:
            assert route.provider == route.receiver == r, route
        for k, routes in plan.sends.items():
            assert k != r and 0 <= k < size, (r, k)
            assert all(x.provider == r and x.receiver == k for x in routes)
            assert plans[k].recvs.get(r, []) == routes, f"stream {r}->{k}: the ends disagree"
        for j, routes in plan.recvs.items():
            assert j != r and 0 <= j < size, (r, j)
            assert all(x.provider == j and x.receiver == r for x in routes)
            assert plans[j].sends.get(r, []) == routes, f"stream {j}->{r}: the ends disagree"
        send, recv = plan.totals(size)
        for k in range(size):
            assert send[k] == plans[k].totals(size)[1][r], (r, k)

    for k, plan in enumerate(plans):
        counters = {key: np.zeros(key[1].sizes, np.int64) for key in needs.get(k, ())}
        arrived = [*plan.local, *(x for rs in plan.recvs.values() for x in rs)]
        for route in arrived:
            key = (route.tensor.name, route.dst_box)
            assert key in counters, f"rank {k} receives {key} it does not need"
            assert route.tensor.shape == shapes[route.tensor.name]
            assert not route.region.is_empty()
            assert route.src.box.contains(route.region), route
            assert route.dst_box.contains(route.region), route
            assert route.src.box.intersect(route.dst_box) == route.region, route
            assert holds(route), f"provider {route.provider} does not hold {route}"
            counters[key][sl(route.region.shifted(route.dst_box.offsets))] += 1
        for key, c in counters.items():
            assert (c == 1).all(), (k, key, c)


def needs_of(b: Strategy, ranks) -> dict[int, set[tuple[str, Box]]]:
    return {k: {(t.name, x) for t, x in b.rank_boxes(k) if not x.is_empty()} for k in ranks}


@PROPS
@given(gen.strategy_pairs(max_world=12), st.sampled_from(["complete", "full", "dedup"]))
def test_load_plan(pair, kind):
    a, b = pair
    source = _source(a, kind)
    size = b.world_size
    plans = [plan_load(source, b, r) for r in range(size)]
    # one reader per distinct destination box, the same in every rank's plan
    readers: dict[tuple[str, Box], set[int]] = {}
    for plan in plans:
        for route in [*plan.local, *(x for rs in plan.sends.values() for x in rs),
                      *(x for rs in plan.recvs.values() for x in rs)]:
            readers.setdefault((route.tensor.name, route.dst_box), set()).add(route.provider)
    for key, who in readers.items():
        assert len(who) == 1, f"{key} has several readers {who}"
    reader = {key: min(who) for key, who in readers.items()}

    def holds(route) -> bool:
        # the provider is the box's reader, itself a holder of the destination box, and
        # the region comes from a chunk the checkpoint stores
        return (route.provider == reader[(route.tensor.name, route.dst_box)]
                and route.provider in b.replicas(route.tensor.name, route.receiver)
                and route.src in source.chunks(route.tensor.name) and bool(route.src.files))

    check_plans(plans, needs_of(b, range(size)), {t.name: t.shape for t in b.tensors}, holds)
    # disk reads: only the reader's local routes read files, and together they cover
    # every unique destination byte once; replicas get the box forwarded from memory,
    # so whoever sends holds the whole box itself
    read = {(t.name, x): np.zeros(x.sizes, np.int64)
            for t in b.tensors for x, _ in b.chunks(t.name)}
    for plan in plans:
        for route in plan.local:
            read[(route.tensor.name, route.dst_box)][
                sl(route.region.shifted(route.dst_box.offsets))] += 1
        for routes in plan.sends.values():
            for route in routes:
                assert b.box_of(route.tensor.name, plan.rank) == route.dst_box, route
    for key, c in read.items():
        assert (c == 1).all(), key
    assert sum(x.nbytes for p in plans for x in p.local) == b.unique_bytes
    assert sum(x.nbytes for p in plans for rs in p.recvs.values() for x in rs) == (
        sum(b.rank_bytes(r) for r in range(size)) - b.unique_bytes)


@PROPS
@given(gen.strategy_pairs(max_world=12), st.sampled_from(["complete", "full", "dedup"]),
       st.sampled_from([0, 24, 1 << 40]), st.data())
def test_load_streams_cut_alike_in_place(pair, kind, minimum, data):
    """What ``comm.rounds`` relies on to match point-to-point messages without telling
    their sizes: both ends of a load stream cut any window alike into in-place and
    staged segments, in-place views are as long as their segments, and a shorter
    window cuts the same segments short. With no minimum, every forwarded box (whole
    at both ends) travels in place."""
    a, b = pair
    source = _source(a, kind)
    size = b.world_size
    plans = [plan_load(source, b, r) for r in range(size)]
    boxes = [{(t.name, x): np.zeros(x.volume * t.itemsize, np.uint8) for t, x in b.rank_boxes(r)}
             for r in range(size)]

    def shape(segs):
        return [(n, v is None) for n, v in segs]
    with mock.patch.object(route_exec, "IN_PLACE_MIN", minimum):
        for j, plan in enumerate(plans):
            for k, routes in plan.sends.items():
                out = route_exec._Stream(routes, boxes[j])
                into = route_exec._Stream(plans[k].recvs[j], boxes[k])
                total = out.starts[-1]
                off = data.draw(st.integers(0, total - 1))
                n = data.draw(st.integers(1, total - off))
                m = data.draw(st.integers(0, n))
                sent, got = out.segments(off, n), into.segments(off, n)
                assert shape(sent) == shape(got)
                assert sum(x for x, _ in sent) == n
                assert all(v is None or len(v) == x for x, v in sent + got)
                assert shape(rounds._cut(got, m)) == shape(into.segments(off, m))
                if minimum == 0:
                    assert all(v is not None for _, v in sent), sent


@PROPS
@given(gen.strategy_pairs(max_world=12), st.integers(0, 4))
def test_reshard_state_plan(pair, extra):
    a, b = pair
    size = max(a.world_size, b.world_size) + extra   # ranks beyond both strategies too
    plans = [plan_reshard_state(a, b, r) for r in range(size)]

    def holds(route) -> bool:
        return (a.box_of(route.tensor.name, route.provider) == route.src.box
                and route.src.files.count(f"mem:{route.provider}") == 1)

    check_plans(plans, needs_of(b, range(size)), {t.name: t.shape for t in b.tensors}, holds)
    for k, plan in enumerate(plans):
        # a slice this rank already holds is copied, never received
        for routes in plan.recvs.values():
            for route in routes:
                assert a.box_of(route.tensor.name, k) != route.src.box, route
        if k >= max(a.world_size, b.world_size):
            assert not plan.local and not plan.sends and not plan.recvs


@PROPS
@given(gen.strategy_pairs(max_world=12), st.integers(1, 9), st.booleans(), st.booleans())
def test_node_local_plan(pair, size, src_dedup, dst_dedup):
    a, b = pair
    source = _source(a, "dedup" if src_dedup else "full")
    plans = [plan_node_local(source, a.world_size, b, dst_dedup, size, r) for r in range(size)]
    assignment = plan_dedup(b, "whole").owners() if dst_dedup else None
    needs: dict[int, set] = {}
    for d in range(b.world_size):
        for t, x in b.rank_boxes(d):
            if x.is_empty() or (assignment is not None and assignment[(t.name, x)] != d):
                continue
            needs.setdefault(d % size, set()).add((t.name, x))

    def holds(route) -> bool:
        return any(d is not None and d % size == route.provider for d in route.src.rank_dirs())

    check_plans(plans, needs, {t.name: t.shape for t in b.tensors}, holds)
    # bytes sent == bytes whose owner changes: each job rank receives exactly the
    # elements of its destination boxes that none of its own source files store
    for k, plan in enumerate(plans):
        want = 0
        for name, box in needs.get(k, ()):
            t = b.spec(name)
            have = np.zeros(box.sizes, bool)
            for c in source.chunks(name):
                common = c.box.intersect(box)
                if common is not None and any(d % size == k for d in c.rank_dirs()):
                    have[sl(common.shifted(box.offsets))] = True
            want += int((~have).sum()) * t.itemsize
        assert sum(plan.totals(size)[1]) == want, (k, want)
