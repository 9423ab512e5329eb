"""End-to-end demo: synthetic Llama checkpoint -> split (pp2xdp2xtp2) -> merge -> bit-exact check.

    python -m hpcckpt.demo --ranks 4 --workdir demo [--size-mb 300] [--keep]

(``make demo`` runs this with ``--keep``, so the README's Walkthrough can use the files.)

Steps:

1. generate a synthetic Llama-style model in bf16 with deterministic random content and
   write it as a Hugging Face sharded checkpoint (``model-0000i-of-0000N.safetensors`` +
   ``model.safetensors.index.json``, ~100 MB shards) under ``WORKDIR/hf_model``;
2. write the training layout ``WORKDIR/strategy.yaml`` (mesh pp2 x dp2 x tp2, 8 strategy
   ranks, Megatron-style tensor parallelism, ZeRO over dp on the MLP weights) and a
   second layout ``WORKDIR/tp4.yaml`` (tensor parallelism over 4) to reshard to;
3. ``mpiexec -n RANKS python -m hpcckpt split`` it to ``WORKDIR/dist``;
4. ``mpiexec -n RANKS python -m hpcckpt merge`` that back to ``WORKDIR/merged``;
5. compare every tensor of the merged output with the original, byte for byte, with
   bounded memory (headers read with hpcckpt's reader, data with ``os.pread``);
6. ``python -m hpcckpt inspect WORKDIR/dist``.

Exits 0 only if the round trip is bit-exact. Without ``--keep`` the generated files are
removed at the end (they are kept after a failure, for a look). WORKDIR is the demo's:
a second run empties it first, and a non-empty directory the demo did not make is refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import LaunchError
from .launch import find_mpiexec as _find_mpiexec, nested_launch_env
from .layout import strategy_from_dict, write_strategy_yaml
from .formats.names import HF_INDEX
from .formats.safetensors import build_header, read_header
from .units import format_bytes

MB = 10**6
BF16 = "BF16"
SEED = 20240531
GEN_CHUNK = 4 << 20          #: elements generated at a time (bounded memory)
CMP_CHUNK = 16 << 20         #: bytes compared at a time


# ---- the model ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """HF Llama names and shapes, in the order transformers saves them."""
        h, i, v = self.hidden, self.intermediate, self.vocab
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.weight", (h, h)),
                    (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * 2

    def stage_of_layer(self, n: int) -> int:
        return 0 if n < (self.layers + 1) // 2 else 1


def choose_shape(size_bytes: int) -> ModelShape:
    """A Llama-like shape whose bf16 size is close to ``size_bytes``: the smallest hidden
    size for which at most 24 layers are needed, then the number of layers that fits
    (at least 2, one per pipeline stage)."""
    shape = None
    for hidden in (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 8192):
        inter = max(256, int(round(hidden * 2.6875 / 256)) * 256)   # 4096 -> 11008
        vocab = 32000 if hidden >= 768 else 16000 if hidden >= 512 else 8000
        fixed = ModelShape(hidden, inter, vocab, 0).nbytes
        per_layer = ModelShape(hidden, inter, vocab, 1).nbytes - fixed
        layers = max(2, int(round((size_bytes - fixed) / per_layer)))
        shape = ModelShape(hidden, inter, vocab, layers)
        if layers <= 24:
            break
    return shape


def fill_tensor(name: str, shape: tuple[int, ...]):
    """Deterministic bf16 content of one tensor, yielded in bounded chunks (bf16 arrays).

    Weights ~ uniform with std 0.02 (cheaper to draw than a normal law), norms ~ 1 + the
    same; the stream depends only on the name, not on the sharding."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    total = math.prod(shape)
    norm = len(shape) == 1
    done = 0
    while done < total:
        n = min(GEN_CHUNK, total - done)
        x = rng.random(n, dtype=np.float32)
        x -= np.float32(0.5)
        x *= np.float32(0.02 * math.sqrt(12))
        if norm:
            x += np.float32(1.0)
        yield x.astype(ml_dtypes.bfloat16)
        done += n


def write_hf_model(out: Path, shape: ModelShape, shard_bytes: int) -> tuple[int, int]:
    """Write the sharded HF checkpoint; returns (number of shards, data bytes)."""
    out.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shape.tensors():
        n = math.prod(shp) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += n
    weight_map, total = {}, 0
    for k, group in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        head, offsets = build_header([(n, BF16, s) for n, s in group], {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(head)
            for name, shp in group:
                assert f.tell() == offsets[name][0]
                for chunk in fill_tensor(name, shp):
                    f.write(chunk.tobytes())
                weight_map[name] = fname
                total += offsets[name][1] - offsets[name][0]
    (out / HF_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": max(1, shape.hidden // 128),
        "num_key_value_heads": max(1, shape.hidden // 128), "vocab_size": shape.vocab,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "note": "synthetic weights written by python -m hpcckpt.demo"}, indent=2) + "\n")
    return len(shards), total


# ---- the layout ------------------------------------------------------------------------
def strategy_doc(shape: ModelShape) -> dict:
    """pp2 x dp2 x tp2: Megatron-style TP (column-parallel q/k/v/gate/up, row-parallel
    o/down), ZeRO over dp on the MLP weights, layers split between the two stages."""
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    shapes = dict(shape.tensors())

    def t(name, split=None, stage=None, zero=None):
        e = {"shape": list(shapes[name]), "dtype": BF16}
        if split is not None:
            e["split"] = split
        if stage is not None:
            e["stage"] = stage
        if zero is not None:
            e["zero"] = zero
        return name, e

    col, row = ["tp", None], [None, "tp"]
    entries = [t("model.embed_tokens.weight", col, 0)]
    for n in range(shape.layers):
        s, p = shape.stage_of_layer(n), f"model.layers.{n}."
        entries += [t(p + "self_attn.q_proj.weight", col, s),
                    t(p + "self_attn.k_proj.weight", col, s),
                    t(p + "self_attn.v_proj.weight", col, s),
                    t(p + "self_attn.o_proj.weight", row, s),
                    t(p + "mlp.gate_proj.weight", col, s, "dp"),
                    t(p + "mlp.up_proj.weight", col, s, "dp"),
                    t(p + "mlp.down_proj.weight", row, s, "dp"),
                    t(p + "input_layernorm.weight", None, s),
                    t(p + "post_attention_layernorm.weight", None, s)]
    entries += [t("model.norm.weight", None, 1), t("lm_head.weight", col, 1)]
    assert len(entries) == len(shapes) and (h, i, v)
    return {"format": "hpcckpt.strategy/1", "mesh": {"pp": 2, "dp": 2, "tp": 2},
            "tensors": dict(entries)}


def tp_strategy_doc(shape: ModelShape, tp: int) -> dict:
    """The same tensors under tensor parallelism alone (mesh ``tp``): the reshard target."""
    doc = strategy_doc(shape)
    tensors = {}
    for name, t in doc["tensors"].items():
        tensors[name] = {"shape": t["shape"], "dtype": t["dtype"]}
        if "split" in t:
            tensors[name]["split"] = t["split"]
    return {"format": "hpcckpt.strategy/1", "mesh": {"tp": tp}, "tensors": tensors}


# ---- running the tool ----------------------------------------------------------------
def find_mpiexec() -> str:
    try:
        return _find_mpiexec()
    except LaunchError as e:
        raise SystemExit(f"demo: {e}") from None


def run(cmd: list[str], title: str) -> float:
    """Print the command, run it with its output shown, return the wall time."""
    print(f"\n== {title}\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=nested_launch_env())
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise DemoFailure(f"{title}: command exited with status {proc.returncode}")
    print(f"   ({dt:.2f} s wall)", flush=True)
    return dt


class DemoFailure(Exception):
    pass


# ---- the check --------------------------------------------------------------------------
def tensor_locations(root: Path) -> dict[str, Path]:
    """name -> file of a complete checkpoint directory (HF index, or one model.safetensors)."""
    idx = root / HF_INDEX
    if idx.exists():
        return {n: root / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
    files = sorted(root.glob("*.safetensors"))
    out = {}
    for f in files:
        for n in read_header(f).tensors:
            out[n] = f
    return out


def compare_checkpoints(orig: Path, merged: Path) -> tuple[int, int, list[str]]:
    """Tensor by tensor, byte for byte; returns (tensors, bytes compared, problems)."""
    a_loc, b_loc = tensor_locations(orig), tensor_locations(merged)
    problems = []
    for n in sorted(set(a_loc) - set(b_loc)):
        problems.append(f"{n}: missing from the merged output")
    for n in sorted(set(b_loc) - set(a_loc)):
        problems.append(f"{n}: in the merged output but not in the original")
    headers: dict[Path, object] = {}

    def hdr(p):
        if p not in headers:
            headers[p] = read_header(p)
        return headers[p]

    fds: dict[Path, int] = {}

    def fd(p):
        if p not in fds:
            fds[p] = os.open(p, os.O_RDONLY)
        return fds[p]

    count = nbytes = 0
    try:
        for name in [n for n in a_loc if n in b_loc]:
            ea, eb = hdr(a_loc[name]).entry(name), hdr(b_loc[name]).entry(name)
            if (ea.dtype, ea.shape) != (eb.dtype, eb.shape):
                problems.append(f"{name}: {ea.dtype} {list(ea.shape)} became "
                                f"{eb.dtype} {list(eb.shape)}")
                continue
            fa, fb = fd(a_loc[name]), fd(b_loc[name])
            pos = 0
            while pos < ea.nbytes:
                n = min(CMP_CHUNK, ea.nbytes - pos)
                xa = os.pread(fa, n, ea.begin + pos)
                xb = os.pread(fb, n, eb.begin + pos)
                if xa != xb:
                    if len(xb) != n:
                        problems.append(f"{name}: merged file is short at byte {eb.begin + pos}")
                    else:
                        va = np.frombuffer(xa, np.uint8)
                        vb = np.frombuffer(xb, np.uint8)
                        first = int(np.flatnonzero(va != vb)[0])
                        problems.append(f"{name}: bytes differ from tensor byte {pos + first} "
                                        f"(element {(pos + first) // 2})")
                    break
                pos += n
            else:
                count += 1
                nbytes += ea.nbytes
    finally:
        for f in fds.values():
            os.close(f)
    return count, nbytes, problems


def check_with_safetensors(merged: Path) -> str:
    """The merged output must open with the safetensors library itself (header/layout)."""
    try:
        from safetensors import safe_open
    except ImportError:
        return "safetensors not installed: skipped"
    names = 0
    for f in sorted(merged.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:   # header parse + validation
            names += len(list(st.keys()))
    return f"{names} tensors listed by safetensors.safe_open"


# ---- main -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m hpcckpt.demo",
        description="End-to-end hpcckpt demo: synthetic bf16 Llama checkpoint, split to "
                    "pp2 x dp2 x tp2, merge back, check the round trip is bit-exact.")
    p.add_argument("--ranks", type=int, default=4, help="MPI ranks for split/merge (default 4)")
    p.add_argument("--workdir", required=True, help="directory for the demo's files")
    p.add_argument("--size-mb", type=float, default=300,
                   help="approximate model size in MB (default 300)")
    p.add_argument("--shard-mb", type=float, default=100,
                   help="shard size of the generated HF checkpoint (default 100)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args(argv)
    if args.ranks < 1:
        p.error("--ranks must be at least 1")
    if args.size_mb <= 0 or args.shard_mb <= 0:
        p.error("--size-mb and --shard-mb must be positive")
    return args


#: marks a directory as the demo's own, so a second run may empty it
MARKER = ".hpcckpt-demo"


def prepare_workdir(work: Path) -> None:
    """Create WORKDIR, or empty it if an earlier demo made it (with whatever the
    walkthrough added); refuse a non-empty directory the demo did not make."""
    if work.exists() and not work.is_dir():
        raise SystemExit(f"demo: {work} is not a directory; choose another --workdir")
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"demo: {work} is not empty and was not made by the demo; "
                             "choose another --workdir")
        for p in work.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by python -m hpcckpt.demo; emptied by its next run\n")


def shown(path: Path) -> str:
    """``path`` relative to the current directory when below it (as a user types it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir).resolve()
    prepare_workdir(work)
    paths = {"model": work / "hf_model", "strategy": work / "strategy.yaml",
             "tp4": work / "tp4.yaml", "dist": work / "dist", "merged": work / "merged"}
    py, mpiexec = sys.executable, find_mpiexec()
    hp = [py, "-m", "hpcckpt"]
    launch = [mpiexec, "-n", str(args.ranks)] + hp
    times: dict[str, float] = {}
    ok = False
    t_all = time.perf_counter()
    try:
        shape = choose_shape(int(args.size_mb * MB))
        n_tensors = len(shape.tensors())
        print(f"== generating a synthetic Llama-style model (bf16): hidden {shape.hidden}, "
              f"intermediate {shape.intermediate}, vocab {shape.vocab}, {shape.layers} layers, "
              f"{n_tensors} tensors, {shape.nbytes / MB:.1f} MB\n   -> {paths['model']}",
              flush=True)
        t0 = time.perf_counter()
        n_shards, data_bytes = write_hf_model(paths["model"], shape, int(args.shard_mb * MB))
        times["generate"] = time.perf_counter() - t0
        print(f"   {n_shards} shard(s) + {HF_INDEX} in {times['generate']:.2f} s", flush=True)

        strategy = strategy_from_dict(strategy_doc(shape), where="demo strategy")
        write_strategy_yaml(strategy, paths["strategy"])
        print(f"\n== strategy: mesh {strategy.mesh}, {strategy.world_size} strategy ranks, "
              f"{len(strategy.tensors)} tensors -> {paths['strategy']}", flush=True)
        write_strategy_yaml(strategy_from_dict(tp_strategy_doc(shape, 4), where="demo tp4"),
                            paths["tp4"])
        print(f"   and a layout to reshard to, mesh tp4 -> {paths['tp4']}", flush=True)

        times["split"] = run(launch + ["split", str(paths["model"]), str(paths["dist"]),
                                       "--strategy", str(paths["strategy"])],
                             f"split on {args.ranks} rank(s)")
        times["merge"] = run(launch + ["merge", str(paths["dist"]), str(paths["merged"]),
                                       "--max-shard-size", f"{int(args.shard_mb * MB)}"],
                             f"merge on {args.ranks} rank(s)")
        times["inspect"] = run(hp + ["inspect", str(paths["dist"])], "inspect the distributed "
                               "checkpoint")

        print(f"\n== comparing {paths['merged']} with {paths['model']}, tensor by tensor",
              flush=True)
        t0 = time.perf_counter()
        count, nbytes, problems = compare_checkpoints(paths["model"], paths["merged"])
        times["compare"] = time.perf_counter() - t0
        for line in problems[:20]:
            print(f"   DIFFERS: {line}")
        if len(problems) > 20:
            print(f"   ... and {len(problems) - 20} more")
        print(f"   {count} of {n_tensors} tensors identical ({format_bytes(nbytes)}) "
              f"in {times['compare']:.2f} s")
        print(f"   {check_with_safetensors(paths['merged'])}")
        ok = not problems and count == n_tensors and nbytes == data_bytes
        dist_bytes = sum(f.stat().st_size for f in paths["dist"].glob("rank_*/*.safetensors"))
        total = time.perf_counter() - t_all
        print("\n== summary")
        print(f"   model:          {n_tensors} tensors, {format_bytes(data_bytes)} bf16 "
              f"({data_bytes / MB:.1f} MB) in {n_shards} shard(s)")
        print(f"   distributed:    mesh {strategy.mesh} ({strategy.world_size} rank files), "
              f"{format_bytes(dist_bytes)} on disk")
        print(f"   ranks:          {args.ranks} (mpiexec {mpiexec})")
        for k in ("generate", "split", "merge", "inspect", "compare"):
            rate = (f"  wall, with MPI start-up ({data_bytes / times[k] / 1e9:.2f} GB/s "
                    "of model data)"
                    if k in ("split", "merge") else "")
            print(f"   {k + ' time:':<15} {times[k]:6.2f} s{rate}")
        print(f"   total time:     {total:6.2f} s")
        print(f"   round trip bit-exact: {'yes' if ok else 'NO'}")
    except DemoFailure as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    if ok and not args.keep:
        shutil.rmtree(work)
        print(f"   (removed the demo files; pass --keep to keep them under {work})")
    elif ok:
        d = shown(work)
        print(f"\n== kept under {d}/: hf_model/ (complete weights), strategy.yaml "
              "(pp2 dp2 tp2), tp4.yaml, dist/ (split), merged/ (merged back)")
        print("   next: `make shell` (or `. .venv/bin/activate`) puts hpcckpt and mpiexec on "
              "PATH; then the README's Walkthrough, e.g.")
        print(f"   hpcckpt strategy show {d}/strategy.yaml --tensor "
              "model.layers.0.mlp.down_proj.weight")
    elif not ok:
        print(f"   files kept for inspection under {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
