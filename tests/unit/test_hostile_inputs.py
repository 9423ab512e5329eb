"""Hostile inputs (issue 8, items 8, 9 and 13): alias bombs, absurd meshes and shapes,
deeply nested JSON, wrong types, duplicate keys and trailing bytes. Each is refused
early with one line naming the file, messages asserted word for word; none may run
out of memory or run for ever (the timeouts below are the test)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from hpcckpt.errors import FormatError, StrategyError, quote
from hpcckpt.layout.yaml_io import read_strategy_yaml
from hpcckpt.storage.inputs import open_input
from hpcckpt.formats.safetensors import build_header, read_header

HEAD = "format: hpcckpt.strategy/1\n"


def strategy_error(tmp_path: Path, text: str) -> str:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(StrategyError) as e:
        read_strategy_yaml(p)
    return str(e.value).replace(str(p), "s.yaml")


# ---- item 8: alias bombs, absurd meshes and shapes ---------------------------------
def alias_bomb(levels: int = 40) -> str:
    """2**levels leaves if expanded (a 'billion laughs' in YAML)."""
    lines = ["x0: &x0 [1, 1]"]
    lines += [f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(20)
def test_alias_bomb_as_shape_is_quoted_truncated(tmp_path):
    text = HEAD + alias_bomb() + "mesh: {tp: 2}\ntensors:\n  w: {shape: *x39, dtype: F32}\n"
    assert strategy_error(tmp_path, text) == (
        "s.yaml: tensor 'w': 'shape' must be a list of integers, got "
        "[[[...], [...]], [[...], [...]]]")


@pytest.mark.timeout(20)
def test_alias_bomb_elsewhere_is_quoted_truncated(tmp_path):
    text = (HEAD + alias_bomb() + "mesh: {tp: 2}\ntensors:\n"
            "  w: {shape: [4], dtype: F32, split: [*x39]}\n")
    assert strategy_error(tmp_path, text) == (
        "s.yaml: tensor 'w': split[0] must be null, an axis name or a list of axis names, "
        "got [[[...], [...]], [[...], [...]]]")
    text = HEAD + alias_bomb() + "mesh: {tp: *x39}\ntensors: {}\n"
    assert strategy_error(tmp_path, text) == (
        "s.yaml: mesh axis 'tp' has size [[[...], [...]], [[...], [...]]]; "
        "sizes must be positive integers")


@pytest.mark.timeout(20)
def test_absurd_mesh_is_refused_before_anything_iterates(tmp_path):
    text = HEAD + "mesh: {dp: 1000, pp: 1000, tp: 1000}\ntensors:\n  w: {shape: [4], dtype: F32}\n"
    assert strategy_error(tmp_path, text) == (
        "s.yaml: mesh {'dp': 1000, 'pp': 1000, 'tp': 1000} has 1000000000 ranks; "
        "at most 1048576 are supported")


@pytest.mark.timeout(20)
def test_absurd_shapes_are_refused(tmp_path):
    text = (HEAD + "mesh: {tp: 2}\ntensors:\n"
            "  w: {shape: [1000000000000, 1000000000000], dtype: F32}\n")
    assert strategy_error(tmp_path, text) == (
        "s.yaml: tensor 'w': F32 [1000000000000, 1000000000000] would hold "
        "4000000000000000000000000 bytes; at most 9223372036854775807 are supported")
    text = HEAD + "mesh: {tp: 2}\ntensors:\n  w: {shape: [" + ", ".join(["1"] * 65) \
        + "], dtype: F32}\n"
    assert strategy_error(tmp_path, text) == (
        "s.yaml: tensor 'w': shape [1, 1, 1, 1, 1, 1, ...] has 65 dimensions; "
        "at most 64 are supported")


def test_wrong_types_where_names_are_expected(tmp_path):
    text = HEAD + "mesh: {tp: 2}\ntensors:\n  w: {shape: [4], dtype: [F32]}\n"
    assert strategy_error(tmp_path, text).startswith(
        "s.yaml: tensor 'w': unknown dtype ['F32'] (known: BOOL")
    text = HEAD + "mesh: {tp: 2}\ntensors:\n  w: {shape: [4], dtype: F32, zero: [tp]}\n"
    assert strategy_error(tmp_path, text) == (
        "s.yaml: tensor 'w': unknown zero axis ['tp'] (mesh axes: tp)")


def test_quote_cuts_long_strings_and_deep_nesting():
    assert quote("a" * 200) == "'" + "a" * 27 + "..." + "a" * 28 + "'"
    assert len(quote(list(range(10**6)))) <= 80
    deep: list = []
    for _ in range(10**5):
        deep = [deep]
    assert quote(deep) == "[[[...]]]"


# ---- item 13: duplicate keys, trailing bytes ----------------------------------------
def test_duplicate_tensor_keys_in_strategy_yaml(tmp_path):
    text = (HEAD + "mesh: {tp: 2}\ntensors:\n  w: {shape: [4, 4], dtype: F32, split: [tp, null]}\n"
            "  b: {shape: [4], dtype: F32}\n  w: {shape: [4, 4], dtype: F32}\n")
    assert strategy_error(tmp_path, text) == "s.yaml: duplicate key 'w' at line 6 (first at line 4)"
    text = HEAD + "mesh: {tp: 2, tp: 4}\ntensors: {}\n"
    assert strategy_error(tmp_path, text) == \
        "s.yaml: duplicate key 'tp' at line 2 (first at line 2)"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = (HEAD + "base: &b {shape: [4], dtype: F32}\nmesh: {tp: 2}\n"
            "tensors:\n  w: {<<: *b, dtype: F16}\n")
    p = tmp_path / "s.yaml"
    p.write_text(text)
    assert read_strategy_yaml(p).spec("w").dtype == "F16"


def raw_file(path: Path, header: bytes, data: bytes) -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_duplicate_keys_in_a_safetensors_header(tmp_path):
    h = (b'{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
         b'"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}')
    p = raw_file(tmp_path / "d.safetensors", h, b"abcd")
    with pytest.raises(FormatError) as e:
        read_header(p)
    assert str(e.value) == f"{p}: header has the key 'w' twice"
    h = b'{"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'
    p = raw_file(tmp_path / "m.safetensors", h, b"ab")
    with pytest.raises(FormatError) as e:
        read_header(p)
    assert str(e.value) == f"{p}: header has the key 'a' twice"


def test_trailing_bytes_after_the_data_region(tmp_path):
    head, _ = build_header([("w", "U8", (4,))])
    p = tmp_path / "t.safetensors"
    p.write_bytes(head + b"abcd" + b"junk!")
    with pytest.raises(FormatError) as e:
        read_header(p)
    assert str(e.value) == (f"{p}: 5 byte(s) after the last tensor's data (the data region "
                            "is 9 bytes, its tensors end at 4)")
    empty, _ = build_header([])
    p.write_bytes(empty + b"x")
    with pytest.raises(FormatError) as e:
        read_header(p)
    assert str(e.value) == (f"{p}: 1 byte(s) after the last tensor's data (the data region "
                            "is 1 bytes, its tensors end at 0)")
    p.write_bytes(head + b"abcd")
    assert read_header(p).tensors["w"].nbytes == 4


# ---- item 9: deep nesting and wrong types in header, index, manifest ----------------
DEEP = b"[" * 100_000 + b"]" * 100_000


def _entry(dtype="U8", shape="[2]", offs="[0,2]", extra=""):
    return f'{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offs}{extra}}}'


#: headers (JSON text) over a data region of 4 bytes: valid ones, each defect the
#: checks name, and the duplicate keys a colon count must not miss
HEADERS = [
    '{"w":' + _entry() + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"__metadata__":{"hpcckpt":"{\\"w\\":{\\"shape\\":[2]}}","a:b":"c:d"},"w:x":'
    + _entry(shape="[4]", offs="[0,4]") + '}',
    '{"w":' + _entry() + ',"w":' + _entry(shape="[4]", offs="[0,4]") + '}',
    '{"w":' + _entry(shape="[4]", offs="[0,4]", extra=',"dtype":"U8"') + '}',
    '{"__metadata__":{"a":"1","a":"2"},"w":' + _entry(shape="[4]", offs="[0,4]") + '}',
    '{"w":' + _entry(shape='[{"a":1,"a":2}]', offs="[0,4]") + '}',
    '{"w":' + _entry(shape="[4]", offs="[0,4]", extra=',"x":{"a":1,"a":2}') + '}',
    '{"w":' + _entry(shape="[4]", offs="[0,4]", extra=',"x":"a:b","x":"c"') + '}',
    '{"a:b":' + _entry() + ',"a\\u003Ab":' + _entry(offs="[2,4]") + '}',
    '{"a:b":' + _entry() + ',"a\\u003ac":' + _entry(offs="[2,4]") + '}',
    '{"a":' + _entry() + ',"\\u0061":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(shape="[true, 2]") + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(shape="[2.0]") + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(shape="[-2, -1]") + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(shape="{}", offs="[0,1]") + ',"v":' + _entry(shape="[3]", offs="[1,4]") + '}',
    '{"w":' + _entry(shape='""', offs="[0,1]") + ',"v":' + _entry(shape="[3]", offs="[1,4]") + '}',
    '{"w":' + _entry(shape='["ab", 2]') + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(offs='"ab"') + '}',
    '{"w":' + _entry(offs="[0, 2.0]") + ',"v":' + _entry(offs="[2,4]") + '}',
    '{"w":' + _entry(offs="[false, 2]") + '}',
    '{"w":' + _entry(offs="[0, 2, 4]") + '}',
    '{"w":' + _entry(offs="[3, 5]") + '}',
    '{"w":' + _entry(shape="[3]") + '}',
    '{"w":' + _entry(dtype="X9") + '}',
    '{"w":{"dtype":["U8"],"shape":[4],"data_offsets":[0,4]}}',
    '{"w":{"shape":[4],"data_offsets":[0,4]}}',
    '{"w":[1]}',
    '{"w":' + _entry(shape="[4]", offs="[0,4]") + ',"v":' + _entry(shape="[2]", offs="[0,2]") + '}',
    '{"w":' + _entry() + '}',
    '{"w":' + _entry(shape="[]", offs="[0,1]") + ',"v":' + _entry(shape="[0, 5]", offs="[1,1]")
    + ',"u":' + _entry(shape="[3]", offs="[1,4]") + '}',
    '{"__metadata__":{"a":1},"w":' + _entry(shape="[4]", offs="[0,4]") + '}',
    '[1, 2]',
    '{"w": nope}',
    '{"w":' + _entry(shape="[4]", offs="[0,4]") + ',"w":' + _entry(shape="[4]", offs="[0,4]")
    + ',"\\u0077":' + _entry(shape="[4]", offs="[0,4]") + '}',
]


def _outcome(raw: bytes):
    from hpcckpt.formats.safetensors import parse_header
    try:
        h = parse_header("h", raw, 8 + len(raw) + 4)
    except FormatError as e:
        return str(e)
    return h.data_start, dict(h.tensors), dict(h.metadata)


def test_header_fast_paths_agree_with_the_checked_path(monkeypatch):
    """The hook-free JSON decode and the few-operation entry check give exactly what
    the hook and the step-by-step checks give: entries, or the same error word for
    word; and the fast decode is taken for ordinary headers only."""
    from hpcckpt.formats import safetensors as st
    raws = [h.encode() for h in HEADERS] + [HEADERS[0].encode("utf-16"), b"{\"w\xff\":1}"]
    fast = [_outcome(r) for r in raws]
    took = [st._plain_json(r) is not None for r in raws]
    monkeypatch.setattr(st, "_plain_json", lambda raw: None)
    monkeypatch.setattr(st, "_plain_entry", lambda t, data_len: None)
    assert [_outcome(r) for r in raws] == fast
    assert sum(isinstance(o, tuple) for o in fast) == 5     # the valid ones
    assert fast[2:9] == [f"h: header has the key {k!r} twice"
                         for k in ("w", "dtype", "a", "a", "a", "x", "a:b")]
    # ordinary headers, colons in names and metadata included, skip the hook (the entry
    # defects too); a doubled key anywhere, an escaped colon, another encoding never do
    assert took == [True, True] + [False] * 9 + [True] * 20 + [False] * 5


@pytest.mark.timeout(20)
def test_deeply_nested_header(tmp_path):
    p = raw_file(tmp_path / "n.safetensors", b'{"w":' + DEEP + b"}", b"")
    with pytest.raises(FormatError) as e:
        read_header(p)
    assert str(e.value) == f"{p}: header is nested too deeply to be valid"


def hf_dir(tmp_path: Path, index: bytes) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    head, _ = build_header([("w", "F32", (2,))])
    (d / "model-00001-of-00001.safetensors").write_bytes(head + np.zeros(2, np.float32).tobytes())
    (d / "model.safetensors.index.json").write_bytes(index)
    return d


@pytest.mark.timeout(20)
@pytest.mark.parametrize("index,message", [
    (b'{"weight_map": ' + DEEP + b"}", "is nested too deeply to be valid"),
    (b'{"weight_map": {"w": 5}}', "tensor 'w' is mapped to 5, not a file name"),
    (b'{"weight_map": {"w": ["a", "b"]}}', "tensor 'w' is mapped to ['a', 'b'], not a file name"),
    (b'{"weight_map": ["w"]}',
     "'weight_map' must be an object mapping tensor names to file names, got ['w']"),
    (b'[1, 2]', "expected an object with 'weight_map', got [1, 2]"),
    (b'{"weight_map": {"w": "model-00001-of-00001.safetensors", '
     b'"w": "model-00001-of-00001.safetensors"}}', "has the key 'w' twice"),
])
def test_bad_hf_index(tmp_path, index, message):
    d = hf_dir(tmp_path, index)
    with pytest.raises(FormatError) as e:
        open_input(d)
    assert str(e.value) == f"{d / 'model.safetensors.index.json'}: {message}"


def test_bad_ms_name_map(tmp_path):
    d = tmp_path / "ms"
    d.mkdir()
    (d / "param_name_map.json").write_text(json.dumps({"w": {"file": "part0.safetensors"}}))
    with pytest.raises(FormatError) as e:
        open_input(d)
    assert str(e.value) == (f"{d / 'param_name_map.json'}: tensor 'w' is mapped to "
                            "{'file': 'part0.safetensors'}, not a file name")


# ---- a FIFO (or another non-regular file) where a checkpoint file belongs ------------
@pytest.fixture(scope="module")
def small_dist(tmp_path_factory) -> Path:
    import hpcckpt
    from hpcckpt.ops.filecopy import CopyOptions
    from hpcckpt.layout.yaml_io import strategy_from_dict
    from helpers import make_tensors, write_safetensors_file
    root = tmp_path_factory.mktemp("fifo")
    tensors = {"w": ([6, 4], "F32"), "b": ([6], "F32")}
    (root / "hf").mkdir()
    write_safetensors_file(root / "hf" / "model.safetensors", make_tensors(tensors, seed=3),
                           {n: dt for n, (_, dt) in tensors.items()})
    s = strategy_from_dict({"format": "hpcckpt.strategy/1", "mesh": {"dp": 2, "tp": 2},
                            "tensors": {"w": {"shape": [6, 4], "dtype": "F32", "split": ["tp"]},
                                        "b": {"shape": [6], "dtype": "F32", "zero": "dp"}}},
                           where="s")
    hpcckpt.split(str(root / "hf"), str(root / "dist"), s,
                  options=CopyOptions(fsync=False, progress=False))
    return root


def _fifo_in_place(dist: Path, rel: str) -> None:
    import os
    (dist / rel).unlink()
    os.mkfifo(dist / rel)


@pytest.mark.parametrize("rel, args, expected", [
    ("rank_0/model_rank_0.safetensors", ["verify", "{d}", "--quick"],
     "header: rank_0/model_rank_0.safetensors: cannot read: not a regular file (a FIFO) "
     "(rank 0)"),
    ("rank_0/model_rank_0.safetensors", ["merge", "{d}", "{o}", "--no-fsync"],
     "hpcckpt merge: error: rank 0: {d}/rank_0/model_rank_0.safetensors: cannot read: not a "
     "regular file (a FIFO)"),
    ("manifest.json", ["verify", "{d}", "--quick"],
     "manifest: manifest.json: cannot read: not a regular file (a FIFO) (rank 0)"),
    ("manifest.json", ["inspect", "{d}"],
     "hpcckpt inspect: error: rank 0: {d}/manifest.json: cannot read: not a regular file "
     "(a FIFO)"),
    ("strategy.yaml", ["merge", "{d}", "{o}", "--no-fsync"],
     "hpcckpt merge: error: rank 0: {d}/strategy.yaml: cannot read: not a regular file "
     "(a FIFO)"),
])
def test_a_fifo_for_a_checkpoint_file_is_refused_not_waited_on(small_dist, tmp_path, rel,
                                                                args, expected):
    # opening a FIFO blocks until someone writes to it: every command used to hang here
    import shutil
    from helpers import run_cli
    d = Path(shutil.copytree(small_dist / "dist", tmp_path / "dist"))
    _fifo_in_place(d, rel)
    fill = {"d": str(d), "o": str(tmp_path / "out")}
    p = run_cli([a.format(**fill) for a in args], timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert expected.format(**fill) in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "out").exists()


def test_a_fifo_in_the_model_directory_is_named(small_dist, tmp_path):
    import os
    import shutil
    from helpers import run_cli
    hf = Path(shutil.copytree(small_dist / "hf", tmp_path / "hf"))
    os.mkfifo(hf / "tokenizer.json")
    shutil.copy(small_dist / "dist" / "strategy.yaml", tmp_path / "s.yaml")
    p = run_cli(["split", hf, tmp_path / "out", "--strategy", tmp_path / "s.yaml",
                 "--no-fsync"], timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.strip() == (f"hpcckpt split: error: rank 0: {hf}/tokenizer.json: cannot "
                                "carry it: not a regular file (a FIFO); remove it from the "
                                "model directory")
