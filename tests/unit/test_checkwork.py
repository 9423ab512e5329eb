"""planning.checkwork: verify's division of reads among ranks (pure)."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcckpt.layout.box import Box
from hpcckpt.planning.checkwork import CheckItem, divide_checks, divide_files, split_pieces

PROPS = settings(max_examples=300, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def item(file: str, n: int, isz: int = 4, hashed: bool = False, name: str = "t") -> CheckItem:
    return CheckItem(file, name, Box((0,), (n,)), isz, None, 0, n * isz, hashed=hashed)


def test_split_pieces_exact():
    it = item("a", 10, 4)                       # 40 bytes
    assert [(p.lo, p.hi) for p in split_pieces(it, 16)] == [(0, 16), (16, 32), (32, 40)]
    assert [(p.lo, p.hi) for p in split_pieces(it, 18)] == [(0, 16), (16, 32), (32, 40)]
    assert [(p.lo, p.hi) for p in split_pieces(it, 3)] == [(i, i + 4) for i in range(0, 40, 4)]
    assert split_pieces(item("a", 10, 4, hashed=True), 16) == [item("a", 10, 4, hashed=True)]
    assert not split_pieces(it, 16)[0].whole and split_pieces(it, 64)[0].whole


def test_divide_checks_exact():
    items = [item("a", 4, hashed=True), item("a", 4, hashed=True), item("b", 8, hashed=True)]
    # 16 + 16 + 32 bytes; middles at 8, 24, 48 of 64
    assert [[(p.file, p.nbytes) for p in r] for r in divide_checks(items, 2)] == [
        [("a", 16), ("a", 16)], [("b", 32)]]
    assert [[p.file for p in r] for r in divide_checks(items, 4)] == [["a"], ["a"], [], ["b"]]
    assert [len(r) for r in divide_checks(items, 1)] == [3]


def test_divide_checks_nothing_to_read():
    items = [item("a", 0), item("b", 0), item("c", 0)]
    assert [[p.file for p in r] for r in divide_checks(items, 2)] == [["a", "c"], ["b"]]


def test_divide_files():
    items = [item("a", 4, hashed=True), item("b", 4, hashed=True)]
    reads = divide_checks(items, 2)
    assert divide_files(["a", "b", "c", "d"], reads, 2) == [["a", "c"], ["b", "d"]]


@st.composite
def workloads(draw):
    n = draw(st.integers(0, 12))
    items = []
    for i in range(n):
        isz = draw(st.sampled_from((1, 2, 4, 8)))
        items.append(CheckItem(f"f{draw(st.integers(0, 3))}", f"t{i}",
                               Box((0,), (draw(st.integers(0, 40)),)), isz, None, 0, 0,
                               hashed=draw(st.booleans())))
    items = [CheckItem(it.file, it.tensor, it.box, it.itemsize, None, 0,
                       it.box.volume * it.itemsize, hashed=it.hashed) for it in items]
    items.sort(key=lambda it: it.file)
    return items, draw(st.integers(1, 9)), draw(st.integers(1, 64))


@PROPS
@given(workloads())
def test_every_byte_read_once_balanced_contiguous(w):
    items, world, piece = w
    parts = divide_checks(items, world, piece_bytes=piece)
    assert len(parts) == world
    # each byte of each item exactly once
    seen: dict[str, list[int]] = {it.tensor: [0] * it.nbytes for it in items}
    for part in parts:
        for p in part:
            assert p.lo % p.itemsize == 0 and p.hi % p.itemsize == 0 or p.hi == p.lo
            for b in range(p.lo, p.hi):
                seen[p.tensor][b] += 1
            if p.hashed:
                assert p.whole
    assert all(c == 1 for counts in seen.values() for c in counts)
    # concatenating the parts in rank order gives the pieces in file order (contiguous)
    flat = [(p.tensor, p.lo) for part in parts for p in part]
    order = {it.tensor: i for i, it in enumerate(items)}
    assert flat == sorted(flat, key=lambda x: (order[x[0]], x[1]))
    # balanced within the largest unsplittable piece
    total = sum(it.nbytes for it in items)
    biggest = max([p.nbytes for part in parts for p in part], default=0)
    for part in parts:
        assert abs(sum(p.nbytes for p in part) - total / world) <= biggest


def test_tiles_as_grid_exact():
    from hpcckpt.planning.checkwork import tiles_as_grid
    assert tiles_as_grid((4, 6), {((0, 0), (2, 6)), ((2, 0), (2, 6))})
    assert tiles_as_grid((), {((), ())})
    assert tiles_as_grid((5,), {((0,), (3,)), ((3,), (2,))})
    assert not tiles_as_grid((5,), {((0,), (3,)), ((2,), (3,))})          # overlap
    assert not tiles_as_grid((5,), {((0,), (3,)), ((3,), (1,))})          # gap at the end
    assert not tiles_as_grid((4, 4), {((0, 0), (2, 4)), ((2, 0), (2, 2))})  # a missing cell
    assert not tiles_as_grid((4,), {((0,), (2,)), ((2,), (2,)), ((0,), (4,))})  # not a grid
    assert not tiles_as_grid((4,), {((0,), (2,)), ((2,), (3,))})          # leaves the shape


@PROPS
@given(st.lists(st.integers(1, 5), min_size=0, max_size=3).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)), st.sets(st.tuples(
        st.tuples(*[st.integers(0, s - 1) for s in shape]),
        st.tuples(*[st.integers(1, s) for s in shape])), max_size=6))))
def test_tiles_as_grid_is_sound(case):
    """When it says yes, every element is covered exactly once, and nothing is outside."""
    import numpy as np
    from hpcckpt.planning.checkwork import tiles_as_grid
    shape, boxes = case
    if not tiles_as_grid(shape, boxes):
        return
    count = np.zeros(shape, np.int64)
    for offs, sizes in boxes:
        assert all(o + z <= s for o, z, s in zip(offs, sizes, shape))
        count[tuple(slice(o, o + z) for o, z in zip(offs, sizes))] += 1
    assert (count == 1).all()


@PROPS
@given(workloads(), st.integers(1, 7))
def test_shards_cover_every_byte_once(w, count):
    """Shards 0..N-1, each divided among its job's ranks, read every byte exactly once."""
    from hpcckpt.planning.checkwork import Shard, shard_items
    items, world, piece = w
    seen: dict[str, list[int]] = {it.tensor: [0] * it.nbytes for it in items}
    for i in range(count):
        for part in divide_checks(shard_items(items, Shard(i, count), piece), world,
                                  piece_bytes=piece):
            for p in part:
                if p.hashed:
                    assert p.whole
                for b in range(p.lo, p.hi):
                    seen[p.tensor][b] += 1
    assert all(c == 1 for counts in seen.values() for c in counts)


def test_shard_parse():
    import pytest
    from hpcckpt.planning.checkwork import Shard
    assert Shard.parse("0/1") == Shard(0, 1) and str(Shard.parse("3/4")) == "3/4"
    for text, msg in [
        ("4/4", "--shard 4/4: shard 4 out of range 0..3 (shards count from 0)"),
        ("0/0", "--shard 0/0: the shard count N must be at least 1"),
        ("1", "--shard '1': expected I/N, shard I of N counted from 0 (e.g. 0/4)"),
        ("-1/4", "--shard '-1/4': expected I/N, shard I of N counted from 0 (e.g. 0/4)"),
        ("a/b", "--shard 'a/b': expected I/N, shard I of N counted from 0 (e.g. 0/4)")]:
        with pytest.raises(ValueError) as e:
            Shard.parse(text)
        assert str(e.value) == msg


def test_shard_items_many_shards():
    """A huge N costs nothing (no list per shard); the last shard holds the last byte."""
    from hpcckpt.planning.checkwork import Shard, shard_items
    items = [item("a", 4, hashed=True), item("b", 4, hashed=True, name="u")]
    n = 10 ** 12
    assert shard_items(items, Shard(0, n)) == []
    assert [p.tensor for p in shard_items(items, Shard(n // 4, n))] == ["t"]
    assert [p.tensor for p in shard_items(items, Shard(3 * n // 4, n))] == ["u"]
