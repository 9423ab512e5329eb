"""Training directories (SPEC 2.2): several saved steps side by side, as MindSpore
Transformers writes them, each step committed by its own record.

```
DIR/
  rank_<r>/{prefix}_rank_<r>[_<n>]-{epoch}_{step}.safetensors   one file per rank and step
  rank_<r>/meta.json          {"last_epoch", "last_step", "last_ckpt_file"}, after each commit
  commits/<seq>-{epoch}_{step}.json   the step's commit record: a manifest (chunks, checksums,
                              files) plus "commit": {epoch, step, sequence, prefix, suffix}
  strategy.yaml               the layout (strategy-<hash>.yaml when a later run changed it)
  latest                      {"record", "epoch", "step", ...}, replaced after each commit
```

A step is committed once its record exists; the record is written last, atomically, after
every rank file is complete and renamed. Readers take the committed record with the
highest sequence number (``latest`` is a pointer for people and job scripts, repaired by
the next manager). ``_<n>`` is the prefix suffix MindSpore adds when the directory
already holds files of the prefix (see ``prefix_suffix``).

Names are spelled in ``formats.names``; here: parsing, choosing, small atomic updates.
No MPI.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointIOError, FormatError, UsageError
from ..formats.names import (MS_META, TRAINING_LATEST, TRAINING_RECORDS, rank_dir_name,
                             record_name, step_file_name)
from ..formats.safetensors import read_regular
from .atomic import PARTIAL, atomic_write_json, fsync_dir

RECORDS, LATEST, META = TRAINING_RECORDS, TRAINING_LATEST, MS_META
LATEST_FORMAT = "hpcckpt.latest/1"
_STEP_FILE = re.compile(r"^(?P<prefix>.+)_rank_(?P<rank>\d+)(?:_(?P<suffix>\d+))?"
                        r"-(?P<epoch>\d+)_(?P<step>\d+)\.safetensors$")
_RECORD = re.compile(r"^(?P<seq>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.json$")
_STEP_ARG = re.compile(r"^(\d+)_(\d+)$")


@dataclass(frozen=True, order=True)
class StepRecord:
    """A committed step, as its record says.

    Attributes:
        sequence: commit number in this directory (1, 2, ...): the newest is the latest.
        epoch, step: the training position saved.
        prefix: the name prefix given to the manager; suffix: MindSpore's ``_<n>`` (0: none).
        path: the record, relative to the directory (``commits/<seq>-<epoch>_<step>.json``).
        files: every rank file of the step, relative to the directory.
    """

    sequence: int
    epoch: int
    step: int
    prefix: str
    suffix: int
    path: str
    files: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.epoch}_{self.step}"


def parse_step(text: str) -> tuple[int, int]:
    """``"EPOCH_STEP"`` (e.g. ``"1_200"``) -> (1, 200)."""
    m = _STEP_ARG.match(str(text))
    if not m:
        raise UsageError(f"--step {text!r}: expected EPOCH_STEP, e.g. 1_200")
    return int(m.group(1)), int(m.group(2))


def is_training_dir(path: str | Path) -> bool:
    """A directory written by a CheckpointManager (it has ``commits/`` or ``latest``)."""
    p = Path(path)
    return p.is_dir() and ((p / RECORDS).is_dir() or (p / LATEST).is_file())


def is_record_path(path: str | Path) -> bool:
    """``DIR/commits/<seq>-<epoch>_<step>.json``: one committed step."""
    p = Path(path)
    return p.parent.name == RECORDS and bool(_RECORD.match(p.name))


def step_path(directory: str | Path, step: tuple[int, int] | str | None) -> str:
    """What to open for ``--step``: the step's record in a training directory (which every
    reader accepts as the checkpoint); ``directory`` itself when ``step`` is None."""
    if step is None:
        return str(directory)
    if not is_training_dir(directory):
        raise UsageError(f"{directory}: --step needs a training directory (one written by "
                         "hpcckpt save or a CheckpointManager)")
    return str(Path(directory) / find_record(directory, step).path)


def commit_fields(doc: dict, where: str) -> dict:
    """The ``"commit"`` object of a record, checked."""
    try:
        c = doc["commit"]
        out = {"sequence": int(c["sequence"]), "epoch": int(c["epoch"]), "step": int(c["step"]),
               "prefix": str(c["prefix"]), "suffix": int(c.get("suffix", 0))}
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: not a commit record ({type(e).__name__}: {e})") from None
    return out


def list_records(directory: str | Path) -> list[StepRecord]:
    """Every committed step in ``directory``, oldest first (by sequence)."""
    d = Path(directory) / RECORDS
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    for name in names:
        if not _RECORD.match(name):
            continue  # e.g. a record being written (*.partial): not committed
        path = d / name
        try:
            doc = json.loads(read_regular(path))
        except FileNotFoundError:
            continue  # rotated away meanwhile
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: commit record is not valid JSON: {e}") from None
        except OSError as e:   # e.g. not a regular file
            raise FormatError(f"{path}: commit record cannot be read: {e.strerror or e}") \
                from None
        c = commit_fields(doc, str(path))
        files = doc.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise FormatError(f"{path}: commit record has no list of files")
        out.append(StepRecord(c["sequence"], c["epoch"], c["step"], c["prefix"], c["suffix"],
                              f"{RECORDS}/{name}", tuple(files)))
    out.sort()
    return out


def find_record(directory: str | Path, step: tuple[int, int] | str | None = None,
                records: list[StepRecord] | None = None) -> StepRecord:
    """The latest committed step, or the newest commit of ``step`` (``(epoch, step)`` or
    ``"EPOCH_STEP"``)."""
    if isinstance(step, str):
        step = parse_step(step)
    recs = list_records(directory) if records is None else records
    if not recs:
        raise FormatError(f"{directory}: training directory has no committed step")
    if step is None:
        return recs[-1]
    hits = [r for r in recs if (r.epoch, r.step) == tuple(step)]
    if not hits:
        have = ", ".join(r.label for r in recs)
        raise UsageError(f"{directory}: no committed step {step[0]}_{step[1]} "
                         f"(committed: {have})")
    return hits[-1]


def prefix_suffix(names: Iterable[str], prefix: str, rank: int) -> int:
    """MindSpore's rule for a prefix already used in a rank directory.

    MindSpore's ModelCheckpoint (``_chg_ckpt_file_name_if_same_exist``), given the
    stem ``{prefix}_rank_<r>`` that MindSpore Transformers passes it, looks for files
    starting with the stem: ``stem-...`` counts as suffix 0, ``stem_<n>-...`` as n; the
    new run then writes ``stem_<max+1>-{epoch}_{step}``. Returns 0 when the stem is unused.
    """
    stem = f"{prefix}_rank_{rank}"
    used = -1
    for name in names:
        if name.endswith(PARTIAL):   # a temporary file says nothing about earlier runs
            continue
        m = _STEP_FILE.match(name)
        if m and m.group("prefix") == prefix and int(m.group("rank")) == rank:
            used = max(used, int(m.group("suffix") or 0))
        elif name.startswith(stem + "-"):
            used = max(used, 0)
    return used + 1


_TEMP = re.compile(r"(\.[0-9a-f]+)?" + re.escape(PARTIAL) + "$")


def is_step_file(name: str) -> bool:
    """A rank file of a training save, or a temporary one (``<file>[.<token>].partial``):
    what cleanup may remove."""
    return bool(_STEP_FILE.match(_TEMP.sub("", name)))


def leftovers(directory: str | Path, rank_dir: int, referenced: set[str]) -> list[Path]:
    """Training-save files in ``rank_<rank_dir>/`` that no committed record names (an
    uncommitted step, a rotated step whose files outlived its record, partial files)."""
    d = Path(directory) / rank_dir_name(rank_dir)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [d / n for n in names
            if is_step_file(n) and f"{rank_dir_name(rank_dir)}/{n}" not in referenced]


def to_rotate(records: list[StepRecord], prefix: str, keep_max: int) -> list[StepRecord]:
    """Committed steps of ``prefix`` (any suffix: a resumed run shares the budget of
    the run it resumed) beyond the newest ``keep_max``; other prefixes are left alone."""
    if keep_max is None or keep_max <= 0:
        return []
    mine = [r for r in records if r.prefix == prefix]
    return mine[:-keep_max] if len(mine) > keep_max else []


def write_latest(directory: str | Path, rec: StepRecord, fsync: bool = True) -> None:
    atomic_write_json(Path(directory) / LATEST,
                      {"format": LATEST_FORMAT, "record": rec.path, "sequence": rec.sequence,
                       "epoch": rec.epoch, "step": rec.step, "prefix": rec.prefix,
                       "suffix": rec.suffix}, fsync)


def read_latest(directory: str | Path) -> dict | None:
    """The ``latest`` pointer, or None when absent or unreadable (it is only a pointer)."""
    try:
        doc = json.loads(read_regular(Path(directory) / LATEST))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == LATEST_FORMAT else None


def write_meta(directory: str | Path, rank: int, epoch: int, step: int, file_name: str,
               fsync: bool = True) -> None:
    """``rank_<r>/meta.json`` as MindSpore Transformers writes it (after the commit)."""
    atomic_write_json(Path(directory) / rank_dir_name(rank) / META,
                      {"last_epoch": epoch, "last_step": step,
                       "last_ckpt_file": os.path.basename(file_name)}, fsync)


def remove_paths(paths: Iterable[str | Path], fsync: bool = True) -> None:
    """Unlink files (missing ones are fine); with ``fsync`` the removals are durable."""
    dirs = set()
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointIOError(f"{p}: cannot remove: {e.strerror or e}") from None
        dirs.add(os.path.dirname(str(p)) or ".")
    if fsync:
        for d in sorted(dirs):
            fsync_dir(d)
