"""Read, validate and write hpcckpt strategy files (SPEC 1.1).

Validation happens here, before anything is planned or written, and every message
names the file and the tensor.
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from ..dtypes import DTYPES
from ..errors import StrategyError, quote
from .box import Box
from .strategy import (MAX_NDIM, MAX_TENSOR_BYTES, MAX_WORLD, PP_AXIS, STRATEGY_FORMAT, Mesh,
                       Strategy, TensorSpec)

_TENSOR_KEYS = {"shape", "dtype", "split", "stage", "zero", "boxes"}


def strategy_from_dict(doc: object, where: str = "strategy") -> Strategy:
    """Build and validate a Strategy from the parsed YAML document."""
    if not isinstance(doc, dict):
        raise StrategyError(f"{where}: expected a mapping with 'format', 'mesh' and 'tensors'")
    fmt = doc.get("format")
    if fmt != STRATEGY_FORMAT:
        raise StrategyError(f"{where}: 'format' is {quote(fmt)}, expected {STRATEGY_FORMAT!r}")
    mesh = _mesh(doc.get("mesh"), where)
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise StrategyError(f"{where}: 'tensors' must be a mapping of tensor name to layout")
    specs = tuple(_tensor(str(name), entry, mesh, where) for name, entry in tensors.items())
    return Strategy(mesh, specs)


def _mesh(raw: object, where: str) -> Mesh:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise StrategyError(f"{where}: 'mesh' must be an ordered mapping of axis name to size")
    axes = []
    for name, size in raw.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise StrategyError(f"{where}: mesh axis {quote(name)} has size {quote(size)}; "
                                "sizes must be positive integers")
        axes.append((str(name), size))
    mesh = Mesh(tuple(axes))
    if mesh.world_size > MAX_WORLD:
        raise StrategyError(f"{where}: mesh {quote(raw)} has {mesh.world_size} ranks; at most "
                            f"{MAX_WORLD} are supported")
    return mesh


def _tensor(name: str, e: object, mesh: Mesh, where: str) -> TensorSpec:
    at = f"{where}: tensor {quote(name)}"
    if not isinstance(e, dict):
        raise StrategyError(f"{at}: expected a mapping with 'shape' and 'dtype'")
    unknown = set(e) - _TENSOR_KEYS
    if unknown:
        names = sorted(str(k)[:60] for k in unknown)
        more = ", ..." if len(names) > 6 else ""
        raise StrategyError(f"{at}: unknown key(s) {', '.join(names[:6])}{more}; "
                            f"allowed: {', '.join(sorted(_TENSOR_KEYS))}")
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                              for s in shape):
        raise StrategyError(f"{at}: 'shape' must be a list of integers, got {quote(shape)}")
    if len(shape) > MAX_NDIM:
        raise StrategyError(f"{at}: shape {quote(shape)} has {len(shape)} dimensions; at most "
                            f"{MAX_NDIM} are supported")
    if any(s < 0 for s in shape):
        raise StrategyError(f"{at}: negative size in shape {quote(shape)}")
    dtype = e.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise StrategyError(f"{at}: unknown dtype {quote(dtype)} "
                            f"(known: {' '.join(DTYPES)})")
    if math.prod(shape) * DTYPES[dtype][0] > MAX_TENSOR_BYTES:
        raise StrategyError(f"{at}: {dtype} {quote(shape)} would hold "
                            f"{math.prod(shape) * DTYPES[dtype][0]} bytes; at most "
                            f"{MAX_TENSOR_BYTES} are supported")
    stage = e.get("stage")
    if stage is not None:
        if PP_AXIS not in mesh.sizes:
            raise StrategyError(f"{at}: has 'stage: {quote(stage)}' but the mesh has no 'pp' axis")
        if not isinstance(stage, int) or isinstance(stage, bool):   # YAML's true is not 1
            raise StrategyError(f"{at}: 'stage' must be an integer (a pp coordinate), "
                                f"got {quote(stage)}")
        if not 0 <= stage < mesh.sizes[PP_AXIS]:
            raise StrategyError(f"{at}: stage {stage} is out of range for pp={mesh.sizes[PP_AXIS]}")
    if "boxes" in e:
        for key in ("split", "zero", "stage"):
            if e.get(key) is not None:
                raise StrategyError(f"{at}: '{key}' cannot be combined with explicit 'boxes'")
        boxes = _explicit_boxes(e["boxes"], tuple(shape), mesh, at)
        return TensorSpec(name, tuple(shape), dtype, boxes=boxes)
    split = _split(e.get("split"), len(shape), mesh, at)
    zero = e.get("zero")
    if zero is not None:
        if not isinstance(zero, str) or zero not in mesh.sizes:
            raise StrategyError(f"{at}: unknown zero axis {quote(zero)} "
                                f"(mesh axes: {', '.join(mesh.names)})")
        if any(zero in axes for axes in split):
            raise StrategyError(f"{at}: zero axis {zero!r} is also used in 'split'")
        if not shape:
            raise StrategyError(f"{at}: 'zero' needs at least one dimension; the tensor is a scalar")
    if stage is not None and (any(PP_AXIS in axes for axes in split) or zero == PP_AXIS):
        raise StrategyError(f"{at}: the 'pp' axis cannot both place stages and split data")
    return TensorSpec(name, tuple(shape), dtype, split=split, stage=stage, zero=zero)


def _split(raw: object, ndim: int, mesh: Mesh, at: str) -> tuple[tuple[str, ...], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise StrategyError(f"{at}: 'split' must be a list with one entry per dimension")
    if len(raw) > ndim:
        raise StrategyError(f"{at}: 'split' has {len(raw)} entries but the shape has {ndim} "
                            "dimension(s)")
    out, seen = [], set()
    for dim, entry in enumerate(raw):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
            raise StrategyError(f"{at}: split[{dim}] must be null, an axis name or a list of "
                                f"axis names, got {quote(entry)}")
        for a in axes:
            if a not in mesh.sizes:
                raise StrategyError(f"{at}: unknown axis {a!r} in split[{dim}] "
                                    f"(mesh axes: {', '.join(mesh.names) or 'none'})")
            if a in seen:
                raise StrategyError(f"{at}: axis {a!r} is used twice in 'split'")
            seen.add(a)
        out.append(tuple(axes))
    out += [()] * (ndim - len(out))
    return tuple(out) if any(out) else ()


def _explicit_boxes(raw: object, shape: tuple[int, ...], mesh: Mesh, at: str) -> dict[int, Box]:
    if not isinstance(raw, dict):
        raise StrategyError(f"{at}: 'boxes' must map rank -> {{offsets, sizes}}")
    boxes: dict[int, Box] = {}
    for key, b in raw.items():
        try:
            rank = int(key)
        except (TypeError, ValueError):
            raise StrategyError(f"{at}: boxes key {quote(key)} is not a rank number") from None
        if not 0 <= rank < mesh.world_size:
            raise StrategyError(f"{at}: boxes names rank {rank}, outside the mesh's "
                                f"{mesh.world_size} ranks")
        if not isinstance(b, dict) or set(b) != {"offsets", "sizes"}:
            raise StrategyError(f"{at}: box of rank {rank} must have exactly 'offsets' and 'sizes'")
        offs, sizes = b["offsets"], b["sizes"]
        if (not isinstance(offs, list) or not isinstance(sizes, list)
                or len(offs) != len(shape) or len(sizes) != len(shape)):
            raise StrategyError(f"{at}: box of rank {rank} needs {len(shape)} offsets and sizes")
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in offs + sizes):
            raise StrategyError(f"{at}: box of rank {rank} has a negative or non-integer "
                                f"offset or size: offsets {quote(offs)}, sizes {quote(sizes)}")
        box = Box(tuple(offs), tuple(sizes))
        if not Box.full(shape).contains(box):
            raise StrategyError(f"{at}: box {box} of rank {rank} lies outside shape {list(shape)}")
        boxes[rank] = box
    distinct = sorted({b for b in boxes.values() if not b.is_empty()}, key=lambda b: b.offsets)
    owner = {b: min(r for r, x in boxes.items() if x == b) for b in distinct}
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            common = a.intersect(b)
            if common is not None:
                raise StrategyError(f"{at}: boxes of rank {owner[a]} {a} and rank {owner[b]} {b} "
                                    f"overlap in {common}")
    covered = sum(b.volume for b in distinct)
    if covered != math.prod(shape):
        raise StrategyError(f"{at}: boxes leave a gap: they cover {covered} of "
                            f"{math.prod(shape)} elements")
    return boxes


class _Flow(dict):
    """A mapping written on one line, in insertion order."""


class _Yaml(NamedTuple):
    """PyYAML and the classes this module builds on it."""

    module: ModuleType
    loader: type
    dumper: type
    duplicate_key: type


@functools.cache
def _yaml() -> _Yaml:
    """PyYAML, imported when YAML is first read or written: the import costs ~24 ms of
    start-up (``yaml.reader`` compiles its regexes), and a checkpoint's strategy copy,
    written as JSON, is read without it."""
    import yaml

    class DuplicateKey(yaml.YAMLError):
        def __init__(self, key, line: int, first: int):
            super().__init__(f"duplicate key {quote(key)} at line {line} (first at line {first})")

    class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        """The safe loader (libyaml's parser when PyYAML has it: ~10x faster on 1024-rank
        strategies) refusing duplicate keys, which PyYAML resolves silently, last one
        winning: a tensor listed twice would take the layout of its second entry."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise DuplicateKey(key, line, seen[key])
                        seen[key] = line
                    except TypeError:
                        continue   # unhashable: the constructor reports it
            return super().construct_mapping(node, deep=deep)

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(
        _Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", list(data.items()),
                                                   flow_style=True))
    return _Yaml(yaml, StrictLoader, Dumper, DuplicateKey)


def strategy_to_yaml(strategy: Strategy) -> str:
    """Block YAML text, for people to read and edit; keeps the mesh order (sorting it
    would renumber every rank)."""
    doc = strategy.to_dict()
    doc["tensors"] = {n: _Flow(_flowify(e)) for n, e in doc["tensors"].items()}
    y = _yaml()
    return y.module.dump(doc, Dumper=y.dumper, sort_keys=False, width=1 << 20)


def _flowify(entry: dict) -> dict:
    if "boxes" in entry:
        entry["boxes"] = _Flow({r: _Flow(b) for r, b in entry["boxes"].items()})
    return entry


# A checkpoint's strategy copy is JSON: a YAML 1.2 document, which json parses 50x
# faster than PyYAML. But PyYAML reads YAML 1.1, and reads a JSON text as json does only
# within the limits below, which the writer keeps to and the reader checks (else YAML
# reads the text).
#: characters YAML refuses or reads as line breaks (tab and CR too: json and YAML skip
#: them in different places); the writer escapes them
_NOT_YAML_CHAR = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
#: an escaped surrogate (json pairs two into one character, YAML does not), the escape
#: \/ (older PyYAML and libyaml lack it), a key on another line than its ':'
_NOT_YAML_SYNTAX = re.compile(r"\\u[dD][89a-fA-F]|\\/|\n *:")
#: YAML reads a key whose text runs over 1024 characters up to its ':' as a value with
#: no key. Keys of at most _MAX_KEY characters, each written as a 6-character escape at
#: worst, plus quotes and fewer than len(_SPACES) spaces before the ':', stay below.
_MAX_KEY = 150
_SPACES = " " * 64


def _reads_alike(json_text: str) -> bool:
    """Whether YAML reads ``json_text`` as json does, given keys of at most _MAX_KEY
    characters and no float (YAML 1.1 reads 1e3 as a string; no strategy holds one)."""
    return not (_NOT_YAML_CHAR.search(json_text) or _NOT_YAML_SYNTAX.search(json_text)
                or _SPACES in json_text)


def strategy_to_json_text(strategy: Strategy) -> str | None:
    """The strategy as a JSON document that YAML reads alike, one top-level key per line
    and one tensor per line; None when a name keeps it from reading alike (e.g. over
    _MAX_KEY characters, a surrogate, 64 spaces in a row)."""
    doc = strategy.to_dict()
    if any(len(k) > _MAX_KEY for k in (*doc["mesh"], *doc["tensors"])):
        return None
    dump = functools.partial(json.dumps, ensure_ascii=False)
    rows = [f"  {dump(name)}: {dump(entry)}," for name, entry in doc["tensors"].items()]
    if rows:
        rows[-1] = rows[-1][:-1]
    text = "\n".join([f'{{"format": {dump(doc["format"])},', f' "mesh": {dump(doc["mesh"])},',
                      ' "tensors": {', *rows, " }}\n"])
    text = _NOT_YAML_CHAR.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
    return text if _reads_alike(text) else None


def strategy_file_bytes(strategy: Strategy) -> bytes:
    """A checkpoint's copy of its strategy: JSON, which every rank of a 1024-rank job
    parses in ~0.08 s of CPU where PyYAML takes ~0.45 s; block YAML when YAML would not
    read the JSON alike."""
    text = strategy_to_json_text(strategy)
    return (strategy_to_yaml(strategy) if text is None else text).encode()


def read_strategy_yaml(path: str | Path) -> Strategy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        from ..errors import CheckpointIOError
        raise CheckpointIOError(f"{path}: cannot read strategy: {e.strerror or e}") from None
    return strategy_from_yaml_text(text, str(path))


class _NotJson(Exception):
    """json cannot show that its reading equals YAML's: YAML reads the text."""


def _json_object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs) or max(map(len, obj), default=0) > _MAX_KEY:
        raise _NotJson   # a duplicate key (YAML names it) or a key YAML may drop
    return obj


def _strategy_from_json(text: str | bytes, where: str) -> Strategy | None:
    """The valid strategy of a JSON text YAML reads alike, parsed by json (50x faster
    than PyYAML); None for anything else."""
    try:
        if isinstance(text, bytes):
            text = text.decode()
        if text.lstrip(" \n")[:1] != "{" or not _reads_alike(text):
            return None
        # a float is never valid (YAML 1.1 reads 1e3 as a string): YAML decides then
        return strategy_from_dict(json.loads(text, object_pairs_hook=_json_object), where=where)
    except (_NotJson, ValueError, RecursionError, StrategyError):   # ValueError: bad UTF-8 too
        return None


def strategy_from_yaml_text(text: str | bytes, where: str) -> Strategy:
    """Parse and validate a strategy YAML document read elsewhere (``where`` names it).
    A JSON one YAML reads alike (a checkpoint's copy) is parsed by json; any other, and
    any invalid one, by YAML, whose messages name lines."""
    fast = _strategy_from_json(text, where)
    if fast is not None:
        return fast
    y = _yaml()
    try:
        doc = y.module.load(text, Loader=y.loader)
    except y.duplicate_key as e:
        raise StrategyError(f"{where}: {e}") from None
    except y.module.YAMLError as e:
        raise StrategyError(f"{where}: not valid YAML: {e}") from None
    return strategy_from_dict(doc, where=where)


def write_strategy_yaml(strategy: Strategy, path: str | Path) -> None:
    """Whole or not at all (a full disk leaves no empty file), errors naming ``path``."""
    from ..storage.atomic import atomic_write_bytes
    atomic_write_bytes(path, strategy_to_yaml(strategy).encode())
