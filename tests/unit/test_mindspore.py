"""MindSpore interoperability against files MindSpore 2.10 made (tests/golden/mindspore/,
written by make_golden.py there; MindSpore is not needed to run these tests).

Strategy files (protobuf, JSON, per stage, merged), MindSpore-written distributed
checkpoints, ``unified_safetensors`` and ``load_distributed_checkpoint`` outputs,
``.ckpt`` -> safetensors as ``ms.ckpt_to_safetensors`` makes it, Keras HDF5 files.
Outputs are compared byte for byte; errors word for word.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save

import hpcckpt
from hpcckpt.errors import HpcckptError, StrategyError
from hpcckpt.layout.box import Box
from hpcckpt.layout.mindspore import (MsLayout, merge_stage_files, read_ms_strategy,
                                      read_stage_file, strategy_to_ms)
from hpcckpt.layout.yaml_io import strategy_to_yaml
from hpcckpt.ms_proto import checkpoint_file_proto, message_class, strategy_file_proto
from hpcckpt.ops.convert import convert
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.storage.legacy import read_ckpt

from helpers import run_cli

G = Path(__file__).resolve().parents[1] / "golden" / "mindspore"
FAST = CopyOptions(fsync=False, progress=False)
FULL4 = dict(np.load(G / "full_step4.npz"))
FULL2 = dict(np.load(G / "full_step2.npz"))

EXPECTED_YAML = """\
format: hpcckpt.strategy/1
mesh:
  pp: 2
  d0: 2
  d1: 2
tensors:
  model.embed.weight: {shape: [8, 4], dtype: F32, split: [d1, null], stage: 0, zero: d0}
  model.layers.0.attn.w: {shape: [4, 6], dtype: F16, split: [null, d1], stage: 0}
  model.layers.0.norm.weight: {shape: [4], dtype: F32, stage: 0, zero: d1}
  model.layers.0.mlp.w: {shape: [8, 4], dtype: F32, split: [[d0, d1], null], stage: 0}
  model.layers.1.w: {shape: [4, 4], dtype: F32, split: [d0, d1], stage: 1}
  model.layers.1.bias: {shape: [6], dtype: F64, stage: 1}
  lm_head.weight: {shape: [8, 4], dtype: F32, split: [d1, null], stage: 1, zero: d0}
"""


def test_schemas_are_mindspores_own():
    """The descriptors built in Python serialize to MindSpore's compiled ones."""
    assert strategy_file_proto().SerializeToString() == (G / "node_strategy.descriptor.bin").read_bytes()
    assert checkpoint_file_proto().SerializeToString() == (G / "checkpoint.descriptor.bin").read_bytes()


@pytest.mark.parametrize("kind,ext", [("pb", "ckpt"), ("json", "json")])
def test_strategy_merge_is_byte_identical_to_mindspores(tmp_path, kind, ext):
    out = tmp_path / f"merged.{ext}"
    files = merge_stage_files(G / f"strategy_{kind}", out)
    assert [f.stage for f in files] == [0, 1]
    assert out.read_bytes() == (G / f"merged_strategy.{ext}").read_bytes()


@pytest.mark.parametrize("src", ["merged_strategy.ckpt", "strategy_pb"])
def test_strategy_from_protobuf_file_or_directory(src):
    s = hpcckpt.load_strategy(G / src, shapes_from=G / "dist")
    assert strategy_to_yaml(s) == EXPECTED_YAML


def test_json_strategy_and_shapes_from_unified():
    s = hpcckpt.load_strategy(G / "merged_strategy.json", shapes_from=G / "unified")
    # the JSON stage files split model.layers.0.mlp.w over d0 only (JSON has no
    # per-dimension axis lists); everything else as the protobuf files
    want = EXPECTED_YAML.replace("split: [[d0, d1], null], stage: 0",
                                 "split: [d0, null], stage: 0")
    assert {t.name: t for t in s.tensors} == {
        t.name: t for t in hpcckpt.strategy_from_dict(__import__("yaml").safe_load(want)).tensors}


def test_strategy_describes_mindspores_rank_files():
    """Every rank's stored slice is the strategy's box of MindSpore's global tensor."""
    ms = read_ms_strategy(G / "merged_strategy.ckpt")
    s = hpcckpt.load_strategy(G / "merged_strategy.ckpt", shapes_from=G / "dist")
    for r in range(8):
        f = G / "dist" / f"rank_{r}" / f"llama_rank_{r}-1_4.safetensors"
        got = load_file(f)
        held = {t.name for t, _ in s.rank_boxes(r)}
        assert set(got) - {"global_step"} == held
        for name in held:
            box = s.box_of(name, r)
            assert box == ms.layouts_of_rank(r)[name].local_box(s.spec(name).shape, r % 4)
            sl = tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))
            assert got[name].tobytes() == FULL4[name][sl].tobytes(), (r, name)


def test_merge_of_mindspore_written_checkpoint_equals_unified_safetensors(tmp_path):
    s = hpcckpt.load_strategy(G / "strategy_pb", shapes_from=G / "dist")
    hpcckpt.merge(str(G / "dist"), str(tmp_path / "hf"), strategy=s, options=FAST)
    got, want = load_file(tmp_path / "hf" / "model.safetensors"), load_file(G / "unified" / "part0.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    # --file-suffix picks the older step, as MindSpore's unified_safetensors would
    hpcckpt.merge(str(G / "dist"), str(tmp_path / "step2"), strategy=s, file_suffix="1_2",
                  options=FAST)
    got = load_file(tmp_path / "step2" / "model.safetensors")
    assert all(got[k].tobytes() == FULL2[k].tobytes() for k in FULL2)


def test_split_equals_load_distributed_checkpoint(tmp_path):
    """MindSpore's load_distributed_checkpoint (save mode) split unified/ for a predict
    strategy; hpcckpt split of the same weights under that strategy stores the same bytes."""
    s = hpcckpt.load_strategy(G / "predict_strategy.ckpt", shapes_from=G / "unified")
    hpcckpt.split(str(G / "unified"), str(tmp_path / "d"), s, options=FAST)
    for r in range(4):
        want = load_file(G / "ldc" / f"rank_{r}" / "net.safetensors")
        got = load_file(next((tmp_path / "d" / f"rank_{r}").glob("*.safetensors")))
        assert set(want) - {"global_step"} == set(got)
        for k in got:
            assert got[k].tobytes() == want[k].tobytes(), (r, k)


def test_yaml_to_mindspore_and_back(tmp_path):
    s = hpcckpt.load_strategy(G / "merged_strategy.ckpt", shapes_from=G / "dist")
    (tmp_path / "s.ckpt").write_bytes(strategy_to_ms(s))
    back = hpcckpt.load_strategy(tmp_path / "s.ckpt", shapes_from=G / "dist")
    assert strategy_to_yaml(back) == EXPECTED_YAML
    f = read_stage_file(tmp_path / "s.ckpt")
    assert f.current_stage == 1 and f.stage == 0
    assert dict(f.layouts)["0-model.layers.0.mlp.w"] == MsLayout((2, 2), ((1, 0), ()))
    with pytest.raises(StrategyError) as e:
        strategy_to_ms(s, "json")
    assert str(e.value) == ("tensor 'model.layers.0.mlp.w': splits one dimension over several "
                            "axes, which MindSpore's JSON strategy cannot express; write protobuf")


# ---- .ckpt -> safetensors ------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "crc", "split"])
def test_convert_ckpt_is_byte_identical_to_ckpt_to_safetensors(tmp_path, name):
    convert(str(G / "ckpt" / f"{name}.ckpt"), str(tmp_path / "o"), options=FAST)
    assert (tmp_path / "o" / f"{name}.safetensors").read_bytes() == \
        (G / "ckpt_out" / f"{name}.safetensors").read_bytes()


def test_split_value_is_rejoined_in_order():
    t = {x.name: x for x in read_ckpt(str(G / "ckpt" / "split.ckpt"))}
    assert len(t["big"].pieces) == 3 and t["big"].shape == (12, 64)
    assert sum(n for _, n in t["big"].pieces) == 12 * 64 * 4


def test_convert_rank_directory_under_three_ranks(tmp_path):
    r = run_cli(["convert", G / "ckpt" / "ranks", tmp_path / "o", "--json"], n=3)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["files"] == 2
    for k in (0, 1):
        rel = Path(f"rank_{k}") / "step-1_2.safetensors"
        assert (tmp_path / "o" / rel).read_bytes() == (G / "ckpt_out" / "ranks" / rel).read_bytes()


def _fail_convert(src, out) -> str:
    with pytest.raises(HpcckptError) as e:
        convert(str(src), str(out), options=FAST)
    assert not any(Path(out).rglob("*.safetensors*")), "nothing half-written may remain"
    return str(e.value)


def test_convert_refuses_encrypted_corrupt_and_truncated(tmp_path):
    enc = G / "ckpt" / "encrypted.ckpt"
    assert _fail_convert(enc, tmp_path / "a") == (
        f"{enc}: encrypted MindSpore checkpoint (AES-GCM, AES-CBC or SM4-CBC); decrypt it with "
        "MindSpore first (ms.load_checkpoint(path, dec_key=...) then ms.save_checkpoint)")
    data = bytearray((G / "ckpt" / "crc.ckpt").read_bytes())
    data[40] ^= 0x01
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data)
    crc = int.from_bytes(data[-10:], "big")
    import zlib
    got = zlib.crc32(bytes(data[:-17]))
    assert _fail_convert(bad, tmp_path / "b") == (
        f"{bad}: CRC mismatch: the trailer says {crc:#010x}, bytes 0-{len(data) - 17} give "
        f"{got:#010x} (the file is damaged)")
    plain = (G / "ckpt" / "plain.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(plain[:100])
    assert _fail_convert(cut, tmp_path / "c").startswith(f"{cut}: field 1 of ")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x12" + b"\xff" * 63)
    assert _fail_convert(junk, tmp_path / "d") == (
        f"{junk}: truncated or malformed length of field 2 in Checkpoint at byte 1")


def test_convert_refuses_string_and_maptensor_values(tmp_path):
    C = message_class("Checkpoint")
    c = C()
    v = c.value.add()
    v.tag = "name"
    v.tensor.tensor_type = "str"
    v.tensor.tensor_content = b"hello"
    p = tmp_path / "s.ckpt"
    p.write_bytes(c.SerializeToString())
    assert _fail_convert(p, tmp_path / "o") == (
        f"{p}: tensor 'name' holds a string, which safetensors cannot store (types: Int8 UInt8 "
        "Int16 UInt16 Int32 UInt32 Int64 UInt64 Float16 Float32 Float64 Bool BFloat16)")
    c = C()
    v = c.value.add()
    v.tag = "x"
    v.tensor.dims.extend([3])
    v.tensor.tensor_type = "Float32"
    v.tensor.tensor_content = b"\0" * 8
    p.write_bytes(c.SerializeToString())
    assert _fail_convert(p, tmp_path / "o2") == (
        f"{p}: tensor 'x' is F32 [3] (12 bytes) but its content holds 8 bytes")


# ---- HDF5 -> safetensors ----------------------------------------------------------------
H5 = {"keras_legacy.h5": ("tf", lambda n: n.split("/", 1)[1]),
      "tf_model.h5": ("tf", lambda n: n.split("/", 1)[1][:-2]),
      "model.weights.h5": ("keras", lambda n: n)}


@pytest.mark.parametrize("src", sorted(H5))
def test_convert_hdf5_equals_safetensors_library_output(tmp_path, src):
    """Expected bytes: the safetensors library saving the arrays h5py read (names: Keras
    legacy weight names without ':0', Keras 3 HDF5 paths)."""
    fmt, rename = H5[src]
    arrays = dict(np.load(G / "h5_out" / f"{src}.npz"))
    want = save({rename(k): v for k, v in arrays.items()}, metadata={"format": fmt})
    convert(str(G / "h5" / src), str(tmp_path / "o"), options=CopyOptions(
        fsync=False, progress=False, buffer_size=8))
    stem = src[: -len(".h5")]
    assert (tmp_path / "o" / f"{stem}.safetensors").read_bytes() == want


def test_hdf5_hostile_names(tmp_path):
    import h5py
    p = tmp_path / "evil.h5"
    with h5py.File(p, "w") as f:
        f.attrs["layer_names"] = [b"l"]
        g = f.create_group("l")
        g.attrs["weight_names"] = [b"/other:0"]
        f.create_dataset("other:0", data=np.zeros(2, np.float32))
    assert _fail_convert(p, tmp_path / "o") == (
        f"{p}: layer 'l' lists weight '/other:0', which is not a dataset inside /l")
    with h5py.File(p, "w") as f:
        f.create_dataset("__metadata__", data=np.zeros(2, np.float32))
    assert _fail_convert(p, tmp_path / "o2") == (
        f"{p}: dataset /__metadata__ would be named '__metadata__', which safetensors reserves "
        "or forbids")
    with h5py.File(p, "w") as f:
        f.create_dataset("s", data=np.array([b"ab"], dtype="S2"))
    assert _fail_convert(p, tmp_path / "o3") == (
        f"{p}: dataset /s has type |S2, which safetensors cannot store")


# ---- hostile strategy files -----------------------------------------------------------
def _strategy_error(path) -> str:
    with pytest.raises(HpcckptError) as e:
        hpcckpt.load_strategy(path, shapes_from=G / "dist")
    return str(e.value)


def test_hostile_strategy_files(tmp_path):
    raw = (G / "merged_strategy.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(raw[: len(raw) // 2])
    assert _strategy_error(cut).startswith(
        f"{cut}: not a MindSpore protobuf strategy file (ParallelStrategyMap): ")
    # one stage alone, a stage missing, a stage described twice differently, mixed kinds
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(G / "strategy_pb" / "ckpt_strategy_rank_4.ckpt", d)
    assert _strategy_error(d / "ckpt_strategy_rank_4.ckpt") == (
        f"{d / 'ckpt_strategy_rank_4.ckpt'}: describes pipeline stage 1 only; give the directory "
        "of every stage's file, or the merged file")
    assert _strategy_error(d) == "pipeline stage 0 has no strategy file (found stages 1)"
    m = message_class("ParallelStrategyMap")()
    m.ParseFromString((G / "strategy_pb" / "ckpt_strategy_rank_4.ckpt").read_bytes())
    next(i for i in m.parallel_layout_item
         if i.param_name == "lm_head.weight").parallel_layouts.opt_weight_shard_size = 0
    (d / "ckpt_strategy_rank_5.ckpt").write_bytes(m.SerializeToString())
    shutil.copy(G / "strategy_pb" / "ckpt_strategy_rank_0.ckpt", d)
    assert _strategy_error(d) == (f"stage 1 is described twice, differently: "
                                  f"{d / 'ckpt_strategy_rank_4.ckpt'} and "
                                  f"{d / 'ckpt_strategy_rank_5.ckpt'}")
    (d / "ckpt_strategy_rank_5.ckpt").unlink()
    shutil.copy(G / "strategy_json" / "ckpt_strategy_rank_4.json", d)
    assert _strategy_error(d) == (f"{d}: mixes .ckpt (ckpt_strategy_rank_0.ckpt) and .json "
                                  "(ckpt_strategy_rank_4.json) strategy files; keep one kind")


@pytest.mark.parametrize("edit,message", [
    (lambda pl: setattr(pl, "field", 2), "field split (field=2) is not supported"),
    (lambda pl: pl.param_split_shape[0].dim.extend([4, 4]),
     "irregular split (param_split_shape [4, 4], indices_offset []) is not supported; merge it "
     "with MindSpore first"),
    (lambda pl: pl.tensor_map[0].dim.append(-1), "tensor_map has 3 entries but the tensor has "
     "shape [8, 4]"),
    (lambda pl: setattr(pl, "opt_weight_shard_step", 1),   # found while reading the file
     "0-model.embed.weight': optimizer sharding (opt_weight_shard_size 2, step 1): "
     "opt_weight_shard_step 1 is not the model parallel size 2"),
])
def test_irregular_layouts_refused(tmp_path, edit, message):
    m = message_class("ParallelStrategyMap")()
    m.ParseFromString((G / "merged_strategy.ckpt").read_bytes())
    item = next(i for i in m.parallel_layout_item if i.param_name == "0-model.embed.weight")
    edit(item.parallel_layouts)
    p = tmp_path / "s.ckpt"
    p.write_bytes(m.SerializeToString())
    name = "" if message.startswith("0-") else "model.embed.weight': "
    assert _strategy_error(p) == f"{p}: parameter '{name}{message}"


def test_tensor_map_axis_out_of_range(tmp_path):
    doc = json.loads((G / "merged_strategy.json").read_text())
    doc["parallel_layout_item"]["0-model.embed.weight"]["tensor_map"] = [2, -1]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(doc))
    assert _strategy_error(p) == (f"{p}: parameter '0-model.embed.weight': tensor_map[0] names "
                                  "device axis 2, but dev_matrix [2, 2] has 2 axes")


def test_layout_needing_explicit_boxes():
    """dev_matrix [2, 2, 2], dim 0 split by the innermost axis, an optimizer group of 4
    over both outer axes (MindSpore's helper path): two group segments, which one
    ``zero`` axis cannot say, so the tensor gets explicit boxes by MindSpore's rules,
    while a plain layout of the same strategy stays on the grid."""
    from hpcckpt.layout.mindspore import MsStrategy
    lay = MsLayout((2, 2, 2), ((0,), ()), opt_shard_step=2, opt_shard_size=4)
    assert lay.opt_groups() == ((4, 2), (2, 2))
    rows = [lay.local_box((8, 2), r).offsets[0] for r in range(8)]
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7]
    ms = MsStrategy("x", ({"w": lay, "v": MsLayout((2, 2, 2), ((2,), (0,)))},))
    s = ms.bind({"w": ((8, 2), "F32"), "v": ((4, 6), "F16")})
    assert s.mesh.to_dict() == {"d0": 2, "d1": 2, "d2": 2}
    assert s.spec("w").boxes == {r: Box((rows[r], 0), (1, 2)) for r in range(8)}
    assert s.spec("v").split == (("d0",), ("d2",))
    assert all(s.box_of("v", r) == MsLayout((2, 2, 2), ((2,), (0,))).local_box((4, 6), r)
               for r in range(8))


def test_cli_strategy_merge_and_convert(tmp_path):
    r = run_cli(["strategy", "merge", G / "strategy_pb", tmp_path / "m.ckpt"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"strategy merge: 2 stage(s) -> {tmp_path / 'm.ckpt'} (7 parameter layouts)\n"
    r = run_cli(["strategy", "convert", tmp_path / "m.ckpt", tmp_path / "s.yaml"])
    assert r.returncode == 1
    assert r.stderr == (f"hpcckpt strategy: error: rank 0: {tmp_path / 'm.ckpt'}: a MindSpore "
                        "strategy has no tensor shapes; this command needs a checkpoint to take "
                        "them from\n")
    r = run_cli(["strategy", "convert", tmp_path / "m.ckpt", tmp_path / "s.yaml",
                 "--shapes-from", G / "dist"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.yaml").read_text() == EXPECTED_YAML


def test_hdf5_scalars_empty_big_endian_and_tiles(tmp_path):
    """Scalars, zero-size datasets, big-endian storage, booleans and a tensor read in
    one-element tiles (buffer 1 byte) come out as the safetensors library writes them."""
    import h5py
    rng = np.random.default_rng(3)
    arrays = {"a/scalar": np.array(2.5, np.float64), "a/empty": np.zeros((0, 3), np.float32),
              "b/big_endian": rng.standard_normal((3, 5)).astype(">f4"),
              "b/mask": np.array([True, False, True]), "c/i16": np.arange(7, dtype=np.int16)}
    p = tmp_path / "m.h5"
    with h5py.File(p, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    convert(str(p), str(tmp_path / "o"), options=CopyOptions(fsync=False, progress=False,
                                                             buffer_size=1))
    want = save({k: v.astype(v.dtype.newbyteorder("<")) for k, v in arrays.items()},
                metadata={"format": "keras"})
    assert (tmp_path / "o" / "m.safetensors").read_bytes() == want


def _same_safetensors(a: bytes, b: bytes) -> None:
    """Byte for byte, except the order of ``__metadata__`` keys: the safetensors library
    keeps metadata in a Rust HashMap, so MindSpore's own runs order it either way."""
    n = struct.unpack("<Q", a[:8])[0]
    assert n == struct.unpack("<Q", b[:8])[0] and a[8 + n:] == b[8 + n:]
    ha, hb = json.loads(a[8:8 + n]), json.loads(b[8:8 + n])
    assert list(ha) == list(hb) and ha == hb


def test_merge_layout_ms_writes_what_unified_safetensors_writes(tmp_path):
    out = tmp_path / "u"
    s = hpcckpt.load_strategy(G / "merged_strategy.ckpt", shapes_from=G / "dist")
    r = hpcckpt.merge(str(G / "dist"), str(out), strategy=s, layout="ms", options=FAST)
    assert r.extra["shards"] == ["part0.safetensors"]
    for f in ("param_name_map.json", "hyper_param.safetensors"):
        assert (out / f).read_bytes() == (G / "unified" / f).read_bytes(), f
    _same_safetensors((out / "part0.safetensors").read_bytes(),
                      (G / "unified" / "part0.safetensors").read_bytes())
    # parts of at most 200 bytes: MindSpore's count (ceil(560 / 200) = 3) and its
    # largest-first filling, ties in the order rank files are met
    r = hpcckpt.merge(str(G / "dist"), str(tmp_path / "u3"), strategy=s, layout="ms",
                      max_shard_size=200, options=FAST)
    doc = json.loads((tmp_path / "u3" / "param_name_map.json").read_text())
    assert doc["weight_map"] == {
        "model.embed.weight": "part0.safetensors", "model.layers.0.mlp.w": "part1.safetensors",
        "lm_head.weight": "part2.safetensors", "model.layers.1.w": "part0.safetensors",
        "model.layers.0.attn.w": "part1.safetensors", "model.layers.1.bias": "part2.safetensors",
        "model.layers.0.norm.weight": "part1.safetensors"}


@pytest.mark.parametrize("flat", [False, True])
def test_unified_layout_is_read_with_both_name_maps(tmp_path, flat):
    d = tmp_path / "u"
    shutil.copytree(G / "unified", d)
    if flat:   # the older MindSpore name map: {name: file}
        doc = json.loads((d / "param_name_map.json").read_text())["weight_map"]
        (d / "param_name_map.json").chmod(0o644)
        (d / "param_name_map.json").write_text(json.dumps(doc))
    from hpcckpt.storage.inputs import open_input   # what split, load and inspect read with
    inp = open_input(d)
    assert sorted(inp.source.tensors) == sorted(FULL4)
    assert "global_step" not in inp.source.tensors


def test_cli_reshard_mindspore_written_equals_load_distributed_checkpoint(tmp_path):
    """Both layouts MindSpore files: the destination takes its shapes from the source
    strategy (the rank files hold the source layout's slices)."""
    r = run_cli(["reshard", G / "dist", tmp_path / "o", "--strategy", G / "predict_strategy.ckpt",
                 "--src-strategy", G / "strategy_pb", "--no-fsync"], n=3)
    assert r.returncode == 0, r.stderr
    for k in range(4):
        want = load_file(G / "ldc" / f"rank_{k}" / "net.safetensors")
        got = load_file(next((tmp_path / "o" / f"rank_{k}").glob("*.safetensors")))
        assert {n: v.tobytes() for n, v in got.items()} == \
            {n: v.tobytes() for n, v in want.items() if n != "global_step"}
    r = run_cli(["reshard", G / "dist", tmp_path / "o2", "--strategy", G / "predict_strategy.ckpt"])
    assert r.returncode == 1
    assert r.stderr == (f"hpcckpt reshard: error: rank 0: {G / 'dist'}: distributed checkpoint has "
                        "no manifest.json (an unfinished write, or written by another tool); pass "
                        "--strategy to read it\n")
