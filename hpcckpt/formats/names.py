"""The checkpoint layout's names, spelled once.

A distributed checkpoint::

    out/
      strategy.yaml                       STRATEGY_FILE
      manifest.json                       MANIFEST (written last: its presence means complete)
      rank_<r>/<prefix>_rank_<r>.safetensors   rank_file_name(prefix, r)

A training directory (``CheckpointManager``, ``hpcckpt save``) keeps several steps::

    out/
      strategy.yaml
      rank_<r>/<prefix>_rank_<r>[_<n>]-<epoch>_<step>.safetensors   step_file_name(...)
      rank_<r>/meta.json                  MS_META, after each commit
      commits/<seq>-<epoch>_<step>.json   TRAINING_RECORDS, record_name(...): the commit
      latest                              TRAINING_LATEST, replaced after each commit

Complete HF weights carry ``model.safetensors.index.json`` (HF_INDEX) beside their
shards; MindSpore's merged output carries ``param_name_map.json`` (MS_NAME_MAP) and
``hyper_param.safetensors`` (MS_HYPER_PARAMS: epoch/step, read from the source's
``rank_0/meta.json``, MS_META). Checksums are
``xxh3_64:<16 hex digits>`` (CHECKSUM_PREFIX).
"""
from __future__ import annotations

import re

import xxhash

MANIFEST = "manifest.json"
STRATEGY_FILE = "strategy.yaml"
HF_INDEX = "model.safetensors.index.json"
MS_NAME_MAP = "param_name_map.json"
MS_META = "meta.json"
MS_HYPER_PARAMS = "hyper_param.safetensors"
CHECKSUM_PREFIX = "xxh3_64:"
DEFAULT_PREFIX = "model"
#: a distributed checkpoint's copy of its model directory's non-weight files
MODEL_FILES_DIR = "model_files"
TRAINING_RECORDS = "commits"
TRAINING_LATEST = "latest"


def checksum_of(data) -> str:
    """The recorded checksum of bytes held whole: ``xxh3_64:<16 hex digits>``."""
    return CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(data)

#: a rank directory's name, ``rank_<r>``
RANK_DIR = re.compile(r"^rank_(\d+)$")
#: an HF shard's file name
HF_SHARD = re.compile(r"^model-\d{5}-of-\d{5}.*\.safetensors$")
#: a path inside a rank directory, ``rank_<r>/...``
_RANK_DIR_PATH = re.compile(r"^rank_(\d+)/")


def hf_shard_name(i: int, n: int, suffix: str = "") -> str:
    """Shard ``i`` (from 0) of ``n`` of complete HF weights: ``model.safetensors`` alone,
    else ``model-0000<i+1>-of-0000<n>.safetensors`` (``suffix`` before the extension)."""
    sfx = f"_{suffix}" if suffix else ""
    return f"model{sfx}.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}{sfx}.safetensors"


def ms_part_name(i: int, suffix: str = "") -> str:
    """Part ``i`` of MindSpore's merged output: ``part<i>.safetensors``."""
    return f"part{i}{'_' + suffix if suffix else ''}.safetensors"


def rank_dir_name(rank: int) -> str:
    """``rank_<r>``: the directory of rank ``r``'s files."""
    return f"rank_{rank}"


def rank_file_name(prefix: str, rank: int) -> str:
    """``rank_<r>/<prefix>_rank_<r>.safetensors``, relative to the checkpoint root."""
    return f"{rank_dir_name(rank)}/{prefix}_rank_{rank}.safetensors"


def rank_dir_of(rel_path: str) -> int | None:
    """The ``r`` of a relative path under ``rank_<r>/``, or None outside rank directories."""
    m = _RANK_DIR_PATH.match(rel_path)
    return int(m.group(1)) if m else None


def step_file_name(prefix: str, suffix: int, rank: int, epoch: int, step: int) -> str:
    """A training save's rank file, ``rank_<r>/<prefix>_rank_<r>[_<suffix>]-<epoch>_<step>
    .safetensors`` (MindSpore Transformers' naming; ``_<suffix>`` when the prefix was
    already used in the directory)."""
    tail = f"_{suffix}" if suffix else ""
    return f"{rank_dir_name(rank)}/{prefix}_rank_{rank}{tail}-{epoch}_{step}.safetensors"


def record_name(sequence: int, epoch: int, step: int) -> str:
    """A training step's commit record, ``commits/<seq>-<epoch>_<step>.json``."""
    return f"{TRAINING_RECORDS}/{sequence:06d}-{epoch}_{step}.json"
