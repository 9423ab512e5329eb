"""Distributed checkpoints written by MindSpore: ``rank_<r>/*.safetensors``, no manifest.

Training keeps several steps side by side (``{prefix}-{epoch}_{step}.safetensors``);
which one a command reads follows MindSpore's ``unified_safetensors`` rules: without a
suffix the file whose last two numbers are largest, with ``file_suffix`` the files
ending in it (``"10_100"`` / ``"-10_100"``: epoch and step; ``"100"`` / ``"_100"``: step;
``"1-10_100"`` / ``"_1-10_100"``: task, epoch and step), the shortest name among several.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from ..errors import FormatError, HpcckptError
from ..formats.safetensors import read_header


def _last_two_numbers(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)][-2:]


def choose_file(names: list[str], suffix: str | None, where: str) -> str:
    """The step file among ``names`` (file names of one rank directory)."""
    if not names:
        raise FormatError(f"{where}: no .safetensors file")
    if suffix is None:
        return sorted(names, key=_last_two_numbers)[-1] if len(names) > 1 else names[0]
    want = suffix
    if re.fullmatch(r"\d+-\d+_\d+", suffix):
        want = "_" + suffix
    elif re.fullmatch(r"\d+_\d+", suffix):
        want = "-" + suffix
    elif re.fullmatch(r"\d+", suffix):
        want = "_" + suffix
    matched = [n for n in names if n.endswith(f"{want}.safetensors")]
    if re.fullmatch(r"_\d+-\d+_\d+", want):
        matched = [n for n in matched if not n.endswith(f"rank{want}.safetensors")]
    if not matched:
        raise FormatError(f"{where}: no .safetensors file ends with {want!r} "
                          f"(files: {', '.join(sorted(names))})")
    shortest = min(len(n) for n in matched)
    best = [n for n in matched if len(n) == shortest]
    if len(best) > 1:
        raise FormatError(f"{where}: several files end with {want!r} ({', '.join(sorted(best))}); "
                          "give a longer --file-suffix")
    return best[0]


def rank_files(root: str | Path, world: int, suffix: str | None = None) -> dict[int, str]:
    """``{rank: path relative to root}`` for ranks 0..world-1 (each must be present)."""
    from .inputs import rank_dirs
    root = Path(root)
    dirs = rank_dirs(root)
    out = {}
    for r in range(world):
        if r not in dirs:
            raise FormatError(f"{root}: rank_{r}/ is missing (strategy has {world} ranks)")
        names = sorted(p.name for p in dirs[r].glob("*.safetensors")
                       if not p.name.endswith(".partial"))
        out[r] = f"rank_{r}/{choose_file(names, suffix, str(dirs[r]))}"
    return out


def checkpoint_tensors(path: str | Path, ms, suffix: str | None = None
                       ) -> Mapping[str, tuple[tuple[int, ...], str]]:
    """Global shape and dtype of every tensor of the checkpoint at ``path``.

    A MindSpore-written distributed checkpoint stores slices: each parameter's global
    shape is its slice shape times the pieces of its layout (``ms``: an MsStrategy),
    read from the first rank file holding it. Any other checkpoint says it directly.
    """
    from ..formats.names import MANIFEST
    from .inputs import open_input, rank_dirs
    path = Path(path)
    if path.is_dir() and rank_dirs(path) and not (path / MANIFEST).exists():
        files = rank_files(path, ms.world_size, suffix)
        wanted = set(ms.names)
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        damaged: HpcckptError | None = None
        for r, rel in files.items():
            layouts = ms.layouts_of_rank(r)
            try:
                tensors = read_header(path / rel).tensors
            except HpcckptError as e:
                # another rank's file may give the same shapes: a damaged file is then
                # reported by whoever reads it (verify lists it as a problem)
                damaged = damaged or e
                continue
            for name, e in tensors.items():
                if name in wanted and name not in out and name in layouts:
                    out[name] = (layouts[name].global_shape(e.shape), e.dtype)
            if len(out) == len(wanted):
                break
        if damaged is not None and len(out) < len(wanted):
            raise damaged
        return out
    with open_input(path) as inp:
        return {t.name: (t.shape, t.dtype) for t in inp.source.tensors.values()}

