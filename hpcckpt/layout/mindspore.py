"""MindSpore strategy files (SPEC 1.2): read, merge per-stage files, write.

A MindSpore strategy file (``ckpt_strategy_rank_<r>.ckpt``: protobuf
``ParallelStrategyMap``; or its JSON variant) gives each parameter a device matrix
(``dev_matrix``, outer axis first, rank = row-major over it, last axis fastest), a
``tensor_map`` (per tensor dimension: the device axes splitting it, numbered from the
right: ``k`` names ``dev_matrix[len - 1 - k]``; ``-1`` = not split; a list = several axes,
first major) and optimizer sharding (``opt_weight_shard_size`` ranks ``opt_weight_shard_step``
apart split dimension 0 of the model-parallel slice again: hpcckpt's ``zero``). One file
per pipeline stage; the stage is ``parallel_strategy_item[0].parallel_strategys.stage``;
MindSpore's merged file names each layout ``"{stage}-{name}"``. Global rank =
``stage * devices_per_stage + local rank``.

The files carry no shapes or dtypes (JSON has ``tensor_shape``, no dtype), so an
``MsStrategy`` becomes an hpcckpt ``Strategy`` once bound to the tensors of a
checkpoint (``MsStrategy.bind``). The mesh is the coarsest one that refines every
layout's device matrix (``pp`` first when there are several stages); a tensor whose
layout does not fit that mesh gets explicit boxes (computed with MindSpore's own rules).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import CheckpointIOError, StrategyError
from .box import Box, array_split_piece
from .strategy import PP_AXIS, Mesh, Strategy, TensorSpec

_STAGE_NAME = re.compile(r"^(\d+)-(.*)$", re.S)


@dataclass(frozen=True)
class MsLayout:
    """One parameter's layout as MindSpore stores it.

    Attributes:
        dev_matrix: device matrix of the parameter's stage, outer axis first.
        tensor_map: per tensor dimension, the MindSpore axis numbers splitting it (first
            major); () = not split. Axis ``k`` is ``dev_matrix[len(dev_matrix) - 1 - k]``.
        opt_shard_step: distance in ranks between members of an optimizer-shard group.
        opt_shard_size: ranks in the group (0 = no optimizer sharding).
        field: MindSpore's field size (embedding field split); only 0 is supported.
        param_split_shape: irregular split sizes (manual split); only empty is supported.
        indices_offset: irregular split offsets; only empty is supported.
        tensor_shape: global shape (JSON files only).
    """

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    field: int = 0
    param_split_shape: tuple[int, ...] = ()
    indices_offset: tuple[int, ...] = ()
    tensor_shape: tuple[int, ...] | None = dc_field(default=None, compare=False)

    @property
    def device_num(self) -> int:
        return math.prod(self.dev_matrix)

    def dev_index(self, k: int) -> int:
        return len(self.dev_matrix) - 1 - k

    def parts(self) -> tuple[int, ...]:
        """Model-parallel pieces per tensor dimension."""
        return tuple(math.prod(self.dev_matrix[self.dev_index(k)] for k in ks)
                     for ks in self.tensor_map)

    def suffix(self, i: int) -> int:
        """Rank stride of device axis ``i`` (product of the axes inside it)."""
        return math.prod(self.dev_matrix[i + 1:])

    def boundaries(self) -> set[int]:
        """Rank strides where this layout's device axes (and its optimizer group) begin."""
        out = {self.suffix(i) for i in range(len(self.dev_matrix))} | {self.device_num}
        for stride, size in self.opt_groups():
            out |= {stride, stride * size}
        return out

    def opt_groups(self) -> tuple[tuple[int, int], ...]:
        """The optimizer shard group as (rank stride, size) segments, outer first, chosen
        as MindSpore's loaders choose them (``_construct_tensor_layout_for_opt_shard``):
        replica device axes from the innermost outwards, the last one used only by its
        inner part. The group index splits dimension 0 of the model-parallel slice,
        first segment major. A layout whose only replica axis is the outermost one
        has its group ``opt_weight_shard_step`` ranks apart; MindSpore checks that
        step, and so does this."""
        size = self.opt_shard_size
        if size == 0 or not self.tensor_map:
            return ()
        sharded = {self.dev_index(k) for ks in self.tensor_map for k in ks}
        repeated = [i for i, v in enumerate(self.dev_matrix) if i not in sharded and v > 1]
        if not repeated:
            raise ValueError(f"no replica device axis to shard the optimizer over (dev_matrix "
                             f"{list(self.dev_matrix)})")
        if size == -1:   # MindSpore: every replica axis
            size = math.prod(self.dev_matrix[i] for i in repeated)
        if len(repeated) == 1 and self.suffix(repeated[0]) != self.opt_shard_step:
            raise ValueError(f"opt_weight_shard_step {self.opt_shard_step} is not the model "
                             f"parallel size {self.suffix(repeated[0])}")
        if not (1 < len(repeated) < len(self.dev_matrix) or repeated[0] > 0):
            if len(repeated) > 1:   # every axis a replica: MindSpore takes consecutive ranks
                return ((1, size),)
            return ((self.suffix(0), size),)
        segments: list[tuple[int, int]] = []
        remaining = size
        for i in reversed(repeated):
            v = self.dev_matrix[i]
            if remaining < v:
                if v % remaining:
                    raise ValueError(f"device axis of size {v} cannot hold an optimizer shard "
                                     f"group of {remaining}")
                v = remaining
            if remaining % v:
                raise ValueError(f"optimizer shard size {size} does not fit the replica axes "
                                 f"of dev_matrix {list(self.dev_matrix)}")
            segments.insert(0, (self.suffix(i), v))
            remaining //= v
            if remaining == 1:
                break
        if remaining != 1:
            raise ValueError(f"optimizer shard size {size} exceeds the replica axes of "
                             f"dev_matrix {list(self.dev_matrix)}")
        return tuple(segments)

    def local_box(self, shape: tuple[int, ...], local_rank: int) -> Box:
        """The box local rank ``local_rank`` of the stage holds, by MindSpore's rules."""
        coords, rest = [], local_rank
        for size in reversed(self.dev_matrix):
            coords.append(rest % size)
            rest //= size
        coords.reverse()
        offsets, sizes = [0] * len(shape), list(shape)
        for dim, ks in enumerate(self.tensor_map):
            if ks:
                parts, index = 1, 0
                for k in ks:
                    i = self.dev_index(k)
                    parts *= self.dev_matrix[i]
                    index = index * self.dev_matrix[i] + coords[i]
                offsets[dim], sizes[dim] = array_split_piece(shape[dim], parts, index)
        groups = self.opt_groups() if shape else ()
        if groups:
            o, total = 0, 1
            for stride, size in groups:
                o = o * size + (local_rank // stride) % size
                total *= size
            start, sizes[0] = array_split_piece(sizes[0], total, o)
            offsets[0] += start
        return Box(tuple(offsets), tuple(sizes))

    def global_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The global shape of a slice of ``local_shape`` (MindSpore splits evenly)."""
        parts = self.parts()
        out = [n * p for n, p in zip(local_shape, parts)]
        if out:
            out[0] *= math.prod(size for _, size in self.opt_groups())
        return tuple(out)


@dataclass(frozen=True)
class MsStageFile:
    """One parsed strategy file: its stage and its layouts (names as stored)."""

    path: str
    kind: str                          #: "protobuf" or "json"
    stage: int | None                  #: parallel_strategy_item[0]'s stage; None if no item
    current_stage: int
    layouts: tuple[tuple[str, MsLayout], ...]


@dataclass(frozen=True)
class MsStrategy:
    """Every stage's layouts: ``stages[s] = {name: MsLayout}`` for s in 0..S-1."""

    source: str
    stages: tuple[Mapping[str, MsLayout], ...]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(n for st in self.stages for n in st))

    @property
    def device_num(self) -> int:
        return next(iter(lay.device_num for st in self.stages for lay in st.values()), 1)

    @property
    def world_size(self) -> int:
        return self.device_num * len(self.stages)

    def layouts_of_rank(self, rank: int) -> Mapping[str, MsLayout]:
        return self.stages[rank // self.device_num]

    def bind(self, tensors: Mapping[str, tuple[tuple[int, ...], str]]) -> Strategy:
        """An hpcckpt Strategy for the tensors given (name -> (global shape, dtype)).

        Parameters the checkpoint does not hold are left out (MindSpore strategies also
        describe parameters that are never saved); tensors the strategy does not
        describe (``global_step``, ...) are not in the result.
        """
        names = [n for n in self.names if n in tensors]
        if not names:
            raise StrategyError(f"{self.source}: describes none of the checkpoint's tensors "
                                f"(first layout: {self.names[0]!r})" if self.names else
                                f"{self.source}: has no parameter layouts")
        for n in names:
            for st in self.stages:
                if n in st:
                    _check_layout(self.source, n, st[n], tuple(tensors[n][0]))
        D, S = self.device_num, len(self.stages)
        chain = {1, D}
        fits: dict[str, bool] = {}
        for n in names:
            for st in self.stages:
                lay = st.get(n)
                if lay is None:
                    continue
                merged = chain | lay.boundaries()
                ok = _is_chain(merged)
                fits[n] = fits.get(n, True) and ok
                if ok:
                    chain = merged
        strides = sorted(chain)
        axes = [(f"d{j}", strides[len(strides) - 1 - j] // strides[len(strides) - 2 - j])
                for j in range(len(strides) - 1)]
        stride_of = {f"d{j}": strides[len(strides) - 2 - j] for j in range(len(strides) - 1)}
        mesh_axes = ([(PP_AXIS, S)] if S > 1 else []) + axes
        mesh = Mesh(tuple(mesh_axes))
        specs = []
        for n in names:
            shape, dtype = tensors[n]
            shape = tuple(shape)
            present = [s for s, st in enumerate(self.stages) if n in st]
            lays = [self.stages[s][n] for s in present]
            same = all(lay == lays[0] for lay in lays)
            stage = None if len(present) == S else present[0] if len(present) == 1 else -1
            grid = None
            if fits.get(n) and same and stage != -1:
                grid = _grid_spec(n, shape, dtype, lays[0], stride_of, axes,
                                  stage if S > 1 else None)
            if grid is None:   # explicit boxes, by MindSpore's rules, for every rank
                boxes = {s * D + r: self.stages[s][n].local_box(shape, r)
                         for s in present for r in range(D)}
                grid = TensorSpec(n, shape, dtype, boxes=boxes)
            specs.append(grid)
        return Strategy(mesh, tuple(specs))


def _is_chain(values: set[int]) -> bool:
    s = sorted(values)
    return all(b % a == 0 for a, b in zip(s, s[1:]))


def _grid_spec(name, shape, dtype, lay: MsLayout, stride_of: dict[str, int],
               axes: list[tuple[str, int]], stage: int | None) -> TensorSpec | None:
    """The layout as split/zero over the mesh, or None when it needs explicit boxes."""
    def mesh_axes(lo: int, hi: int) -> tuple[str, ...]:
        # mesh axes whose strides lie in [lo, hi), outer first
        return tuple(a for a, size in axes if lo <= stride_of[a] and stride_of[a] * size <= hi)

    split = []
    used: set[str] = set()
    for ks in lay.tensor_map:
        names: tuple[str, ...] = ()
        for k in ks:
            i = lay.dev_index(k)
            names += mesh_axes(lay.suffix(i), lay.suffix(i) * lay.dev_matrix[i])
        used |= set(names)
        split.append(names)
    zero = None
    groups = lay.opt_groups() if shape else ()
    if groups:
        if len(groups) != 1:
            return None
        group = mesh_axes(groups[0][0], groups[0][0] * groups[0][1])
        if len(group) != 1:
            return None
        zero = group[0]
    split_t = tuple(split) if any(split) else ()
    return TensorSpec(name, shape, dtype, split=split_t, stage=stage, zero=zero)


def _check_layout(source: str, name: str, lay: MsLayout, shape: tuple[int, ...]) -> None:
    at = f"{source}: parameter {name!r}"
    if lay.field:
        raise StrategyError(f"{at}: field split (field={lay.field}) is not supported")
    if lay.param_split_shape or lay.indices_offset:
        raise StrategyError(f"{at}: irregular split (param_split_shape "
                            f"{list(lay.param_split_shape)}, indices_offset "
                            f"{list(lay.indices_offset)}) is not supported; merge it with "
                            "MindSpore first")
    if len(lay.tensor_map) != len(shape):
        raise StrategyError(f"{at}: tensor_map has {len(lay.tensor_map)} entries but the "
                            f"tensor has shape {list(shape)}")
    try:
        lay.opt_groups()
    except ValueError as e:
        raise StrategyError(f"{at}: optimizer sharding (opt_weight_shard_size "
                            f"{lay.opt_shard_size}, step {lay.opt_shard_step}): {e}") from None


# ---- reading -----------------------------------------------------------------------
def is_ms_strategy_path(path: Path) -> bool:
    """A MindSpore strategy file or a directory of them (not an hpcckpt checkpoint)."""
    if path.is_dir():
        return any(path.glob("*.ckpt")) or any(path.glob("*.json"))
    return path.suffix in (".ckpt", ".json")


def read_stage_file(path: str | Path) -> MsStageFile:
    """Parse one protobuf or JSON strategy file (JSON when the name ends in ``.json``,
    as MindSpore decides)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot read strategy: {e.strerror or e}") from None
    if not raw:
        raise StrategyError(f"{path}: strategy file is empty")
    if path.suffix == ".json":
        return _parse_json(path, raw)
    return _parse_protobuf(path, raw)


def _parse_protobuf(path: Path, raw: bytes) -> MsStageFile:
    from google.protobuf.message import DecodeError

    from ..ms_proto import message_class
    m = message_class("ParallelStrategyMap")()
    try:
        m.ParseFromString(raw)
    except DecodeError as e:
        raise StrategyError(f"{path}: not a MindSpore protobuf strategy file "
                            f"(ParallelStrategyMap): {e}") from None
    layouts = []
    for item in m.parallel_layout_item:
        pl = item.parallel_layouts
        if len(pl.dev_matrix) != 1:
            raise StrategyError(f"{path}: parameter {item.param_name!r} has "
                                f"{len(pl.dev_matrix)} dev_matrix entries, expected 1")
        tms = [list(t.dim) for t in pl.tensor_map]
        if len(tms) > 1:   # one TensorMap per dimension (a dimension may use several axes)
            per_dim = [t for t in tms if t]
        else:
            per_dim = [[k] for k in (tms[0] if tms else [])]
        layouts.append((item.param_name, _layout(
            path, item.param_name, list(pl.dev_matrix[0].dim), per_dim,
            pl.opt_weight_shard_step, pl.opt_weight_shard_size, pl.field,
            [d for x in pl.param_split_shape for d in x.dim],
            [d for x in pl.indices_offset for d in x.dim], None)))
    stage = (m.parallel_strategy_item[0].parallel_strategys.stage
             if m.parallel_strategy_item else None)
    return MsStageFile(str(path), "protobuf", stage, m.current_stage, tuple(layouts))


def _parse_json(path: Path, raw: bytes) -> MsStageFile:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StrategyError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("parallel_layout_item", {}), dict):
        raise StrategyError(f"{path}: not a MindSpore JSON strategy (expected an object with "
                            "'parallel_layout_item')")
    layouts = []
    for name, e in doc.get("parallel_layout_item", {}).items():
        at = f"{path}: parameter {name!r}"
        if not isinstance(e, dict) or "dev_matrix" not in e or "tensor_map" not in e:
            raise StrategyError(f"{at}: layout needs 'dev_matrix' and 'tensor_map'")
        tm = e["tensor_map"]
        if not isinstance(tm, list):
            raise StrategyError(f"{at}: 'tensor_map' must be a list, got {tm!r}")
        per_dim = [k if isinstance(k, list) else [k] for k in tm]
        shape = e.get("tensor_shape")
        layouts.append((name, _layout(path, name, e["dev_matrix"], per_dim,
                                      e.get("opt_weight_shard_step", 0),
                                      e.get("opt_weight_shard_size", 0), e.get("field", 0),
                                      e.get("param_split_shape", []), e.get("indices_offset", []),
                                      shape)))
    items = doc.get("parallel_strategy_item") or {}
    if not isinstance(items, dict):
        raise StrategyError(f"{path}: 'parallel_strategy_item' must be an object")
    stage = None
    if items:
        first = next(iter(items.values()))
        stage = first.get("stage") if isinstance(first, dict) else None
        if not _is_int(stage) or stage < 0:
            raise StrategyError(f"{path}: parallel_strategy_item stage {stage!r} is not a "
                                "non-negative integer")
    current = doc.get("current_stage", 0)
    return MsStageFile(str(path), "json", stage, current if _is_int(current) else 0,
                       tuple(layouts))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _layout(path, name, dev, per_dim, step, size, fld, pss, ioff, shape) -> MsLayout:
    at = f"{path}: parameter {name!r}"
    if (not isinstance(dev, list) or not dev
            or not all(_is_int(d) and d >= 1 for d in dev)):
        raise StrategyError(f"{at}: dev_matrix must be a non-empty list of positive integers, "
                            f"got {dev!r}")
    tmap = []
    seen: set[int] = set()
    for dim, ks in enumerate(per_dim):
        if not all(_is_int(k) for k in ks):
            raise StrategyError(f"{at}: tensor_map[{dim}] must hold integers, got {ks!r}")
        ks = [k for k in ks if k != -1]
        for k in ks:
            if not 0 <= k < len(dev):
                raise StrategyError(f"{at}: tensor_map[{dim}] names device axis {k}, but "
                                    f"dev_matrix {list(dev)} has {len(dev)} axes")
            if k in seen:
                raise StrategyError(f"{at}: device axis {k} is used twice in tensor_map")
            seen.add(k)
        tmap.append(tuple(ks))
    for key, v, low in (("opt_weight_shard_step", step, 0), ("opt_weight_shard_size", size, -1),
                        ("field", fld, 0)):
        if not _is_int(v) or v < low:
            raise StrategyError(f"{at}: {key} must be an integer >= {low}, got {v!r}")
    if step == 0 or size == 0:   # MindSpore: either zero means no optimizer sharding
        step = size = 0
    for key, v in (("param_split_shape", pss), ("indices_offset", ioff)):
        if not isinstance(v, list) or not all(_is_int(x) for x in v):
            raise StrategyError(f"{at}: {key} must be a list of integers, got {v!r}")
    if shape is not None and (not isinstance(shape, list)
                              or not all(_is_int(s) and s >= 0 for s in shape)):
        raise StrategyError(f"{at}: tensor_shape must be a list of sizes, got {shape!r}")
    lay = MsLayout(tuple(dev), tuple(tmap), step, size, fld, tuple(pss), tuple(ioff),
                   None if shape is None else tuple(shape))
    try:
        lay.opt_groups()
    except ValueError as e:
        raise StrategyError(f"{at}: optimizer sharding (opt_weight_shard_size {size}, step "
                            f"{step}): {e}") from None
    return lay


def stage_files(directory: Path) -> list[Path]:
    """The strategy files of a directory: all ``.ckpt`` or all ``.json`` (never both,
    as MindSpore's ``merge_pipeline_strategys`` requires)."""
    pb = sorted(directory.glob("*.ckpt"))
    js = sorted(directory.glob("*.json"))
    if pb and js:
        raise StrategyError(f"{directory}: mixes .ckpt ({pb[0].name}) and .json ({js[0].name}) "
                            "strategy files; keep one kind")
    if not pb and not js:
        raise StrategyError(f"{directory}: no .ckpt or .json strategy files")
    return pb or js


def per_stage(files: Iterable[MsStageFile]) -> list[MsStageFile]:
    """One file per stage, stages 0..S-1 in order. Files of the same stage with the same
    layouts (MindSpore saves one per rank) count once; different layouts for one stage,
    or a stage missing, are refused (MindSpore skips the later file silently)."""
    by_stage: dict[int, MsStageFile] = {}
    for f in files:
        if f.stage is None:
            raise StrategyError(f"{f.path}: has no parallel_strategy_item, so its pipeline stage "
                                "is unknown")
        if not f.layouts:
            raise StrategyError(f"{f.path}: has no parameter layouts")
        other = by_stage.get(f.stage)
        if other is None:
            by_stage[f.stage] = f
        elif dict(other.layouts) != dict(f.layouts):
            raise StrategyError(f"stage {f.stage} is described twice, differently: {other.path} "
                                f"and {f.path}")
    missing = [s for s in range(max(by_stage) + 1) if s not in by_stage]
    if missing:
        raise StrategyError(f"pipeline stage {missing[0]} has no strategy file (found stages "
                            f"{', '.join(map(str, sorted(by_stage)))})")
    return [by_stage[s] for s in range(len(by_stage))]


def read_ms_strategy(path: str | Path) -> MsStrategy:
    """A strategy file (per-stage or merged) or a directory of per-stage files."""
    path = Path(path)
    if path.is_dir():
        files = per_stage(read_stage_file(p) for p in stage_files(path))
        return _check_devices(MsStrategy(str(path), tuple(dict(f.layouts) for f in files)))
    f = read_stage_file(path)
    if not f.layouts:
        raise StrategyError(f"{path}: has no parameter layouts")
    staged = [_STAGE_NAME.match(n) for n, _ in f.layouts]
    if all(staged):   # MindSpore's merged file: "{stage}-{name}"
        stages: dict[int, dict[str, MsLayout]] = {}
        for m, (_, lay) in zip(staged, f.layouts):
            stages.setdefault(int(m.group(1)), {})[m.group(2)] = lay
        missing = [s for s in range(max(stages) + 1) if s not in stages]
        if missing:
            raise StrategyError(f"{path}: merged strategy has no layouts for pipeline stage "
                                f"{missing[0]} (stages present: "
                                f"{', '.join(map(str, sorted(stages)))})")
        return _check_devices(MsStrategy(str(path), tuple(stages[s] for s in range(len(stages)))))
    if f.stage:
        raise StrategyError(f"{path}: describes pipeline stage {f.stage} only; give the "
                            "directory of every stage's file, or the merged file")
    return _check_devices(MsStrategy(str(path), (dict(f.layouts),)))


def _check_devices(s: MsStrategy) -> MsStrategy:
    first = None
    for st in s.stages:
        for n, lay in st.items():
            if first is None:
                first = (n, lay.device_num)
            elif lay.device_num != first[1]:
                raise StrategyError(f"{s.source}: parameter {n!r} has dev_matrix "
                                    f"{list(lay.dev_matrix)} ({lay.device_num} devices) but "
                                    f"{first[0]!r} has {first[1]}; every layout of a stage "
                                    "must span the same devices")
    return s


# ---- merging per-stage files as MindSpore does -------------------------------------
def merge_stage_files(directory: str | Path, out: str | Path,
                      dry_run: bool = False) -> list[MsStageFile]:
    """``hpcckpt strategy merge``: MindSpore's ``merge_pipeline_strategys`` output, with
    files taken in stage order and a duplicate or missing stage refused. Returns the
    files merged (``dry_run``: checked, nothing written)."""
    directory = Path(directory)
    paths = stage_files(directory)
    parsed = [read_stage_file(p) for p in paths]
    files = per_stage(parsed)
    if files[0].kind == "protobuf":
        from ..ms_proto import message_class
        cls = message_class("ParallelStrategyMap")
        dst = cls()
        for f in files:
            src = cls()
            src.ParseFromString(Path(f.path).read_bytes())
            for item in src.parallel_layout_item:
                item.param_name = f"{f.stage}-{item.param_name}"
            dst.parallel_strategy_item.extend(src.parallel_strategy_item)
            dst.parallel_layout_item.extend(src.parallel_layout_item)
        dst.current_stage = 1
        data = dst.SerializeToString()
    else:
        doc: dict = {"current_stage": 1, "parallel_strategy_item": {}, "parallel_layout_item": {}}
        for f in files:
            src = json.loads(Path(f.path).read_bytes())
            for name, item in src["parallel_layout_item"].items():
                doc["parallel_layout_item"][f"{f.stage}-{name}"] = item
            doc["parallel_strategy_item"].update(src["parallel_strategy_item"])
        data = json.dumps(doc).encode()
    if not dry_run:
        from ..storage.atomic import atomic_write_bytes
        atomic_write_bytes(out, data)
    return files


# ---- writing an hpcckpt strategy as MindSpore's -------------------------------------
def strategy_to_ms(strategy: Strategy, kind: str = "protobuf") -> bytes:
    """The strategy as one MindSpore strategy file (merged form ``"{stage}-{name}"`` when
    the mesh has a ``pp`` axis), protobuf or JSON. Refuses what MindSpore cannot
    express: explicit boxes, a ``zero`` axis that is not the innermost replica axis,
    several axes on one dimension in JSON."""
    mesh = strategy.mesh
    stage_axes = [(n, s) for n, s in mesh.axes if n != PP_AXIS]
    names = [n for n, _ in stage_axes]
    dev = [s for _, s in stage_axes] or [1]
    S = mesh.sizes.get(PP_AXIS, 1)
    per_stage_items: list[list[tuple[str, dict]]] = [[] for _ in range(S)]
    for t in strategy.tensors:
        at = f"tensor {t.name!r}"
        if t.boxes is not None:
            raise StrategyError(f"{at}: explicit boxes have no MindSpore layout")
        tmap = []
        for axes in (t.split or ((),) * len(t.shape)):
            tmap.append([len(names) - 1 - names.index(a) for a in axes] or [-1])
        tmap += [[-1]] * (len(t.shape) - len(tmap))
        step = size = 0
        if t.zero is not None:
            replica = [a for a in names if a not in {a for ax in t.split for a in ax}
                       and mesh.sizes[a] > 1]
            if not replica or replica[-1] != t.zero:
                raise StrategyError(f"{at}: zero axis {t.zero!r} is not the innermost replica "
                                    "axis, which is where MindSpore shards the optimizer")
            size = mesh.sizes[t.zero]
            step = math.prod(mesh.sizes[a] for a in names[names.index(t.zero) + 1:])
        if kind == "json" and any(len(k) > 1 for k in tmap):
            raise StrategyError(f"{at}: splits one dimension over several axes, which "
                                "MindSpore's JSON strategy cannot express; write protobuf")
        item = {"dev_matrix": dev, "tensor_map": tmap, "tensor_shape": list(t.shape),
                "opt_weight_shard_step": step, "opt_weight_shard_size": size}
        for s in ([t.stage] if t.stage is not None and S > 1 else range(S)):
            per_stage_items[s].append((f"{s}-{t.name}" if S > 1 else t.name, item))
    current = 1 if S > 1 else 0
    if kind == "json":
        doc = {"current_stage": current,
               "parallel_layout_item": {
                   n: {"dev_matrix": it["dev_matrix"], "field": 0,
                       "opt_weight_shard_size": it["opt_weight_shard_size"],
                       "opt_weight_shard_step": it["opt_weight_shard_step"],
                       "tensor_map": [k[0] for k in it["tensor_map"]],
                       "tensor_shape": it["tensor_shape"]}
                   for items in per_stage_items for n, it in items},
               "parallel_strategy_item": {f"hpcckpt-stage{s}": {"parallel_strategy": [],
                                                                "stage": s}
                                          for s in range(S)}}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    from ..ms_proto import message_class
    m = message_class("ParallelStrategyMap")()
    m.current_stage = current
    for s in range(S):
        item = m.parallel_strategy_item.add()
        item.node_name = f"hpcckpt-stage{s}"
        item.parallel_strategys.stage = s
    for items in per_stage_items:
        for n, it in items:
            li = m.parallel_layout_item.add()
            li.param_name = n
            pl = li.parallel_layouts
            pl.dev_matrix.add().dim.extend(it["dev_matrix"])
            if any(len(k) > 1 for k in it["tensor_map"]):   # one TensorMap per dimension
                for k in it["tensor_map"]:
                    pl.tensor_map.add().dim.extend(k)
                if len(it["tensor_map"]) == 1:
                    pl.tensor_map.add()
            else:
                pl.tensor_map.add().dim.extend(k[0] for k in it["tensor_map"])
            pl.param_split_shape.add()
            pl.indices_offset.add()
            pl.field = 0
            pl.opt_weight_shard_step = it["opt_weight_shard_step"]
            pl.opt_weight_shard_size = it["opt_weight_shard_size"]
    return m.SerializeToString()
