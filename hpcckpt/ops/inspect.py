"""inspect: what a checkpoint or a strategy holds."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import HpcckptError
from ..layout.loader import load_strategy
from ..layout.strategy import Strategy
from ..formats.names import HF_INDEX, MANIFEST, MODEL_FILES_DIR, MS_NAME_MAP, STRATEGY_FILE
from ..formats.safetensors import read_header
from ..storage import model_files
from ..storage.inputs import open_input
from ..storage.training import is_record_path


MAX_PROBLEMS = 20   #: listed in the report (``problems_total`` counts all)


def check_against_manifest(inp) -> list[str]:
    """What the rank files say against what the manifest records, without reading
    data: each file's size (format 2 records it), its header (read and validated:
    a truncated or empty file fails here), and every chunk the manifest lists
    present in its file's header with the tensor's dtype and the chunk's shape.
    Checksums are ``hpcckpt verify``'s (they need every byte read)."""
    m, problems = inp.manifest, []
    headers = {}
    for f in m.files:
        fp = os.path.join(inp.root, f)
        try:
            size = os.path.getsize(fp)
        except OSError:
            continue   # reported as missing
        want = m.file_sizes.get(f) if m.file_sizes is not None else None
        if want is not None and size != want:
            problems.append(f"{f}: {size} bytes, the manifest records {want}")
            continue
        try:
            headers[f] = read_header(fp)
        except HpcckptError as e:
            problems.append(str(e))
    for name, t in inp.source.tensors.items():
        for box, f, _ in m.records(name):
            h = headers.get(f)
            if h is None or not box.volume:
                continue
            e = h.tensors.get(name)
            if e is None:
                problems.append(f"{f}: has no tensor {name!r} (the manifest lists its chunk "
                                f"{box} there)")
            elif e.dtype != t.dtype or e.shape != box.sizes:
                problems.append(f"{f}: tensor {name!r} is {e.dtype} {list(e.shape)}, the "
                                f"manifest says its chunk {box} is {t.dtype} {list(box.sizes)}")
    return problems


def describe_strategy(s: Strategy) -> dict:
    per_rank = [s.rank_bytes(r) for r in range(s.world_size)]
    return {"kind": "strategy", "mesh": s.mesh.to_dict(), "world_size": s.world_size,
            "tensors": len(s.tensors), "unique_bytes": s.unique_bytes,
            "stored_bytes_full": sum(per_rank),
            "rank_bytes_min": min(per_rank), "rank_bytes_max": max(per_rank),
            "dtypes": dict(Counter(t.dtype for t in s.tensors))}


def describe_path(path: str, strategy: Strategy | None = None, list_tensors: bool = False) -> dict:
    p = Path(path)
    if p.is_file() and p.name in (HF_INDEX, MS_NAME_MAP, MANIFEST):
        p = p.parent   # the file that names a checkpoint's files stands for its directory
    if p.is_file() and p.suffix in (".yaml", ".yml", ".ckpt", ".json") and not is_record_path(p):
        return describe_strategy(load_strategy(p))
    problems = []
    try:
        inp = open_input(p, strategy)
    except HpcckptError:
        if p.is_dir() and not (p / MANIFEST).exists() and (p / STRATEGY_FILE).exists():
            return {"kind": "distributed", "path": str(p), "complete": False,
                    "problem": f"no {MANIFEST}: the write did not finish"}
        raise
    src = inp.source
    out = {"kind": inp.kind, "path": str(p), "description": inp.description,
           "tensors": len(src.tensors), "unique_bytes": src.unique_bytes,
           "files": len(inp.files),
           "dtypes": dict(Counter(t.dtype for t in src.tensors.values()))}
    stored = 0
    for f in inp.files:
        fp = os.path.join(inp.root, f)
        if not os.path.exists(fp):
            problems.append(f"missing file {f}")
        else:
            stored += os.path.getsize(fp)
    config_dir = model_files.model_dir_of(p) if inp.kind != "distributed" else None
    if inp.manifest is not None:
        problems += check_against_manifest(inp)
        carried = inp.manifest.model_files
        if carried:
            out["model_files"] = len(carried)
            for rel, (size, _) in carried.items():
                fp = p / MODEL_FILES_DIR / rel
                have = fp.stat().st_size if fp.is_file() else None
                if have != size:
                    problems.append(f"{MODEL_FILES_DIR}/{rel}: " + (
                        "missing" if have is None else f"{have} bytes, the manifest records {size}"))
            if "config.json" in carried:
                config_dir = p / MODEL_FILES_DIR
    model = model_files.config_summary(root=config_dir) if config_dir else None
    if model is not None:
        out["model"] = model
    out["stored_bytes"] = stored
    if inp.kind == "distributed":
        out.update({"world_size": inp.manifest.world_size if inp.manifest else
                    inp.strategy.world_size, "redundancy": src.redundancy,
                    "manifest": inp.manifest is not None})
        if inp.strategy is not None:
            out["mesh"] = inp.strategy.mesh.to_dict()
    out["complete"] = not problems
    if problems:
        out["problems"] = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            out["problems_total"] = len(problems)
    if list_tensors:
        out["tensor_list"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                               "chunks": len(src.chunks(t.name))} for t in src.tensors.values()]
    return out
