"""Make the MindSpore golden files that tests/unit/test_mindspore_golden.py compares with.

Run by hand, in a venv OUTSIDE the repo that has MindSpore 2.10 (CI never runs this;
it only reads the committed files):

    python3 -m venv /work/msvenv
    /work/msvenv/bin/pip install mindspore==2.10.0 'numpy<2' h5py keras torch 'ml-dtypes==0.4.1'
    /work/msvenv/bin/python tests/golden/mindspore/make_golden.py

Everything is rewritten in tests/golden/mindspore/ (a few KiB). What MindSpore made
and what this script built itself:

* ``*.descriptor.bin``: MindSpore's own compiled ``node_strategy.proto`` and
  ``checkpoint.proto`` descriptors (from its ``*_pb2.py``).
* ``strategy_pb/`` and ``strategy_json/``: per-stage strategy files, two pipeline stages
  of 4 devices (dev_matrix [2, 2]), optimizer sharding. MindSpore's CPU wheel refuses to
  compile a parallel graph ("only support Ascend/GPU backend"), so the stage files are
  built here the way its C++ writer (strategy_checkpoint_info.cc ``to_protobuf`` /
  ``to_json``) fills them, with MindSpore's own ``node_strategy_pb2`` classes.
* ``merged_strategy.ckpt`` / ``merged_strategy.json``: MindSpore's
  ``_merge_protobuf_strategy`` / ``_merge_json_strategy`` (what ``merge_pipeline_strategys``
  calls) on the stage files in stage order (``merge_pipeline_strategys`` itself takes
  them in ``glob`` order, which the filesystem decides).
* ``dist/rank_<r>/llama_rank_<r>-1_{2,4}.safetensors``: a distributed checkpoint as
  MindSpore training writes it (``ms.save_checkpoint(..., format="safetensors",
  remove_redundancy=False)``), two steps, with ``global_step`` beside the weights.
* ``unified/``: ``ms.parallel.unified_safetensors(dist, merged_strategy.ckpt, unified)``.
* ``predict_strategy.ckpt``: a one-stage inference layout (built like the stage files),
  and ``ldc/rank_<r>/net.safetensors``: ``load_distributed_checkpoint(None, format=
  "safetensors", unified_safetensors_dir=unified, predict_strategy=predict_strategy.ckpt,
  dst_safetensors_dir=ldc)``: MindSpore splitting the merged weights for it (its save
  mode refuses a pipeline strategy: "Rank 2 is not in the current stage").
* ``ckpt/``: ``.ckpt`` files from ``ms.save_checkpoint``: ``plain.ckpt``, ``crc.ckpt``
  (``crc_check=True``), ``split.ckpt`` (a value split in three: MindSpore splits values
  over ``SLICE_SIZE`` = 512 MiB; this script sets ``serialization.SLICE_SIZE = 1`` KiB for
  the call), ``encrypted.ckpt`` (AES-GCM) and ``ranks/rank_<r>/step-1_2.ckpt``; and
  ``ckpt_out/``: ``ms.ckpt_to_safetensors`` of each.
* ``h5/``: ``keras_legacy.h5`` (Keras's ``legacy_h5_format.save_weights_to_hdf5_group``)
  and ``model.weights.h5`` (Keras 3 ``model.save_weights``), torch backend; a Hugging
  Face style ``tf_model.h5`` with split ``weight_names`` attributes built with h5py in
  Keras's legacy layout; and ``h5_out/``: the expected safetensors, written by the
  ``safetensors`` library from arrays h5py read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")   # before keras is imported
HERE = Path(__file__).resolve().parent
D = 4           # devices per stage: dev_matrix [2, 2] = (dp, mp)
STAGES = 2

# name: (global shape, numpy dtype, tensor_map, opt (step, size), stage)
PARAMS = {
    "model.embed.weight": ((8, 4), np.float32, [0, -1], (2, 2), 0),
    "model.layers.0.attn.w": ((4, 6), np.float16, [-1, 0], (0, 0), 0),
    "model.layers.0.norm.weight": ((4,), np.float32, [-1], (1, 2), 0),
    "model.layers.0.mlp.w": ((8, 4), np.float32, [[1, 0], -1], (0, 0), 0),
    "model.layers.1.w": ((4, 4), np.float32, [1, 0], (0, 0), 1),
    "model.layers.1.bias": ((6,), np.float64, [-1], (0, 0), 1),
    "lm_head.weight": ((8, 4), np.float32, [0, -1], (2, 2), 1),
}


def global_arrays(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {n: (rng.standard_normal(shape) * 100).astype(dt)
            for n, (shape, dt, *_ ) in PARAMS.items()}


def local_slice(arr, tmap, opt, local_rank):
    """MindSpore's slice for a local rank of dev_matrix [2, 2] (what training holds)."""
    dev = [2, 2]
    coords = [local_rank // 2, local_rank % 2]
    idx = []
    for dim, ks in enumerate(tmap):
        ks = ks if isinstance(ks, list) else [ks]
        ks = [k for k in ks if k != -1]
        parts, index = 1, 0
        for k in ks:
            i = len(dev) - 1 - k
            parts *= dev[i]
            index = index * dev[i] + coords[i]
        n = arr.shape[dim] // parts
        idx.append(slice(index * n, (index + 1) * n))
    out = arr[tuple(idx)]
    step, size = opt
    if size:
        o = (local_rank // step) % size
        n = out.shape[0] // size
        out = out[o * n:(o + 1) * n]
    return np.ascontiguousarray(out)


def write_stage_files(ms):
    from mindspore.train import node_strategy_pb2 as pb
    (HERE / "strategy_pb").mkdir()
    (HERE / "strategy_json").mkdir()
    for s in range(STAGES):
        m = pb.ParallelStrategyMap()
        m.current_stage = s
        item = m.parallel_strategy_item.add()
        item.node_name = f"Default/network-Net/MatMul-op{s}"
        item.parallel_strategys.stage = s
        st = item.parallel_strategys.parallel_strategy.add()
        st.dim.extend([2, 1])
        js = {"current_stage": s, "parallel_layout_item": {},
              "parallel_strategy_item": {item.node_name: {"parallel_strategy": [[2, 1]],
                                                          "stage": s}}}
        for name, (shape, _, tmap, (step, size), stage) in PARAMS.items():
            if stage != s:
                continue
            li = m.parallel_layout_item.add()
            li.param_name = name
            pl = li.parallel_layouts
            pl.dev_matrix.add().dim.extend([2, 2])
            if any(isinstance(k, list) for k in tmap):   # one TensorMap per dimension
                for k in tmap:
                    pl.tensor_map.add().dim.extend(k if isinstance(k, list) else [k])
            else:
                pl.tensor_map.add().dim.extend(tmap)
            pl.param_split_shape.add()
            pl.indices_offset.add()
            pl.field = 0
            pl.opt_weight_shard_step = step
            pl.opt_weight_shard_size = size
            js["parallel_layout_item"][name] = {
                "dev_matrix": [2, 2], "field": 0, "opt_weight_shard_size": size,
                "opt_weight_shard_step": step,
                # the JSON writer has no per-dimension lists: the two-axis split of
                # model.layers.0.mlp.w is written over dp only here
                "tensor_map": [k if not isinstance(k, list) else k[0] for k in tmap],
                "tensor_shape": list(shape)}
        rank = s * D
        (HERE / "strategy_pb" / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(m.SerializeToString())
        # nlohmann::json orders keys (std::map); dump() has no spaces
        (HERE / "strategy_json" / f"ckpt_strategy_rank_{rank}.json").write_text(
            json.dumps(js, sort_keys=True, separators=(",", ":")))
    # a second rank of stage 0 saves the same bytes (MindSpore writes one file per rank)
    shutil.copy(HERE / "strategy_pb" / "ckpt_strategy_rank_0.ckpt",
                HERE / "strategy_pb" / "ckpt_strategy_rank_1.ckpt")
    from mindspore.parallel._parallel_serialization import (_merge_json_strategy,
                                                             _merge_protobuf_strategy)
    order = lambda d, ext: sorted(d.glob(f"*.{ext}"),   # noqa: E731 - stage order
                                  key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    _merge_protobuf_strategy([str(p) for p in order(HERE / "strategy_pb", "ckpt")],
                             str(HERE / "merged_strategy.ckpt"))
    _merge_json_strategy([str(p) for p in order(HERE / "strategy_json", "json")],
                         str(HERE / "merged_strategy.json"))


def write_dist(ms):
    from mindspore import Parameter, Tensor
    for step in (2, 4):
        full = global_arrays(step)
        for r in range(STAGES * D):
            s, local = divmod(r, D)
            params = [{"name": n, "data": Parameter(Tensor(local_slice(full[n], tmap, opt, local)),
                                                    name=n)}
                      for n, (_, _, tmap, opt, stage) in PARAMS.items() if stage == s]
            params.append({"name": "global_step", "data": Tensor(np.array([step], np.int32))})
            d = HERE / "dist" / f"rank_{r}"
            d.mkdir(parents=True, exist_ok=True)
            ms.save_checkpoint(params, str(d / f"llama_rank_{r}-1_{step}.safetensors"),
                               format="safetensors", remove_redundancy=False)
            os.chmod(d / f"llama_rank_{r}-1_{step}.safetensors", 0o644)
        np.savez(HERE / f"full_step{step}.npz", **full)


# the inference layout load_distributed_checkpoint splits the merged weights into: one
# stage of 4 devices, no optimizer sharding
PREDICT = {"model.embed.weight": [1, -1], "model.layers.0.attn.w": [[1, 0], -1],
           "model.layers.0.norm.weight": [0], "model.layers.0.mlp.w": [0, 1],
           "model.layers.1.w": [-1, -1], "model.layers.1.bias": [-1],
           "lm_head.weight": [[1, 0], -1]}


def write_predict_strategy():
    from mindspore.train import node_strategy_pb2 as pb
    m = pb.ParallelStrategyMap()
    m.current_stage = 0
    item = m.parallel_strategy_item.add()
    item.node_name = "Default/network-Net/MatMul-op0"
    item.parallel_strategys.stage = 0
    for name, tmap in PREDICT.items():
        li = m.parallel_layout_item.add()
        li.param_name = name
        pl = li.parallel_layouts
        pl.dev_matrix.add().dim.extend([2, 2])
        if any(isinstance(k, list) for k in tmap):
            for k in tmap:
                pl.tensor_map.add().dim.extend(k if isinstance(k, list) else [k])
            if len(tmap) == 1:
                pl.tensor_map.add()
        else:
            pl.tensor_map.add().dim.extend(tmap)
        pl.param_split_shape.add()
        pl.indices_offset.add()
        pl.field = pl.opt_weight_shard_step = pl.opt_weight_shard_size = 0
    (HERE / "predict_strategy.ckpt").write_bytes(m.SerializeToString())


def write_unified(ms):
    from mindspore.parallel import unified_safetensors
    from mindspore.parallel.checkpoint_transform import load_distributed_checkpoint
    unified_safetensors(str(HERE / "dist"), str(HERE / "merged_strategy.ckpt"),
                        str(HERE / "unified"), max_process_num=1)
    load_distributed_checkpoint(None, format="safetensors",
                                unified_safetensors_dir=str(HERE / "unified"),
                                predict_strategy=str(HERE / "predict_strategy.ckpt"),
                                dst_safetensors_dir=str(HERE / "ldc"), max_process_num=1)


def write_ckpt(ms):
    from mindspore import Parameter, Tensor
    import mindspore.train.serialization as ser
    out = HERE / "ckpt"
    out.mkdir()
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((6, 4)).astype(np.float32),
              "b": np.arange(5, dtype=np.int64),
              "flag": np.array([True, False, True]),
              "h": rng.standard_normal((3, 2)).astype(np.float16),
              "bf": Tensor(rng.standard_normal((2, 3)).astype(np.float32), ms.bfloat16),
              "scalar": np.array(3.5, np.float64)}

    def plist(d):
        return [{"name": k, "data": Parameter(v if isinstance(v, Tensor) else Tensor(v), name=k)}
                for k, v in d.items()]

    ms.save_checkpoint(plist(params), str(out / "plain.ckpt"))
    ms.save_checkpoint(plist(params), str(out / "crc.ckpt"), crc_check=True)
    big = {"big": rng.standard_normal((12, 64)).astype(np.float32), "b": params["b"]}
    old = ser.SLICE_SIZE
    ser.SLICE_SIZE = 1   # KiB: the 3 KiB value is written as 3 values with one tag
    try:
        ms.save_checkpoint(plist(big), str(out / "split.ckpt"))
    finally:
        ser.SLICE_SIZE = old
    ms.save_checkpoint(plist({"w": params["w"]}), str(out / "encrypted.ckpt"),
                       enc_key=b"0123456789abcdef", enc_mode="AES-GCM")
    for r in range(2):
        d = out / "ranks" / f"rank_{r}"
        d.mkdir(parents=True)
        ms.save_checkpoint(plist({"w": params["w"][r * 3:(r + 1) * 3], "b": params["b"]}),
                           str(d / "step-1_2.ckpt"))
    for p in out.rglob("*.ckpt"):
        os.chmod(p, 0o644)
    conv = HERE / "ckpt_out"
    for name in ("plain", "crc", "split"):
        ms.ckpt_to_safetensors(str(out / f"{name}.ckpt"), str(conv))
    ms.ckpt_to_safetensors(str(out / "ranks"), str(conv / "ranks"))
    for p in conv.rglob("*.safetensors"):
        os.chmod(p, 0o644)


def write_h5():
    import h5py
    from safetensors.numpy import save_file
    h5 = HERE / "h5"
    h5.mkdir()
    out = HERE / "h5_out"
    out.mkdir()
    import keras
    from keras.src.legacy.saving import legacy_h5_format
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="dense"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(2, name="out")])
    with h5py.File(h5 / "keras_legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    model.save_weights(str(h5 / "model.weights.h5"))
    # Hugging Face tf_model.h5 style: one top layer, weight names "layer/.../name:0",
    # and the weight_names attribute split in two (Keras splits attributes over 64 KiB
    # into weight_names0, weight_names1, ...; forced here on a small file)
    rng = np.random.default_rng(1)
    weights = {"tf_bert_model/bert/embeddings/word_embeddings/weight:0":
               rng.standard_normal((5, 3)).astype(np.float32),
               "tf_bert_model/bert/pooler/dense/bias:0": rng.standard_normal(3).astype(np.float32),
               "tf_bert_model/bert/pooler/dense/kernel:0":
               rng.standard_normal((3, 3)).astype(np.float16)}
    with h5py.File(h5 / "tf_model.h5", "w") as f:
        f.attrs["layer_names"] = [b"tf_bert_model"]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        g = f.create_group("tf_bert_model")
        names = [n.encode() for n in weights]
        g.attrs["weight_names0"] = names[:2]
        g.attrs["weight_names1"] = names[2:]
        for n, a in weights.items():
            g.create_dataset(n, data=a)
    # the expected outputs, from arrays h5py reads (names: see hpcckpt.storage.hdf5)
    for src in ("keras_legacy.h5", "model.weights.h5", "tf_model.h5"):
        arrays = {}
        with h5py.File(h5 / src, "r") as f:
            f.visititems(lambda n, o: arrays.__setitem__(n, o[()])
                         if isinstance(o, h5py.Dataset) else None)
        np.savez(out / (src + ".npz"), **arrays)
    _ = save_file


def main() -> int:
    import mindspore as ms
    assert ms.__version__ == "2.10.0", ms.__version__
    for p in HERE.iterdir():
        if p.name != Path(__file__).name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    train = Path(ms.__file__).parent / "train"
    for proto in ("node_strategy", "checkpoint"):
        mod = __import__(f"mindspore.train.{proto}_pb2", fromlist=["DESCRIPTOR"])
        (HERE / f"{proto}.descriptor.bin").write_bytes(mod.DESCRIPTOR.serialized_pb)
    _ = train
    write_stage_files(ms)
    write_dist(ms)
    write_predict_strategy()
    write_unified(ms)
    write_ckpt(ms)
    write_h5()
    return 0


if __name__ == "__main__":
    sys.exit(main())
