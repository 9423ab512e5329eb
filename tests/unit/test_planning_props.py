"""Property tests of the pure planning layer over random strategies (hypothesis).

Every property is checked element by element (numpy counter arrays) or byte by byte,
never by comparing totals alone.
"""
from __future__ import annotations

import math
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.dtypes import itemsize
from hpcckpt.layout.box import Box
from hpcckpt.layout.strategy import Strategy
from hpcckpt.layout.yaml_io import strategy_from_dict, strategy_to_yaml
from hpcckpt.planning.assign import balanced_cuts, lpt
from hpcckpt.planning.dedup import plan_dedup
from hpcckpt.planning.outputs import divide_writes, hf_files, rank_file, rank_files
from hpcckpt.planning.rank_header import rank_header
from hpcckpt.planning.routes import plan_routes
from hpcckpt.planning.runs import strided_runs
from hpcckpt.layout.tensor import TensorInfo
from hpcckpt.planning.sources import group_chunks, strategy_source

import yaml

FMT = "hpcckpt.strategy/1"
AXES = ("dp", "tp", "ep", "cp")
DTYPES = ("F32", "BF16", "U8", "I64", "F16", "F8_E4M3")

PROPS = settings(max_examples=200, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sl(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))


# ---------------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------------
@st.composite
def tensor_table(draw):
    """[(name, shape, dtype)] for 1-4 tensors of 0-3 dims of size 0-9."""
    n = draw(st.integers(1, 4))
    out = []
    for i in range(n):
        ndim = draw(st.integers(0, 3))
        shape = [draw(st.integers(0, 9)) for _ in range(ndim)]
        out.append((f"layer.{i}.w", shape, draw(st.sampled_from(DTYPES))))
    return out


@st.composite
def mesh_dict(draw, max_world: int = 64):
    n_axes = draw(st.integers(1, 3))
    use_pp = draw(st.booleans())
    names = list(draw(st.permutations(AXES))[: n_axes - (1 if use_pp else 0)])
    if use_pp:
        names.append("pp")
    names = draw(st.permutations(names))
    mesh, world = {}, 1
    for a in names:
        size = draw(st.integers(1, max(1, min(4, max_world // world))))
        mesh[a] = size
        world *= size
    return mesh


@st.composite
def layout_doc(draw, tensors, max_world: int = 64):
    """A valid strategy document for the given tensors."""
    mesh = draw(mesh_dict(max_world))
    axes = list(mesh)
    entries = {}
    for name, shape, dtype in tensors:
        e: dict = {"shape": list(shape), "dtype": dtype}
        stage = None
        if "pp" in mesh and draw(st.booleans()):
            stage = draw(st.integers(0, mesh["pp"] - 1))
            e["stage"] = stage
        free = [a for a in axes if not (a == "pp" and stage is not None)]
        split = []
        for _ in shape:
            kind = draw(st.sampled_from(["none", "none", "one", "list"]))
            if kind == "one" and free:
                a = draw(st.sampled_from(free))
                free.remove(a)
                split.append(a)
            elif kind == "list" and len(free) >= 2:
                pair = draw(st.permutations(free))[:2]
                for a in pair:
                    free.remove(a)
                split.append(list(pair))
            else:
                split.append(None)
        if any(x is not None for x in split):
            # sometimes omit trailing nulls (shorter split lists are allowed)
            if draw(st.booleans()):
                while split and split[-1] is None:
                    split.pop()
            e["split"] = split
        zero_candidates = free  # not in split; pp only when the tensor has no stage
        if shape and zero_candidates and draw(st.booleans()):
            e["zero"] = draw(st.sampled_from(zero_candidates))
        entries[name] = e
    doc = {"format": FMT, "mesh": mesh, "tensors": entries}
    s = strategy_from_dict(doc, where="gen")
    # sometimes turn a tensor into explicit boxes: the grid boxes under a rank permutation
    world = s.world_size
    for name, *_ in tensors:
        if draw(st.integers(0, 4)) == 0:
            perm = draw(st.permutations(range(world)))
            boxes = {}
            for r in range(world):
                b = s.box_of(name, r)
                if b is not None:
                    boxes[perm[r]] = b.to_dict()
            spec = s.spec(name)
            entries[name] = {"shape": list(spec.shape), "dtype": spec.dtype, "boxes": boxes}
    return doc


@st.composite
def strategies(draw, max_world: int = 64):
    return strategy_from_dict(draw(layout_doc(draw(tensor_table()), max_world)), where="gen")


@st.composite
def strategy_pairs(draw, max_world: int = 16):
    tensors = draw(tensor_table())
    a = strategy_from_dict(draw(layout_doc(tensors, max_world)), where="A")
    b = strategy_from_dict(draw(layout_doc(tensors, max_world)), where="B")
    return a, b


# ---------------------------------------------------------------------------------
# (a) chunks tile every tensor; box_of agrees with chunks and replicas
# ---------------------------------------------------------------------------------
@PROPS
@given(strategies())
def test_chunks_tile_and_agree_with_box_of(s: Strategy):
    for t in s.tensors:
        counter = np.zeros(t.shape, dtype=np.int64)
        chunks = s.chunks(t.name)
        holder = {}
        for box, ranks in chunks:
            assert not box.is_empty()
            assert Box.full(t.shape).contains(box)
            assert ranks and ranks == tuple(sorted(set(ranks)))
            counter[sl(box)] += 1
            for r in ranks:
                assert r not in holder, (t.name, r)
                holder[r] = box
        assert (counter == 1).all(), t.name
        assert len({b for b, _ in chunks}) == len(chunks)
        by_box = dict(chunks)
        for r in range(s.world_size):
            b = s.box_of(t.name, r)
            if b is None or b.is_empty():
                assert r not in holder, (t.name, r)
                if b is None:
                    assert s.replicas(t.name, r) == ()
                continue
            assert holder.get(r) == b, (t.name, r, b)
            assert s.replicas(t.name, r) == by_box[b]
        # rank_boxes agrees with box_of
        for r in range(s.world_size):
            got = {spec.name: b for spec, b in s.rank_boxes(r)}
            if t.name in got:
                assert got[t.name] == s.box_of(t.name, r)
            else:
                assert s.box_of(t.name, r) is None
    # unique bytes vs per-rank bytes: each rank holds at most what exists, replicas included
    assert sum(s.rank_bytes(r) for r in range(s.world_size)) == sum(
        b.volume * t.itemsize * len(rs) for t in s.tensors for b, rs in s.chunks(t.name))


@PROPS
@given(strategies())
def test_chunk_count_is_len_of_chunks(s: Strategy):
    # verify checks a manifest's checksum count against chunk_count without chunks()
    for t in s.tensors:
        assert s.chunk_count(t.name) == len(s.chunks(t.name)), t


@PROPS
@given(strategies(), st.integers(0, 2**32 - 1))
def test_chunks_by_dimension_agree_with_chunks_by_coordinates(s: Strategy, seed):
    # chunks() builds a grid tensor's boxes as a product over its dimensions and, given a
    # box, only those meeting it (chunk_positions also numbers them): the same boxes,
    # holders and order as building the box of every coordinate and filtering
    rnd = random.Random(seed)
    for t in s.tensors:
        full = s.chunks(t.name)
        if t.boxes is None:
            assert full == s._chunks_by_coords(t, s._free_offsets(t), None), t
        for _ in range(4):
            within = Box(tuple(rnd.randint(0, n) for n in t.shape),
                         tuple(rnd.randint(0, n) for n in t.shape))
            meeting = [(i, b, r) for i, (b, r) in enumerate(full) if within.intersect(b)]
            assert s.chunks(t.name, within) == [(b, r) for _, b, r in meeting], (t, within)
            assert s.chunk_positions(t.name, within) == meeting, (t, within)


@PROPS
@given(strategies())
def test_yaml_roundtrip_random(s: Strategy):
    back = strategy_from_dict(yaml.safe_load(strategy_to_yaml(s)), where="rt")
    assert back == s
    assert back.mesh.names == s.mesh.names
    for t in s.tensors:
        assert back.chunks(t.name) == s.chunks(t.name)
        for r in range(s.world_size):
            assert back.box_of(t.name, r) == s.box_of(t.name, r)


# ---------------------------------------------------------------------------------
# (b) dedup assignment
# ---------------------------------------------------------------------------------
@PROPS
@given(strategies())
def test_dedup_assigns_each_box_once_to_a_replica(s: Strategy):
    assign = plan_dedup(s, "whole").owners()
    want = {(t.name, b): rs for t in s.tensors for b, rs in s.chunks(t.name)}
    assert set(assign) == set(want)
    for key, r in assign.items():
        assert r in want[key]
    assert assign == plan_dedup(s, "whole").owners()  # deterministic


# ---------------------------------------------------------------------------------
# (c) rank files store every element (once with dedup)
# ---------------------------------------------------------------------------------
@PROPS
@given(strategies())
def test_rank_files_store_every_element(s: Strategy):
    for dedup in (None, plan_dedup(s, "whole"), plan_dedup(s, "balanced", min_piece=0)):
        files = rank_files(s, "p", dedup)
        assert len(files) == s.world_size
        counter = {t.name: np.zeros(t.shape, dtype=np.int64) for t in s.tensors}
        for r, f in enumerate(files):
            assert f.rank == r
            assert f.path == f"rank_{r}/p_rank_{r}.safetensors"
            pos = len(f.header)
            for e in f.entries:
                t = s.spec(e.name)
                assert e.global_shape == t.shape and e.dtype == t.dtype
                assert e.begin == pos and e.nbytes == e.box.volume * t.itemsize
                pos = e.end
                if dedup is None or dedup.mode == "whole":
                    assert e.box == s.box_of(e.name, r)
                else:  # a slab of the rank's box
                    assert s.box_of(e.name, r).contains(e.box)
                counter[e.name][sl(e.box)] += 1
        for t in s.tensors:
            if dedup is not None:
                assert (counter[t.name] == 1).all(), t.name
            else:
                want = np.zeros(t.shape, dtype=np.int64)
                for b, rs in s.chunks(t.name):
                    want[sl(b)] = len(rs)
                np.testing.assert_array_equal(counter[t.name], want)
                assert (counter[t.name] >= 1).all()


# ---------------------------------------------------------------------------------
# (d) divide_writes covers every byte exactly once, balanced
# ---------------------------------------------------------------------------------
def _check_pieces(files, pieces, world):
    cover = [[np.zeros(e.nbytes, dtype=np.int64) for e in f.entries] for f in files]
    per_rank = []
    for r in range(world):
        n = 0
        for p in pieces[r]:
            e = files[p.file].entries[p.entry]
            assert e.box.contains(p.box) and not p.box.is_empty()
            assert p.nbytes == p.box.volume * e.itemsize
            sr = strided_runs(p.box, e.box, p.box, e.itemsize)
            assert sr.num_runs == 1, "piece must be contiguous in the entry"
            cover[p.file][p.entry][sr.src_start:sr.src_start + sr.length] += 1
            if p.whole:
                assert p.box == e.box and p.nbytes == e.nbytes
            n += p.nbytes
        per_rank.append(n)
    for f, cs in zip(files, cover):
        for e, c in zip(f.entries, cs):
            assert (c == 1).all(), (f.path, e.name)
    return per_rank


@PROPS
@given(strategies(), st.integers(1, 300))
def test_divide_writes_hf_shards(s: Strategy, max_shard):
    infos = [TensorInfo(t.name, t.shape, t.dtype) for t in s.tensors]
    files = hf_files(infos, max_shard)
    total = sum(f.data_bytes for f in files)
    assert total == s.unique_bytes
    largest = max((e.nbytes for f in files for e in f.entries), default=0)
    for world in range(1, 6):
        pieces = divide_writes(files, world)
        assert len(pieces) == world
        per_rank = _check_pieces(files, pieces, world)
        assert sum(per_rank) == total
        assert max(per_rank) <= total / world + largest, (per_rank, total, largest)


@PROPS
@given(strategies(max_world=16), st.booleans())
def test_divide_writes_rank_files_one_per_rank(s: Strategy, use_dedup):
    files = rank_files(s, "p", plan_dedup(s) if use_dedup else None)
    world = s.world_size
    pieces = divide_writes(files, world)
    per_rank = _check_pieces(files, pieces, world)
    for r in range(world):
        assert all(p.file == r and p.whole for p in pieces[r])
        assert per_rank[r] == files[r].data_bytes
    # a different number of writers still covers every byte once
    for w in (1, world + 1):
        per = _check_pieces(files, divide_writes(files, w), w)
        assert sum(per) == sum(f.data_bytes for f in files)


@PROPS
@given(st.lists(st.integers(0, 1000), max_size=20), st.integers(1, 8))
def test_balanced_cuts_and_lpt(sizes, parts):
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += n
    cuts = balanced_cuts(starts, pos, parts)
    assert len(cuts) == parts + 1 and cuts[0] == 0 and cuts[-1] == pos
    assert cuts == sorted(cuts)
    owner = lpt(sizes, parts)
    assert len(owner) == len(sizes) and all(0 <= o < parts for o in owner)
    loads = [sum(w for w, o in zip(sizes, owner) if o == p) for p in range(parts)]
    if sizes:
        assert max(loads) <= sum(sizes) / parts + max(sizes)


# ---------------------------------------------------------------------------------
# (e) resharding: source regions tile every destination box once
# ---------------------------------------------------------------------------------
def _file_of_rank(r: int) -> str:
    return f"rank_{r}/f.safetensors"


@PROPS
@given(strategy_pairs(max_world=64))
def test_reshard_sources_tile_destination(pair):
    a, b = pair
    source = strategy_source(a, file_of_rank=_file_of_rank)
    source.check_complete("A")
    assert source.unique_bytes == b.unique_bytes
    for t in b.tensors:
        for dbox, _ in b.chunks(t.name):
            counter = np.zeros(dbox.sizes, dtype=np.int64)
            read = 0
            for chunk, region in source.overlapping(t.name, dbox):
                assert dbox.contains(region) and chunk.box.contains(region)
                assert chunk.box.intersect(dbox) == region
                assert chunk.files
                for f, r in zip(chunk.files, chunk.rank_dirs()):
                    assert f == _file_of_rank(r)
                    assert a.box_of(t.name, r) == chunk.box
                counter[sl(region.shifted(dbox.offsets))] += 1
                read += region.volume * t.itemsize
            assert (counter == 1).all(), (t.name, dbox)
            assert read == dbox.volume * t.itemsize


@PROPS
@given(strategies())
def test_dedup_source_and_group_chunks(s: Strategy):
    plan = plan_dedup(s, "whole")
    assign = plan.owners()

    def holds(r, name):
        box = s.box_of(name, r)
        return box is not None and assign.get((name, box)) == r

    src = strategy_source(s, _file_of_rank, holds)
    src.check_complete("dedup")
    files = rank_files(s, "p", plan)
    grouped = group_chunks((e.name, e.box, f.path) for f in files for e in f.entries)
    for t in s.tensors:
        chunks = src.chunks(t.name)
        assert all(len(c.files) == 1 for c in chunks)
        assert (sorted(c.box.offsets for c in chunks)
                == sorted(b.offsets for b, _ in s.chunks(t.name)))
        assert {c.box: c.rank_dirs() for c in chunks} == {
            c.box: c.rank_dirs() for c in grouped.get(t.name, [])}


# ---------------------------------------------------------------------------------
# (f) routes: every destination byte arrives once, both ends agree on the streams
# ---------------------------------------------------------------------------------
@PROPS
@given(strategy_pairs(max_world=16), st.integers(0, 2**32 - 1))
def test_plan_routes_exactly_once_and_consistent(pair, seed):
    a, b = pair
    source = strategy_source(a, file_of_rank=_file_of_rank)
    infos = {t.name: TensorInfo(t.name, t.shape, t.dtype) for t in b.tensors}
    dests = [(i, infos[t.name], dbox, receivers)
             for i, t in enumerate(b.tensors) for dbox, receivers in b.chunks(t.name)]
    rng = random.Random(seed)
    picks: dict = {}

    def choose(chunk, tensor, dbox, k):
        key = (tensor.name, chunk.box, dbox, k)
        if key not in picks:
            holders = [r for r in chunk.rank_dirs() if r is not None]
            picks[key] = rng.choice(holders)
        return picks[key]

    world = max(a.world_size, b.world_size)
    plans = [plan_routes(r, dests, source, choose) for r in range(world)]
    for r, plan in enumerate(plans):
        assert plan.rank == r
        for route in plan.local:
            assert route.provider == route.receiver == r
        for k, routes in plan.sends.items():
            assert k != r and routes
            assert all(x.provider == r and x.receiver == k for x in routes)
            # what j sends to k is exactly what k expects from j, in the same order
            assert plans[k].recvs.get(r) == routes
        for j, routes in plan.recvs.items():
            assert j != r and routes
            assert all(x.provider == j and x.receiver == r for x in routes)
            assert plans[j].sends.get(r) == routes
        send, recv = plan.totals(world)
        assert sum(send) + sum(x.nbytes for x in plan.local) == plan.bytes_read

    # every (receiver, tensor, dst box) byte arrives exactly once, from a holder
    counters = {}
    for k, dbox_list in _expected_destinations(b).items():
        for name, dbox in dbox_list:
            counters[(k, name, dbox)] = np.zeros(dbox.sizes, dtype=np.int64)
    received = 0
    for k, plan in enumerate(plans):
        for route in [*plan.local, *(x for rs in plan.recvs.values() for x in rs)]:
            assert route.receiver == k
            key = (k, route.tensor.name, route.dst_box)
            assert key in counters, key
            assert route.provider in route.src.rank_dirs()
            assert a.box_of(route.tensor.name, route.provider) == route.src.box
            assert route.dst_box.contains(route.region) and route.src.box.contains(route.region)
            counters[key][sl(route.region.shifted(route.dst_box.offsets))] += 1
            received += route.nbytes
    for key, c in counters.items():
        assert (c == 1).all(), key
    assert received == sum(b.rank_bytes(k) for k in range(b.world_size))


def _expected_destinations(b: Strategy) -> dict[int, list]:
    out: dict[int, list] = {}
    for t in b.tensors:
        for dbox, receivers in b.chunks(t.name):
            for k in receivers:
                out.setdefault(k, []).append((t.name, dbox))
    return out


def test_itemsizes_used_by_generators():
    assert {d: itemsize(d) for d in DTYPES} == {"F32": 4, "BF16": 2, "U8": 1, "I64": 8,
                                                 "F16": 2, "F8_E4M3": 1}
    assert math.prod(()) == 1


# ---------------------------------------------------------------------------------
# rank file headers: the text templates write exactly what json.dumps of the dicts does
# ---------------------------------------------------------------------------------
#: names a JSON or format template could mishandle: braces, quotes, escapes, non-ASCII
NAME_CHARS = st.sampled_from(list('ab.{}"\\/:,[] é日\u2028\t{0}'))


def _reference_rank_file(s: Strategy, rank: int, dedup):
    """rank_file as it was first written: records -> dicts -> build_header."""
    import json
    from hpcckpt.planning.outputs import make_file
    records = []
    for t, box in s.rank_boxes(rank):
        if dedup is not None:
            box = dedup.box_for(rank, t.name)
            if box is None:
                continue
        records.append((t.name, t.dtype, box, t.shape))
    desc = {n: {"shape": list(g), "offsets": list(b.offsets)} for n, _, b, g in records}
    meta = {"format": "ms", "remove_redundancy": "True" if dedup is not None else "False",
            "hpcckpt": json.dumps(desc, separators=(",", ":"))}
    if dedup is not None:
        meta["dedup"] = dedup.mode
    return make_file("f", records, meta, rank)


@PROPS
@given(st.data())
def test_rank_file_headers_equal_the_json_dumps_layout(data):
    tensors = data.draw(tensor_table())
    names = data.draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=6), min_size=len(tensors),
                               max_size=len(tensors), unique=True))
    doc = data.draw(layout_doc(tensors, 16))
    doc["tensors"] = {new: doc["tensors"][old] for new, (old, _, _) in zip(names, tensors)}
    s = strategy_from_dict(doc, where="gen")
    mode = data.draw(st.sampled_from([None, "whole", "balanced"]))
    dedup = plan_dedup(s, mode) if mode else None
    for _ in range(2):   # the second pass is served from the templates the first built
        for r in range(s.world_size):
            got = rank_file(s, "p", r, dedup, path="f")
            want = _reference_rank_file(s, r, dedup)
            assert got.header == want.header
            assert got.entries == want.entries
            assert rank_header(s, r, dedup) == (want.header, want.size)
