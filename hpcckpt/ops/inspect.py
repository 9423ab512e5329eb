"""inspect: what a checkpoint or a strategy holds."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import HpcckptError
from ..layout.loader import load_strategy
from ..layout.strategy import Strategy
from ..formats.names import HF_INDEX, MANIFEST, MODEL_FILES_DIR, MS_NAME_MAP, STRATEGY_FILE
from ..storage import model_files
from ..storage.inputs import open_input
from ..storage.training import is_record_path


MAX_PROBLEMS = 20   #: listed in the report (``problems_total`` counts all)


def check_against_manifest(inp) -> list[str]:
    """What the rank files say against what the manifest records, without reading
    data: each file's size (format 2 records it), its header (read and validated:
    a truncated or empty file fails here), and every chunk the manifest lists
    present in its file's header with the tensor's dtype and the chunk's shape.
    The check is ``hpcckpt verify``'s step 2 (``check_manifest_files``), worded for
    inspect; checksums are verify's (they need every byte read)."""
    from .verify import check_manifest_files
    problems: list[str] = []
    resized: set[str] = set()
    for p in check_manifest_files(inp.root, inp.manifest, exclusive=False):
        if p.kind == "missing" or p.file in resized:
            continue   # missing: reported by describe_path; a wrong size says enough
        if p.kind == "size":
            resized.add(p.file)
            problems.append(f"{p.file}: {p.message.removeprefix('file is ')}")
        elif p.kind == "header":
            problems.append(f"{os.path.join(inp.root, p.file)}: {p.message}")
        elif p.message.endswith("but the header has no such tensor"):
            problems.append(f"{p.file}: has no tensor {p.tensor!r} (the manifest lists its "
                            f"chunk {p.box} there)")
        elif p.message.startswith("header says "):
            problems.append(f"{p.file}: tensor {p.tensor!r} is " + p.message.removeprefix(
                "header says ").replace(", the manifest ",
                                        f", the manifest says its chunk {p.box} is ", 1))
        else:
            problems.append(p.line().removesuffix(f" (rank {p.rank})"))
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
                fp = Path(inp.root) / MODEL_FILES_DIR / rel
                have = fp.stat().st_size if fp.is_file() else None
                if have != size:
                    problems.append(f"{MODEL_FILES_DIR}/{rel}: " + (
                        "missing" if have is None else f"{have} bytes, the manifest records {size}"))
            if "config.json" in carried:
                config_dir = Path(inp.root) / MODEL_FILES_DIR
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
