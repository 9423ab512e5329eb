"""The readers of safetensors-based checkpoints, and ``open_input`` which picks one.

Kinds (SPEC 2): complete weights (a single ``.safetensors`` file, an HF directory with
its index, MindSpore's merged layout with ``param_name_map.json``, any directory of
``.safetensors`` files), and distributed checkpoints (``rank_<r>/`` directories with a
``manifest.json``; without one, only given a strategy). The interface they implement,
and how to add another kind, is in ``storage/reader.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointIOError, FormatError, UsageError, quote
from ..formats.names import (DEFAULT_PREFIX, HF_INDEX, HF_SHARD, MANIFEST, MS_NAME_MAP, RANK_DIR,
                             STRATEGY_FILE, rank_file_name)
from ..formats.safetensors import SafetensorsHeader, load_json, read_header
from ..layout.box import Box
from ..layout.strategy import Strategy
from ..layout.tensor import TensorInfo
from ..layout.yaml_io import strategy_from_yaml_text
from ..planning.sources import (SourceChunk, SourceIndex, check_tensor_chunks, group_chunks,
                                strategy_source)
from .fileio import FileHandles, preadv_into, safe_join
from .manifest import ManifestIndex, read_manifest, strategy_digest
from . import training
from .reader import CheckpointReader, MetaFiles, check_region, shared_metadata


def rank_dirs(root: str | Path) -> dict[int, Path]:
    """``rank_<r>`` directories under ``root``, by rank."""
    root = Path(root)
    out = {}
    if root.is_dir():
        for p in root.iterdir():
            m = RANK_DIR.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


class SafetensorsReader(CheckpointReader):
    """A source whose chunks are tensors of safetensors files under ``root``: a chunk's
    stored bytes are its file's tensor entry of the same name. Each file's header is read
    and validated on first use, and each entry is checked once against the chunk's box
    and the tensor's dtype."""

    def __init__(self, root: str | Path, kind: str = "complete",
                 source: SourceIndex | None = None, files: tuple[str, ...] = (),
                 description: str = "", manifest: ManifestIndex | None = None,
                 strategy: Strategy | None = None):
        self.kind, self.root, self.files = kind, str(root), tuple(files)
        self.source = source if source is not None else SourceIndex((), {})
        self.description, self.manifest, self.strategy = description, manifest, strategy
        self.headers: dict[str, SafetensorsHeader] = {}
        self._handles = FileHandles()
        self._begins: dict[tuple[str, str], int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def header(self, rel: str) -> SafetensorsHeader:
        h = self.headers.get(rel)
        if h is None:
            h = self.headers[rel] = read_header(self.path(rel))
        return h

    def begin(self, rel: str, t: TensorInfo, box: Box) -> int:
        """Absolute file offset of the stored chunk ``box`` of ``t`` in ``rel``."""
        key = (rel, t.name)
        got = self._begins.get(key)
        if got is None:
            h = self.header(rel)
            e = h.entry(t.name)
            if e.dtype != t.dtype or e.shape != box.sizes:
                raise FormatError(f"{h.path}: tensor {t.name!r} is {e.dtype} {list(e.shape)} but "
                                  f"the checkpoint says its chunk {box} is {t.dtype} "
                                  f"{list(box.sizes)}")
            got = self._begins[key] = e.begin
        return got

    def read_region(self, file: str, tensor: TensorInfo, box: Box, offset: int,
                    views: list[memoryview]) -> None:
        begin = self.begin(file, tensor, box)
        check_region(views, offset, box.volume * tensor.itemsize)
        path = self.path(file)
        preadv_into(self._handles.get(path), views, begin + offset, path)

    def close(self) -> None:
        self._handles.close()


class SingleFileReader(SafetensorsReader):
    """One ``.safetensors`` file: complete weights."""

    name = "safetensors file"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        return _complete(cls, path.parent, [path.name], f"single file {path.name}")


class ManifestReader(SafetensorsReader):
    """A distributed checkpoint with ``manifest.json`` (SPEC 2.2): the manifest says what
    every rank file holds, so no header is read to plan.

    Chunks are decoded and checked (paths inside ``root``, inside the tensor, no overlap,
    complete) per tensor on first use; unless ``lazy``, every tensor is checked in
    ``open``. The strategy is read only when the caller gives none (at 1024 ranks: 0.08 s,
    0.45 s as block YAML).
    """

    name = "distributed checkpoint with manifest"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_dir() and (path / MANIFEST).exists()

    @classmethod
    def metadata_names(cls, path: Path) -> tuple[str, ...]:
        return MANIFEST, STRATEGY_FILE

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        return cls.open_manifest(path, MANIFEST, strategy, lazy, meta)

    @classmethod
    def open_manifest(cls, path: Path, name: str, strategy=None, lazy=False, meta=None,
                      description: str = ""):
        """The checkpoint under ``path`` that the manifest ``path/name`` describes."""
        meta = meta or MetaFiles()
        m = read_manifest(path, meta, bind=False, name=name)
        where = str(path / name)
        tensors = {name: TensorInfo(name, shape, dtype) for name, (shape, dtype) in m.shapes.items()}
        checked: set[str] = set()

        def derived_chunks(name: str, within: Box | None = None) -> list[SourceChunk] | None:
            derived = m.derived_chunks(name, within)
            if derived is None:
                return None
            for f in {f for _, fs, _ in derived for f in fs} - checked:
                safe_join(path, f, where)
                checked.add(f)
            return [SourceChunk(b, fs, ss) for b, fs, ss in derived]

        def chunks(name: str) -> list[SourceChunk]:
            derived = derived_chunks(name)
            if derived is not None:   # laid out by the (validated) strategy: they tile it
                return derived
            entries = []
            for box, f, checksum in m.records(name):
                if f not in checked:  # a path check per file, not per chunk (1024 ranks:
                    safe_join(path, f, where)  # ~1,000 files but ~370,000 chunks)
                    checked.add(f)
                entries.append((name, box, f, checksum))
            got = group_chunks(entries).get(name, [])
            check_tensor_chunks(where, tensors[name], got)
            return got

        layout = _manifest_layout(path, m, strategy, meta)
        source = SourceIndex(tensors.values(), chunks, redundancy=m.redundancy,
                             meeting=derived_chunks)
        if not lazy:
            for name in tensors:
                source.chunks(name)
        return cls(path, "distributed", source, m.files,
                   f"{description}distributed, {m.world_size} ranks, redundancy {m.redundancy}",
                   m, strategy or layout)


class TrainingStepReader(ManifestReader):
    """One committed step of a training directory (``CheckpointManager``, SPEC 2.2,
    ``storage/training.py``): the step's commit record is its manifest. The directory
    opens at its latest committed step; a record (``commits/<seq>-<epoch>_<step>.json``,
    what ``--step`` resolves to) at its step. In a job, rank 0 picks the step and the
    others read the record it broadcast, so every rank opens the same step."""

    name = "training directory"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return (path.is_file() and training.is_record_path(path)) or training.is_training_dir(path)

    @classmethod
    def metadata_names(cls, path: Path) -> tuple[str, ...]:
        if path.is_file():   # a record: each rank reads the little it needs
            return ()
        return (training.find_record(path).path,
                *sorted(p.name for p in path.glob("strategy*.yaml")))

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        if path.is_file():
            root, record = path.parent.parent, f"{path.parent.name}/{path.name}"
        else:
            root = path
            given = [k for k, v in (meta.files if meta else {}).items()
                     if v is not None and training.is_record_path(k)]
            record = (f"{training.RECORDS}/{Path(given[0]).name}" if given
                      else training.find_record(path).path)
        step = Path(record).stem.split("-", 1)[1]
        return cls.open_manifest(root, record, strategy, lazy, meta,
                                 f"training directory, step {step} ({record}); ")


def _manifest_layout(root: Path, m: ManifestIndex, given: Strategy | None,
                     meta: MetaFiles) -> Strategy | None:
    """The checkpoint's own strategy, bound to ``m`` (its world size checked): ``given``
    when its digest is the one the manifest records, else the strategy file, read only
    when the manifest needs it (format-2 chunks are given by it) or no strategy was given
    (parsing one of 1024 ranks takes 0.08 s, 0.45 s as block YAML)."""
    where = root / m.strategy
    if given is not None and m.strategy_digest is not None \
            and m.strategy_digest == strategy_digest(given):
        layout = given
    elif m.needs_layout or given is None:
        text = meta.read(safe_join(root, m.strategy, m.where))
        if text is None:
            if m.needs_layout:
                raise FormatError(f"{where}: not found, and {m.where} gives its tensors' "
                                  "chunks by it")
            return None
        layout = strategy_from_yaml_text(text, str(where))
    else:
        return None
    m.bind(layout, str(where))
    return layout


class RankFilesReader(SafetensorsReader):
    """``rank_<r>/`` directories without a manifest (e.g. written by MindSpore), read
    given their strategy: rank r's step file (MindSpore's choice: ``ms_dist.choose_file``;
    ``file_suffix`` selects the step) holds its boxes; headers say which tensors each
    file really stores (de-duplicated saves)."""

    name = "distributed checkpoint without manifest"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return bool(rank_dirs(path))

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None, file_suffix=None):
        if strategy is None:
            raise FormatError(f"{path}: distributed checkpoint has no {MANIFEST} (an unfinished "
                              "write, or written by another tool); pass --strategy to read it")
        from .ms_dist import rank_files
        reader = cls(path, "distributed", strategy=strategy,
                     description=f"distributed without manifest, {strategy.world_size} ranks")
        files = rank_files(path, strategy.world_size, file_suffix)
        for f in files.values():
            reader.header(f)
        if any(reader.header(f).metadata.get("dedup") == "balanced" for f in files.values()):
            source = _described_source(reader, strategy, files.values())
        else:
            source = strategy_source(strategy, files.__getitem__,
                                     holds=lambda r, name: name in reader.header(files[r]).tensors)
        source.check_complete(str(path))
        source.redundancy = "dedup" if any(reader.header(f).metadata.get("remove_redundancy")
                                           == "True" for f in files.values()) else "full"
        reader.source, reader.files = source, tuple(files.values())
        return reader


def _described_source(reader: SafetensorsReader, strategy: Strategy,
                      files) -> SourceIndex:
    """Balanced de-duplication stores slabs of the strategy's boxes: each rank file's
    ``hpcckpt`` metadata gives the global offsets of what it stores (shapes from its
    header), which ``check_complete`` then checks tile every tensor."""
    entries = []
    for f in files:
        h = reader.header(f)
        try:
            desc = load_json(h.metadata["hpcckpt"], str(h.path), "'hpcckpt' metadata")
            offsets = {name: tuple(int(x) for x in desc[name]["offsets"]) for name in h.tensors}
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{h.path}: a balanced de-duplicated file needs its 'hpcckpt' "
                              f"metadata (each tensor's offsets): {type(e).__name__}: {e}") from None
        for name, e in h.tensors.items():
            entries.append((name, Box(offsets[name], tuple(e.shape)), f, None))
    tensors = [TensorInfo(t.name, t.shape, t.dtype) for t in strategy.tensors]
    chunks = group_chunks(entries)
    return SourceIndex(tensors, lambda name: chunks.get(name, []))


class HFIndexReader(SafetensorsReader):
    """Hugging Face sharded weights: ``model.safetensors.index.json`` names the file of
    every tensor; the index is authoritative, and a file outside the directory is refused."""

    name = "Hugging Face index"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_dir() and (path / HF_INDEX).exists()

    @classmethod
    def metadata_names(cls, path: Path) -> tuple[str, ...]:
        return (HF_INDEX,)

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        idx_path = path / HF_INDEX
        weight_map = _name_map(idx_path, (meta or MetaFiles()).read(idx_path), "weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        return _complete(cls, path, files, f"HF index with {len(files)} shard(s)", weight_map,
                         idx_path)


class MSNameMapReader(SafetensorsReader):
    """MindSpore's merged layout: ``param_name_map.json`` maps each tensor to its part file."""

    name = "MindSpore merged layout"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_dir() and (path / MS_NAME_MAP).exists()

    @classmethod
    def metadata_names(cls, path: Path) -> tuple[str, ...]:
        return (MS_NAME_MAP,)

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        map_path = path / MS_NAME_MAP
        raw = (meta or MetaFiles()).read(map_path)
        # MindSpore 2.10: {"metadata": {"total_size": N}, "weight_map": {...}}; older: flat
        doc = load_json(raw, str(map_path)) if raw is not None else None
        key = "weight_map" if isinstance(doc, dict) and isinstance(doc.get("weight_map"),
                                                                   dict) else None
        name_map = _name_map(map_path, raw, key)
        files = list(dict.fromkeys(name_map.values()))
        return _complete(cls, path, files, "MindSpore merged layout", name_map, map_path)


class SafetensorsDirReader(SafetensorsReader):
    """Any other directory: every ``.safetensors`` file in it holds complete tensors."""

    name = "directory of safetensors files"

    @classmethod
    def recognise(cls, path: Path) -> bool:
        return path.is_dir()

    @classmethod
    def open(cls, path, strategy=None, lazy=False, meta=None):
        files = sorted(p.name for p in path.glob("*.safetensors")
                       if not p.name.endswith(".partial"))
        shards = [f for f in files if HF_SHARD.match(f)]
        if shards:
            raise FormatError(f"{path}: sharded weights ({shards[0]} ...) without {HF_INDEX}: "
                              "an unfinished merge or an incomplete copy")
        if not files:
            raise FormatError(f"{path}: no safetensors checkpoint here (no {HF_INDEX}, "
                              f"{MANIFEST}, rank_<r>/ directories or .safetensors files)")
        return _complete(cls, path, files, f"{len(files)} safetensors file(s)")


#: tried in this order; the first reader that recognises a path opens it
READERS: list[type[CheckpointReader]] = [TrainingStepReader, SingleFileReader, ManifestReader,
                                         RankFilesReader,
                                         HFIndexReader, MSNameMapReader, SafetensorsDirReader]


def register_reader(cls: type[CheckpointReader], before: type[CheckpointReader] | None = None
                    ) -> None:
    """Add a reader to the recognition order: before ``before`` (default: first)."""
    if cls in READERS:
        READERS.remove(cls)
    READERS.insert(READERS.index(before) if before in READERS else 0, cls)


def open_input(path: str | Path | CheckpointReader, strategy: Strategy | None = None,
               lazy: bool = False, meta: MetaFiles | None = None,
               comm=None) -> CheckpointReader:
    """The reader for ``path`` (a reader given is returned as it is).

    Complete inputs read every header (there are few files); distributed inputs with a
    manifest read none (the manifest says everything). ``lazy``: a manifest's tensors
    are decoded and checked when planning first asks for them (for callers that touch
    only their own tensors, before anything is written). ``meta``: where metadata files
    come from (default: this process's filesystem). ``comm``: a job whose ranks all open
    the same ``path`` (collective): rank 0 reads its metadata files (manifest, strategy,
    index, name map) once and broadcasts their bytes.

    Example:
        >>> with open_input("dist/") as src:          # doctest: +SKIP
        ...     src.source.tensors["lm_head.weight"].shape
        (32000, 1024)
    """
    if isinstance(path, CheckpointReader):
        return path
    path = Path(path)
    if meta is None and comm is not None and getattr(comm, "mpi", None) is not None \
            and comm.size > 1:
        names = None
        if comm.rank == 0:   # rank 0 recognises; an error here is every rank's below
            try:
                cls = next((c for c in READERS if path.exists() and c.recognise(path)), None)
                names = cls.metadata_names(path) if cls is not None else ()
            except Exception:  # noqa: BLE001 - never skip the broadcast the others wait in
                names = ()
        names = comm.bcast(names)
        if names:
            meta = shared_metadata(comm, path, names)
    if not path.exists():
        raise CheckpointIOError(f"{path}: no such file or directory")
    for cls in READERS:
        if cls.recognise(path):
            return cls.open(path, strategy, lazy, meta)
    if path.is_file():
        raise FormatError(f"{path}: not a .safetensors file")
    raise FormatError(f"{path}: no reader recognises it")


def node_metadata(node, path: Path) -> MetaFiles | None:
    """Metadata files read once per host when the ranks of ``node`` (one host) each open
    their own ``path``: if every one of them sees the very same files (same reader, and
    per file the same resolved path, device, inode, size and modification time, or
    absent for all), the first reads them and broadcasts their bytes on ``node``
    (``shared_metadata``); otherwise None and each rank reads its own copy, so a rank
    whose copy is missing or differs fails as it would alone. Collective over ``node``:
    each rank's own checks never raise before the collectives."""
    mine = _metadata_identity(path)
    seen = node.allgather(mine)
    if mine is None or any(x != mine for x in seen):   # the same answer on every rank
        return None
    return shared_metadata(node, path, mine[0])


def _metadata_identity(path: Path) -> tuple | None:
    """(metadata file names, per file (real path, device, inode, size, mtime) or None
    when absent) of the reader recognising ``path``; None when none does or it cannot
    be told (this rank then reads its own and reports what is wrong)."""
    try:
        cls = next((c for c in READERS if path.exists() and c.recognise(path)), None)
        names = cls.metadata_names(path) if cls is not None else ()
        if not names:
            return None
        ids = []
        for n in names:
            p = path / n
            try:
                st = os.stat(p)
            except FileNotFoundError:
                ids.append(None)
                continue
            ids.append((os.path.realpath(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return names, tuple(ids)
    except Exception:  # noqa: BLE001 - never skip the collective the node's ranks wait in
        return None


def _name_map(where: Path, raw: bytes | None, key: str | None) -> dict[str, str]:
    """A JSON file mapping tensor names to file names (``key``: the mapping's field)."""
    if raw is None:
        raise CheckpointIOError(f"{where}: not found")
    doc = load_json(raw, str(where))
    if key is not None and not isinstance(doc, dict):
        raise FormatError(f"{where}: expected an object with '{key}', got {quote(doc)}")
    mapping = doc.get(key) if key is not None else doc
    if not isinstance(mapping, dict):
        field = f"'{key}'" if key is not None else "the file"
        raise FormatError(f"{where}: {field} must be an object mapping tensor names to file "
                          f"names, got {quote(mapping)}")
    for name, f in mapping.items():
        if not isinstance(f, str) or not f:
            raise FormatError(f"{where}: tensor {name!r} is mapped to {quote(f)}, "
                              "not a file name")
    for f in dict.fromkeys(mapping.values()):
        safe_join(where.parent, f, str(where))
    return mapping


def _complete(cls: type[SafetensorsReader], root: Path, files: list[str], desc: str,
              weight_map: dict | None = None, index_path: Path | None = None
              ) -> SafetensorsReader:
    reader = cls(root, "complete", files=tuple(files), description=desc)
    tensors: dict[str, TensorInfo] = {}
    entries = []
    for f in files:
        for name, e in reader.header(f).tensors.items():
            if weight_map is not None and weight_map.get(name) != f:
                continue  # the index is authoritative about where a tensor lives
            if name in tensors:
                raise FormatError(f"{root}: tensor {name!r} is stored twice ({f} and another file)")
            tensors[name] = TensorInfo(name, e.shape, e.dtype)
            entries.append((name, Box.full(e.shape), f))
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise FormatError(f"{index_path}: tensor {missing[0]!r} is mapped to "
                              f"{weight_map[missing[0]]} but that file does not hold it")
    reader.source = SourceIndex(tensors.values(), group_chunks(entries))
    return reader


def open_source(path: str | Path, strategy: Strategy | None, comm, prefix: str | None = None,
                lazy: bool = False, shared: bool = True) -> CheckpointReader:
    """``open_input``, except that a dry run simulating a job (``comm.simulated``) may
    plan a checkpoint that is not on this machine: when ``path`` does not exist it is
    taken to be what ``hpcckpt split`` writes for ``strategy`` (full, one file per rank),
    and no file is opened. ``shared``: every rank opens the same ``path``, so its
    metadata is read once and broadcast; else (node-local paths) once per host where
    the host's ranks provably see the same files (``node_metadata``)."""
    if not getattr(comm, "simulated", False) or Path(path).exists():
        if not shared and getattr(comm, "mpi", None) is not None and comm.size > 1:
            with comm.node() as node:
                meta = node_metadata(node, Path(path)) if node.size > 1 else None
            return open_input(path, strategy, lazy=lazy, meta=meta)
        return open_input(path, strategy, lazy=lazy, comm=comm if shared else None)
    if strategy is None:
        raise UsageError(f"{path}: does not exist; a simulated dry run of a checkpoint that is "
                         "not here needs --src-strategy")
    name = prefix or DEFAULT_PREFIX
    source = strategy_source(strategy, lambda r: rank_file_name(name, r))
    return SafetensorsReader(path, "distributed", source, (),
                             f"simulated, {strategy.world_size} ranks", strategy=strategy)
