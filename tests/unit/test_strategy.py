"""Strategy model (SPEC 1.1): rank -> box, chunks, replicas, YAML round trip, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from hpcckpt.errors import StrategyError
from hpcckpt.layout.box import Box, array_split_bounds, array_split_piece
from hpcckpt.layout.strategy import Mesh, Strategy, TensorSpec
from hpcckpt.layout.yaml_io import (read_strategy_yaml, strategy_from_dict,
                                    strategy_to_yaml)

FMT = "hpcckpt.strategy/1"


def make(mesh: dict, tensors: dict) -> Strategy:
    return strategy_from_dict({"format": FMT, "mesh": mesh, "tensors": tensors}, where="s.yaml")


def B(offsets, sizes) -> Box:
    return Box(tuple(offsets), tuple(sizes))


# ---------------------------------------------------------------------------------
# The SPEC example with small shapes
# ---------------------------------------------------------------------------------
EMBED, DOWN, NORM, HEAD = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                           "model.layers.0.input_layernorm.weight", "lm_head.weight")


@pytest.fixture
def spec_example() -> Strategy:
    return make({"pp": 2, "dp": 2, "tp": 2}, {
        EMBED: {"shape": [10, 4], "dtype": "BF16", "split": ["tp", None], "stage": 0},
        DOWN: {"shape": [5, 7], "dtype": "BF16", "split": [None, "tp"], "stage": 0, "zero": "dp"},
        NORM: {"shape": [4], "dtype": "F32", "stage": 0},
        HEAD: {"shape": [10, 4], "dtype": "BF16", "split": ["tp", None], "stage": 1},
    })


def test_spec_example_mesh(spec_example):
    m = spec_example.mesh
    assert m.names == ("pp", "dp", "tp")
    assert spec_example.world_size == 8
    # rank = pp*4 + dp*2 + tp (last axis fastest)
    assert [m.coords(r) for r in range(8)] == [
        {"pp": r // 4, "dp": (r // 2) % 2, "tp": r % 2} for r in range(8)]
    for r in range(8):
        assert m.rank_of(m.coords(r)) == r


def test_spec_example_boxes_every_rank(spec_example):
    s = spec_example
    expected = {
        # embed: rows split over tp (10 -> 5 + 5), stage 0 only
        EMBED: {0: B([0, 0], [5, 4]), 1: B([5, 0], [5, 4]), 2: B([0, 0], [5, 4]),
                3: B([5, 0], [5, 4]), 4: None, 5: None, 6: None, 7: None},
        # down_proj: columns over tp (7 -> 4 + 3), then rows of the slice over dp (5 -> 3 + 2)
        DOWN: {0: B([0, 0], [3, 4]), 1: B([0, 4], [3, 3]), 2: B([3, 0], [2, 4]),
               3: B([3, 4], [2, 3]), 4: None, 5: None, 6: None, 7: None},
        # layernorm: replicated on stage 0
        NORM: {0: B([0], [4]), 1: B([0], [4]), 2: B([0], [4]), 3: B([0], [4]),
               4: None, 5: None, 6: None, 7: None},
        # lm_head: rows over tp, stage 1 only
        HEAD: {0: None, 1: None, 2: None, 3: None, 4: B([0, 0], [5, 4]),
               5: B([5, 0], [5, 4]), 6: B([0, 0], [5, 4]), 7: B([5, 0], [5, 4])},
    }
    for name, per_rank in expected.items():
        for r, box in per_rank.items():
            assert s.box_of(name, r) == box, (name, r)
    # rank_boxes lists exactly the non-None boxes, in strategy order
    for r in range(8):
        got = [(t.name, b) for t, b in s.rank_boxes(r)]
        want = [(n, expected[n][r]) for n in (EMBED, DOWN, NORM, HEAD)
                if expected[n][r] is not None]
        assert got == want, r


def test_rank_boxes_shares_one_box_per_layout_exactly():
    """Tensors laid out alike (shape, split, stage, zero) share a rank's box; any
    difference in those, dtype aside, gives the tensor its own."""
    base = {"shape": [6, 4], "split": ["tp", None], "stage": 1}
    s = make({"dp": 2, "pp": 2, "tp": 2}, {
        "a": {**base, "dtype": "F32"}, "b": {**base, "dtype": "BF16"},
        "c": {**base, "dtype": "F32", "zero": "dp"}, "d": {**base, "dtype": "F32", "stage": 0},
        "e": {**base, "dtype": "F32", "split": [None, "tp"]},
        "f": {"shape": [7, 4], "split": ["tp", None], "stage": 1, "dtype": "F32"}})
    for r in range(s.world_size):
        got = [(t.name, b) for t, b in s.rank_boxes(r)]
        assert got == [(t.name, s.box_of(t.name, r)) for t in s.tensors
                       if s.box_of(t.name, r) is not None], r
    r = 2   # dp 0, pp 1, tp 0
    assert len({s.box_of(n, r) for n in "acef"}) == 4 and s.box_of("b", r) == s.box_of("a", r)


def test_spec_example_chunks_and_replicas(spec_example):
    s = spec_example
    assert s.chunks(EMBED) == [(B([0, 0], [5, 4]), (0, 2)), (B([5, 0], [5, 4]), (1, 3))]
    assert s.chunks(DOWN) == [(B([0, 0], [3, 4]), (0,)), (B([0, 4], [3, 3]), (1,)),
                              (B([3, 0], [2, 4]), (2,)), (B([3, 4], [2, 3]), (3,))]
    assert s.chunks(NORM) == [(B([0], [4]), (0, 1, 2, 3))]
    assert s.chunks(HEAD) == [(B([0, 0], [5, 4]), (4, 6)), (B([5, 0], [5, 4]), (5, 7))]
    assert s.replicas(EMBED, 2) == (0, 2)
    assert s.replicas(EMBED, 3) == (1, 3)
    assert s.replicas(DOWN, 3) == (3,)
    assert s.replicas(NORM, 1) == (0, 1, 2, 3)
    assert s.replicas(HEAD, 7) == (5, 7)
    # ranks holding nothing of a tensor have no replicas
    for r in range(4, 8):
        assert s.replicas(EMBED, r) == ()
        assert s.replicas(DOWN, r) == ()
        assert s.replicas(NORM, r) == ()
    for r in range(4):
        assert s.replicas(HEAD, r) == ()


def test_spec_example_used_axes_and_bytes(spec_example):
    s = spec_example
    assert s.used_axes(s.spec(EMBED)) == ("pp", "tp")
    assert s.used_axes(s.spec(DOWN)) == ("pp", "dp", "tp")
    assert s.used_axes(s.spec(NORM)) == ("pp",)
    assert s.used_axes(s.spec(HEAD)) == ("pp", "tp")
    assert s.unique_bytes == (40 + 35 + 40) * 2 + 4 * 4
    assert s.rank_bytes(0) == 20 * 2 + 12 * 2 + 16
    assert s.rank_bytes(3) == 20 * 2 + 6 * 2 + 16
    assert s.rank_bytes(5) == 20 * 2


def test_spec_example_yaml_text_parses():
    text = f"""
format: {FMT}
mesh:
  pp: 2
  dp: 2
  tp: 2
tensors:
  model.embed_tokens.weight:
    {{shape: [32000, 1024], dtype: BF16, split: [tp, null], stage: 0}}
  model.layers.0.mlp.down_proj.weight:
    {{shape: [1024, 4096], dtype: BF16, split: [null, tp], stage: 0, zero: dp}}
  model.layers.0.input_layernorm.weight: {{shape: [1024], dtype: F32, stage: 0}}
  lm_head.weight:
    {{shape: [32000, 1024], dtype: BF16, split: [tp, null], stage: 1}}
"""
    s = strategy_from_dict(yaml.safe_load(text))
    assert s.box_of(EMBED, 1) == B([16000, 0], [16000, 1024])
    assert s.box_of(DOWN, 3) == B([512, 2048], [512, 2048])
    assert s.box_of(HEAD, 6) == B([0, 0], [16000, 1024])
    assert s.box_of(HEAD, 2) is None


def test_read_strategy_yaml_file(tmp_path, spec_example):
    p = tmp_path / "s.yaml"
    p.write_text(strategy_to_yaml(spec_example))
    assert read_strategy_yaml(p) == spec_example


# ---------------------------------------------------------------------------------
# Mesh order and multi-axis splits
# ---------------------------------------------------------------------------------
def test_mesh_order_changes_rank_numbering():
    t = {"w": {"shape": [4, 6], "dtype": "F32", "split": ["dp", "tp"]}}
    a = make({"tp": 2, "dp": 2}, t)  # rank = tp*2 + dp
    b = make({"dp": 2, "tp": 2}, t)  # rank = dp*2 + tp
    rows = {0: (0, 2), 1: (2, 2)}
    cols = {0: (0, 3), 1: (3, 3)}

    def box(dp, tp):
        return B([rows[dp][0], cols[tp][0]], [rows[dp][1], cols[tp][1]])

    assert [a.box_of("w", r) for r in range(4)] == [box(0, 0), box(1, 0), box(0, 1), box(1, 1)]
    assert [b.box_of("w", r) for r in range(4)] == [box(0, 0), box(0, 1), box(1, 0), box(1, 1)]
    assert a != b


def test_split_over_axis_list_is_first_major():
    s = make({"dp": 2, "tp": 3}, {"w": {"shape": [12, 2], "dtype": "F32",
                                          "split": [["tp", "dp"], None]}})
    # piece index = tp * 2 + dp over 6 parts of 2 rows
    for r in range(6):
        c = s.mesh.coords(r)
        idx = c["tp"] * 2 + c["dp"]
        assert s.box_of("w", r) == B([2 * idx, 0], [2, 2]), r
    s2 = make({"dp": 2, "tp": 3}, {"w": {"shape": [12, 2], "dtype": "F32",
                                           "split": [["dp", "tp"], None]}})
    for r in range(6):
        c = s2.mesh.coords(r)
        idx = c["dp"] * 3 + c["tp"]
        assert s2.box_of("w", r) == B([2 * idx, 0], [2, 2]), r
    # with mesh dp, tp the list [dp, tp] numbers pieces like the ranks
    assert [s2.box_of("w", r).offsets[0] for r in range(6)] == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize("n,k", [(0, 1), (0, 3), (1, 4), (2, 5), (5, 2), (7, 3), (10, 4),
                                 (11, 4), (12, 4), (3, 3), (13, 5)])
def test_uneven_split_matches_numpy_array_split(n, k):
    pieces = np.array_split(np.arange(n), k)
    s = make({"tp": k}, {"w": {"shape": [n, 2], "dtype": "F16", "split": ["tp", None]}})
    start = 0
    for r, p in enumerate(pieces):
        assert array_split_piece(n, k, r) == (start, len(p))
        assert s.box_of("w", r) == B([start, 0], [len(p), 2])
        if len(p):
            assert p[0] == start
        start += len(p)
    assert array_split_bounds(n, k) == list(np.cumsum([0] + [len(p) for p in pieces]))
    # chunks drop empty pieces; the non-empty ones tile the tensor
    chunks = s.chunks("w")
    assert [b for b, _ in chunks] == [B([sum(len(q) for q in pieces[:r]), 0], [len(p), 2])
                                      for r, p in enumerate(pieces) if len(p)]
    assert [rs for _, rs in chunks] == [(r,) for r, p in enumerate(pieces) if len(p)]


def test_zero_size_pieces_when_n_less_than_k():
    s = make({"tp": 4}, {"w": {"shape": [2, 3], "dtype": "F32", "split": ["tp", None]}})
    assert [s.box_of("w", r) for r in range(4)] == [
        B([0, 0], [1, 3]), B([1, 0], [1, 3]), B([2, 0], [0, 3]), B([2, 0], [0, 3])]
    assert s.chunks("w") == [(B([0, 0], [1, 3]), (0,)), (B([1, 0], [1, 3]), (1,))]
    assert s.rank_bytes(3) == 0


def test_zero_on_top_of_split():
    # tp splits columns 9 -> 3,3,3; zero over dp splits the local rows 7 -> 3,2,2
    s = make({"dp": 3, "tp": 3}, {"w": {"shape": [7, 9], "dtype": "F32",
                                          "split": [None, "tp"], "zero": "dp"}})
    rows = [(0, 3), (3, 2), (5, 2)]
    for r in range(9):
        c = s.mesh.coords(r)
        ro, rs = rows[c["dp"]]
        assert s.box_of("w", r) == B([ro, 3 * c["tp"]], [rs, 3]), r
    assert len(s.chunks("w")) == 9
    assert all(len(rs) == 1 for _, rs in s.chunks("w"))


def test_zero_splits_dim0_of_the_local_slice():
    # split dim 0 over tp (8 -> 4 + 4), then ZeRO over dp cuts each 4-row tp slice like
    # array_split(4, 3) = 2, 1, 1 rows, offset inside the tp slice
    s = make({"tp": 2, "dp": 3}, {"w": {"shape": [8, 2], "dtype": "U8",
                                          "split": ["tp", None], "zero": "dp"}})
    local = [(0, 2), (2, 1), (3, 1)]
    for r in range(6):
        c = s.mesh.coords(r)
        o, n = local[c["dp"]]
        assert s.box_of("w", r) == B([4 * c["tp"] + o, 0], [n, 2]), r


def test_zero_with_replicas_on_other_axis():
    s = make({"dp": 2, "tp": 2}, {"w": {"shape": [4], "dtype": "F32", "zero": "dp"}})
    assert s.chunks("w") == [(B([0], [2]), (0, 1)), (B([2], [2]), (2, 3))]
    assert s.replicas("w", 1) == (0, 1)
    assert s.replicas("w", 3) == (2, 3)
    assert s.used_axes(s.spec("w")) == ("dp",)


def test_chunks_tile_tensor_and_list_replicas():
    s = make({"pp": 2, "dp": 2, "tp": 3}, {
        "a": {"shape": [5, 7], "dtype": "F32", "split": ["tp", None], "zero": "dp"},
        "b": {"shape": [4, 3, 2], "dtype": "F32", "split": [None, ["dp", "tp"]], "stage": 1},
        "c": {"shape": [3], "dtype": "F32"},
    })
    for t in s.tensors:
        counter = np.zeros(t.shape, dtype=np.int64)
        chunks = s.chunks(t.name)
        boxes = [b for b, _ in chunks]
        assert len(set(boxes)) == len(boxes)
        seen_ranks = set()
        for b, ranks in chunks:
            assert not b.is_empty()
            counter[tuple(slice(o, o + n) for o, n in zip(b.offsets, b.sizes))] += 1
            assert ranks == tuple(sorted(ranks))
            assert not (set(ranks) & seen_ranks)
            seen_ranks |= set(ranks)
            for r in ranks:
                assert s.box_of(t.name, r) == b
                assert s.replicas(t.name, r) == ranks
        assert (counter == 1).all(), t.name
    # c is replicated everywhere
    assert s.chunks("c") == [(B([0], [3]), tuple(range(12)))]
    # b lives on stage 1 only (ranks 6..11), 3 rows split over 4 parts
    assert {r for _, rs in s.chunks("b") for r in rs} == set(range(6, 12)) - {
        r for r in range(6, 12) if s.box_of("b", r).is_empty()}


def test_scalar_replicated():
    s = make({"pp": 2, "tp": 2}, {"s": {"shape": [], "dtype": "F32"},
                                  "t": {"shape": [], "dtype": "I64", "stage": 1}})
    for r in range(4):
        assert s.box_of("s", r) == Box((), ())
    assert s.chunks("s") == [(Box((), ()), (0, 1, 2, 3))]
    assert s.box_of("t", 0) is None and s.box_of("t", 1) is None
    assert s.box_of("t", 2) == Box((), ())
    assert s.chunks("t") == [(Box((), ()), (2, 3))]
    assert s.replicas("t", 3) == (2, 3)
    assert s.replicas("t", 0) == ()
    assert Box((), ()).volume == 1
    assert s.unique_bytes == 4 + 8


def test_no_mesh_single_rank():
    s = make({}, {"w": {"shape": [3, 2], "dtype": "F32"}})
    assert s.world_size == 1
    assert s.box_of("w", 0) == B([0, 0], [3, 2])
    assert s.chunks("w") == [(B([0, 0], [3, 2]), (0,))]


def test_explicit_boxes():
    s = make({"tp": 3}, {"w": {"shape": [5, 2], "dtype": "F32", "boxes": {
        0: {"offsets": [0, 0], "sizes": [3, 2]},
        1: {"offsets": [3, 0], "sizes": [2, 2]},
        2: {"offsets": [0, 0], "sizes": [3, 2]}}}})
    assert s.box_of("w", 1) == B([3, 0], [2, 2])
    assert s.chunks("w") == [(B([0, 0], [3, 2]), (0, 2)), (B([3, 0], [2, 2]), (1,))]
    assert s.replicas("w", 2) == (0, 2)
    # a rank not listed holds nothing
    s2 = make({"tp": 3}, {"w": {"shape": [4], "dtype": "F32", "boxes": {
        "1": {"offsets": [0], "sizes": [4]}}}})
    assert s2.box_of("w", 0) is None
    assert s2.replicas("w", 0) == ()
    assert s2.replicas("w", 1) == (1,)
    assert [t.name for t, _ in s2.rank_boxes(2)] == []


# ---------------------------------------------------------------------------------
# YAML round trip
# ---------------------------------------------------------------------------------
def _roundtrip(s: Strategy) -> tuple[str, Strategy]:
    text = strategy_to_yaml(s)
    return text, strategy_from_dict(yaml.safe_load(text), where="s.yaml")


def test_yaml_roundtrip_equal(spec_example):
    text, back = _roundtrip(spec_example)
    assert back == spec_example
    assert back.mesh.axes == (("pp", 2), ("dp", 2), ("tp", 2))
    assert yaml.safe_load(text)["format"] == FMT
    for t in spec_example.tensors:
        for r in range(8):
            assert back.box_of(t.name, r) == spec_example.box_of(t.name, r)


def test_yaml_roundtrip_keeps_mesh_order_in_text():
    s = make({"tp": 2, "dp": 3, "ep": 1}, {"w": {"shape": [4, 6], "dtype": "BF16",
                                                  "split": [["dp", "tp"], None]}})
    text, back = _roundtrip(s)
    assert text.index("tp:") < text.index("dp:") < text.index("ep:")
    assert list(yaml.safe_load(text)["mesh"]) == ["tp", "dp", "ep"]
    assert back == s
    assert back.mesh.names == ("tp", "dp", "ep")
    assert back.spec("w").split == (("dp", "tp"), ())


def test_yaml_roundtrip_all_features():
    s = make({"pp": 2, "dp": 2, "tp": 2}, {
        "a.weight": {"shape": [9, 5], "dtype": "F8_E4M3", "split": [None, "tp"], "zero": "dp",
                     "stage": 1},
        "b/c": {"shape": [], "dtype": "BOOL"},
        "d": {"shape": [0, 3], "dtype": "I16", "split": ["tp"]},
        "e": {"shape": [3], "dtype": "F64", "boxes": {
            0: {"offsets": [0], "sizes": [1]}, 5: {"offsets": [1], "sizes": [2]},
            7: {"offsets": [1], "sizes": [2]}}},
    })
    text, back = _roundtrip(s)
    assert back == s
    assert [t.name for t in back.tensors] == ["a.weight", "b/c", "d", "e"]
    # TensorSpec equality ignores explicit boxes: compare them separately
    assert dict(back.spec("e").boxes) == dict(s.spec("e").boxes)
    assert back.spec("d").split == (("tp",), ())
    for t in s.tensors:
        for r in range(8):
            assert back.box_of(t.name, r) == s.box_of(t.name, r)
        assert back.chunks(t.name) == s.chunks(t.name)


# ---------------------------------------------------------------------------------
# Validation messages, word for word
# ---------------------------------------------------------------------------------
def _err(mesh, tensors, **top) -> str:
    doc = {"format": FMT, "mesh": mesh, "tensors": tensors, **top}
    with pytest.raises(StrategyError) as e:
        strategy_from_dict(doc, where="s.yaml")
    return str(e.value)


def test_error_unknown_axis_in_split():
    assert _err({"dp": 2, "tp": 2},
                {"w": {"shape": [4, 4], "dtype": "F32", "split": ["xx", None]}}) \
        == "s.yaml: tensor 'w': unknown axis 'xx' in split[0] (mesh axes: dp, tp)"
    assert _err({"tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32", "split": [None, ["tp", "q"]]}}) \
        == "s.yaml: tensor 'w': unknown axis 'q' in split[1] (mesh axes: tp)"
    assert _err({}, {"w": {"shape": [4], "dtype": "F32", "split": ["tp"]}}) \
        == "s.yaml: tensor 'w': unknown axis 'tp' in split[0] (mesh axes: none)"


def test_error_split_longer_than_shape():
    assert _err({"dp": 2, "tp": 2}, {"w": {"shape": [4], "dtype": "F32", "split": ["tp", None]}}) \
        == "s.yaml: tensor 'w': 'split' has 2 entries but the shape has 1 dimension(s)"


def test_error_axis_used_twice():
    assert _err({"dp": 2, "tp": 2},
                {"w": {"shape": [4, 4], "dtype": "F32", "split": ["tp", "tp"]}}) \
        == "s.yaml: tensor 'w': axis 'tp' is used twice in 'split'"


def test_error_stage_without_pp():
    assert _err({"dp": 2, "tp": 2}, {"w": {"shape": [4], "dtype": "F32", "stage": 0}}) \
        == "s.yaml: tensor 'w': has 'stage: 0' but the mesh has no 'pp' axis"


def test_error_stage_out_of_range():
    assert _err({"pp": 2, "tp": 2}, {"w": {"shape": [4], "dtype": "F32", "stage": 2}}) \
        == "s.yaml: tensor 'w': stage 2 is out of range for pp=2"
    assert _err({"pp": 2}, {"w": {"shape": [4], "dtype": "F32", "stage": -1}}) \
        == "s.yaml: tensor 'w': stage -1 is out of range for pp=2"


def test_error_stage_not_an_integer():
    """YAML's ``true`` is a bool, which Python counts as the integer 1: refuse it."""
    assert _err({"pp": 2}, {"w": {"shape": [4], "dtype": "F32", "stage": True}}) \
        == "s.yaml: tensor 'w': 'stage' must be an integer (a pp coordinate), got True"
    assert _err({"pp": 2}, {"w": {"shape": [4], "dtype": "F32", "stage": "1"}}) \
        == "s.yaml: tensor 'w': 'stage' must be an integer (a pp coordinate), got '1'"


def test_error_box_with_bool_size():
    assert _err({"tp": 2}, {"w": {"shape": [2], "dtype": "F32", "boxes": {
        0: {"offsets": [0], "sizes": [True]}, 1: {"offsets": [True], "sizes": [1]}}}}) \
        == ("s.yaml: tensor 'w': box of rank 0 has a negative or non-integer offset or size: "
            "offsets [0], sizes [True]")


def test_error_unknown_dtype():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F31"}}) == (
        "s.yaml: tensor 'w': unknown dtype 'F31' (known: BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 "
        "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64)")


def test_error_negative_size_in_shape():
    assert _err({"tp": 2}, {"w": {"shape": [4, -1], "dtype": "F32"}}) \
        == "s.yaml: tensor 'w': negative size in shape [4, -1]"


def test_error_shape_not_list_of_ints():
    assert _err({"tp": 2}, {"w": {"shape": [4, "x"], "dtype": "F32"}}) \
        == "s.yaml: tensor 'w': 'shape' must be a list of integers, got [4, 'x']"


def test_error_boxes_overlap():
    assert _err({"tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32", "boxes": {
        0: {"offsets": [0, 0], "sizes": [3, 4]}, 1: {"offsets": [2, 0], "sizes": [2, 4]}}}}) \
        == ("s.yaml: tensor 'w': boxes of rank 0 [0:3, 0:4] and rank 1 [2:4, 0:4] "
            "overlap in [2:3, 0:4]")


def test_error_boxes_gap():
    assert _err({"tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32", "boxes": {
        0: {"offsets": [0, 0], "sizes": [2, 4]}, 1: {"offsets": [3, 0], "sizes": [1, 4]}}}}) \
        == "s.yaml: tensor 'w': boxes leave a gap: they cover 12 of 16 elements"


def test_error_box_outside_shape():
    assert _err({"tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32", "boxes": {
        0: {"offsets": [0, 0], "sizes": [2, 4]}, 1: {"offsets": [2, 0], "sizes": [3, 4]}}}}) \
        == "s.yaml: tensor 'w': box [2:5, 0:4] of rank 1 lies outside shape [4, 4]"


def test_error_boxes_rank_outside_mesh():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "boxes": {
        5: {"offsets": [0], "sizes": [4]}}}}) \
        == "s.yaml: tensor 'w': boxes names rank 5, outside the mesh's 2 ranks"


def test_error_boxes_with_split():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "split": ["tp"], "boxes": {
        0: {"offsets": [0], "sizes": [4]}}}}) \
        == "s.yaml: tensor 'w': 'split' cannot be combined with explicit 'boxes'"


def test_error_zero_axis_unknown():
    assert _err({"tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32", "zero": "dp"}}) \
        == "s.yaml: tensor 'w': unknown zero axis 'dp' (mesh axes: tp)"


def test_error_zero_axis_also_in_split():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "split": ["tp"], "zero": "tp"}}) \
        == "s.yaml: tensor 'w': zero axis 'tp' is also used in 'split'"


def test_error_zero_on_scalar():
    assert _err({"tp": 2}, {"w": {"shape": [], "dtype": "F32", "zero": "tp"}}) \
        == "s.yaml: tensor 'w': 'zero' needs at least one dimension; the tensor is a scalar"


def test_error_pp_both_stage_and_split():
    assert _err({"pp": 2, "tp": 2}, {"w": {"shape": [4], "dtype": "F32", "split": ["pp"],
                                          "stage": 0}}) \
        == "s.yaml: tensor 'w': the 'pp' axis cannot both place stages and split data"


def test_error_bad_format_string():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F32"}}, format="hpcckpt.strategy/2") \
        == "s.yaml: 'format' is 'hpcckpt.strategy/2', expected 'hpcckpt.strategy/1'"
    with pytest.raises(StrategyError) as e:
        strategy_from_dict({"mesh": {}, "tensors": {}}, where="s.yaml")
    assert str(e.value) == "s.yaml: 'format' is None, expected 'hpcckpt.strategy/1'"


def test_error_not_a_mapping():
    with pytest.raises(StrategyError) as e:
        strategy_from_dict([1, 2], where="s.yaml")
    assert str(e.value) == "s.yaml: expected a mapping with 'format', 'mesh' and 'tensors'"


def test_error_unknown_key():
    assert _err({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "splt": ["tp"]}}) \
        == ("s.yaml: tensor 'w': unknown key(s) splt; "
            "allowed: boxes, dtype, shape, split, stage, zero")


def test_error_bad_mesh_size():
    assert _err({"tp": 0}, {"w": {"shape": [4], "dtype": "F32"}}) \
        == "s.yaml: mesh axis 'tp' has size 0; sizes must be positive integers"


def test_read_strategy_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(f"format: {FMT}\nmesh: {{tp: 2}}\ntensors:\n  w: {{shape: [4], dtype: F31}}\n")
    with pytest.raises(StrategyError) as e:
        read_strategy_yaml(p)
    assert str(e.value).startswith(f"{p}: tensor 'w': unknown dtype 'F31'")
    q = tmp_path / "notyaml.yaml"
    q.write_text("format: [unclosed\n")
    with pytest.raises(StrategyError) as e:
        read_strategy_yaml(q)
    assert str(e.value).startswith(f"{q}: not valid YAML: ")


def test_direct_construction_matches_reader():
    s = Strategy(Mesh((("dp", 2), ("tp", 2))),
                 (TensorSpec("w", (4, 4), "F32", split=((), ("tp",)), zero="dp"),))
    assert s == make({"dp": 2, "tp": 2}, {"w": {"shape": [4, 4], "dtype": "F32",
                                                "split": [None, "tp"], "zero": "dp"}})
    assert s.spec("w").nbytes == 64
    assert math.prod(s.box_of("w", 3).sizes) == 4


def test_split_over_pp_without_stage_is_allowed():
    s = make({"pp": 2, "dp": 2}, {"w": {"shape": [4], "dtype": "F32", "split": ["pp"]}})
    assert [s.box_of("w", r) for r in range(4)] == [B([0], [2]), B([0], [2]), B([2], [2]),
                                                    B([2], [2])]


def test_error_zero_pp_with_stage():
    assert _err({"pp": 2, "dp": 2}, {"w": {"shape": [4], "dtype": "F32", "zero": "pp",
                                          "stage": 1}}) \
        == "s.yaml: tensor 'w': the 'pp' axis cannot both place stages and split data"


def test_zero_over_pp_without_stage_is_accepted_like_split_over_pp():
    s = make({"pp": 2, "dp": 2}, {"w": {"shape": [4], "dtype": "F32", "zero": "pp"}})
    assert [s.box_of("w", r) for r in range(4)] == [B([0], [2]), B([0], [2]), B([2], [2]),
                                                    B([2], [2])]


def test_strategies_with_different_explicit_boxes_are_not_equal():
    def boxes(first):
        return {0: {"offsets": [first], "sizes": [2]}, 1: {"offsets": [2 - first], "sizes": [2]}}

    a = make({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "boxes": boxes(0)}})
    b = make({"tp": 2}, {"w": {"shape": [4], "dtype": "F32", "boxes": boxes(2)}})
    assert a.box_of("w", 0) != b.box_of("w", 0)
    assert a != b


def test_yaml_roundtrip_tricky_names():
    names = ["a: b", "- x", "#c", "null", "yes", "1", "é.w", "a,b", "{x}", "[y]", "on", "0x10", ""]
    s = make({"on": 2, "null": 1}, {n: {"shape": [2], "dtype": "F32", "split": ["on"]}
                                    for n in names})
    text, back = _roundtrip(s)
    assert back == s
    assert [t.name for t in back.tensors] == names
    assert back.mesh.names == ("on", "null")
    assert strategy_to_yaml(make({}, {})) and _roundtrip(make({}, {}))[1] == make({}, {})
