"""manifest.json format 2 (compact, file sizes) and its validation (issue 8 items 9, 12;
issue 9 item 8): chunks laid out by the strategy are not listed, replicas share one
entry, format 1 is still read, and a manifest that disagrees with itself or its strategy
is refused with one line naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import hpcckpt
from hpcckpt.errors import FormatError
from hpcckpt.ops.common import build_manifest
from hpcckpt.ops.filecopy import CopyOptions
from hpcckpt.planning.dedup import plan_dedup
from hpcckpt.planning.outputs import rank_files
from hpcckpt.storage.inputs import open_input
from hpcckpt.storage.manifest import read_manifest
from hpcckpt.formats.safetensors import build_header

OPTS = CopyOptions(fsync=False, progress=False)
STRATEGY = {"format": "hpcckpt.strategy/1", "mesh": {"dp": 2, "tp": 2},
            "tensors": {"a": {"shape": [8, 6], "dtype": "F32", "split": ["tp", None]},
                        "b": {"shape": [6], "dtype": "I32", "zero": "dp"},
                        "c": {"shape": [3, 4], "dtype": "F16"}}}
SHAPES = {"a": ((8, 6), np.float32), "b": ((6,), np.int32), "c": ((3, 4), np.float16)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("manifest")
    head, _ = build_header([(n, {np.float32: "F32", np.int32: "I32", np.float16: "F16"}[t], s)
                            for n, (s, t) in SHAPES.items()])
    with open(d / "model.safetensors", "wb") as f:
        f.write(head)
        for s, t in SHAPES.values():
            f.write((np.arange(np.prod(s)) % 100).astype(t).tobytes())
    s = hpcckpt.strategy_from_dict(STRATEGY)
    out = {"complete": d / "model.safetensors"}
    for name, dedup in (("full", False), ("dedup", True)):
        hpcckpt.split(str(d / "model.safetensors"), str(d / name), s, dedup=dedup, options=OPTS)
        out[name] = d / name
    return out


def raw(dist: Path) -> dict:
    return json.loads((dist / "manifest.json").read_text())


def test_format_2_lists_no_chunk_the_strategy_gives(ckpts):
    doc = raw(ckpts["full"])
    assert doc["format"] == "hpcckpt.manifest/2" and doc["checksum"] == "xxh3_64"
    assert doc["files"] == [f"rank_{r}/model_rank_{r}.safetensors" for r in range(4)]
    assert doc["file_sizes"] == [(ckpts["full"] / f).stat().st_size for f in doc["files"]]
    # a: 2 distinct boxes (tp), each on both dp replicas; b: 2 (zero over dp) on both tp
    # replicas; c: 1 box on all 4 ranks: one 16-digit checksum per distinct box
    assert {n: (sorted(t), len(t["xxh3"]) // 16) for n, t in doc["tensors"].items()} == {
        "a": (["dtype", "shape", "xxh3"], 2), "b": (["dtype", "shape", "xxh3"], 2),
        "c": (["dtype", "shape", "xxh3"], 1)}
    dedup = raw(ckpts["dedup"])
    holders = plan_dedup(hpcckpt.strategy_from_dict(STRATEGY)).owners()   # split's dedup=True
    s = hpcckpt.strategy_from_dict(STRATEGY)
    for n, t in dedup["tensors"].items():
        assert t["holders"] == [holders[(n, b)] for b, _ in s.chunks(n)], n


def test_chunks_meeting_a_box_equal_the_decoded_ones(ckpts):
    """A planner asks for the chunks meeting one box (decoding only those, by their
    position in the strategy's chunk order); a dedup manifest (holders) decodes every
    chunk. Either way: the same chunks, files, checksums and order as decoding all."""
    from hpcckpt.layout.box import Box
    for kind in ("full", "dedup"):
        for name, (shape, _) in SHAPES.items():
            whole = open_input(str(ckpts[kind]), lazy=True).source
            decoded = whole.chunks(name)
            for offs in np.ndindex(*[n + 1 for n in shape]):
                box = Box(offs, tuple(max(1, (n - o) // 2) for n, o in zip(shape, offs)))
                fresh = open_input(str(ckpts[kind]), lazy=True).source
                assert fresh.overlapping(name, box) == whole.overlapping(name, box) == [
                    (c, c.box.intersect(box)) for c in decoded if c.box.intersect(box)]


def test_expanded_equals_every_stored_entry(ckpts):
    """Decoded chunks name exactly the entries the rank files hold, with their bytes'
    checksums (what format 1 listed one by one)."""
    import xxhash

    from hpcckpt.formats.safetensors import read_header
    for kind in ("full", "dedup"):
        dist = ckpts[kind]
        got = read_manifest(dist).expanded()
        assert got["format"] == "hpcckpt.manifest/1"
        listed = sorted((n, c["file"], tuple(c["offsets"]), c["checksum"])
                        for n, t in got["tensors"].items() for c in t["chunks"])
        stored = []
        meta_of = {}
        for f in raw(dist)["files"]:
            h = read_header(dist / f)
            desc = json.loads(h.metadata["hpcckpt"])
            meta_of[f] = desc
            with open(dist / f, "rb") as fh:
                data = fh.read()
            for n, e in h.tensors.items():
                if e.nbytes:
                    stored.append((n, f, tuple(desc[n]["offsets"]),
                                   "xxh3_64:" + xxhash.xxh3_64_hexdigest(data[e.begin:e.end])))
        assert listed == sorted(stored), kind


def test_format_1_is_still_read(ckpts, tmp_path):
    """A checkpoint written before format 2 (its manifest lists every chunk) reads and
    merges exactly as before."""
    old = tmp_path / "old"
    shutil.copytree(ckpts["dedup"], old)
    doc = read_manifest(old).expanded()
    (old / "manifest.json").write_text(json.dumps(doc))
    m = read_manifest(old)
    assert m.version == 1 and m.file_sizes is None and not m.needs_layout
    hpcckpt.merge(str(old), str(tmp_path / "hf"), options=OPTS)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = load_file(str(ckpts["complete"]))
    assert {n: a.tobytes() for n, a in got.items()} == {n: a.tobytes() for n, a in want.items()}


def test_replicas_with_different_checksums_are_listed(ckpts):
    """Derivation is checked when writing: chunks that are not what the strategy gives
    (here replicas recording different checksums) are listed, replicas sharing a row."""
    s = hpcckpt.strategy_from_dict(STRATEGY)
    files = rank_files(s, "model")
    sums = {(fi, ei): "xxh3_64:" + f"{fi:016x}" for fi, f in enumerate(files)
            for ei in range(len(f.entries))}
    doc = build_manifest(s, files, sums, False, "model").to_dict()
    assert "chunks" in doc["tensors"]["c"]
    assert doc["tensors"]["c"]["chunks"] == [[[0, 0], [3, 4], [r], f"xxh3_64:{r:016x}"]
                                             for r in range(4)]
    same = {k: "xxh3_64:" + "ab" * 8 for k in sums}
    doc = build_manifest(s, files, same, False, "model").to_dict()
    assert doc["tensors"]["c"] == {"shape": [3, 4], "dtype": "F16", "xxh3": "ab" * 8}


def damaged(ckpts, tmp_path, change, kind="full") -> tuple[Path, str]:
    out = tmp_path / "bad"
    shutil.copytree(ckpts[kind], out)
    doc = raw(out)
    change(doc)
    (out / "manifest.json").write_text(json.dumps(doc))
    return out, str(out / "manifest.json")


CASES = {
    "world 3": (lambda d: d.update(world_size=3),
                "world_size 3 disagrees with {root}/strategy.yaml, which has 4 ranks"),
    "world -1": (lambda d: d.update(world_size=-1),
                 "'world_size' must be a positive integer of at most 1048576, got -1"),
    "world 10**12": (lambda d: d.update(world_size=10**12),
                     "'world_size' must be a positive integer of at most 1048576, "
                     "got 1000000000000"),
    "world str": (lambda d: d.update(world_size="4"),
                  "'world_size' must be a positive integer of at most 1048576, got '4'"),
    "redundancy": (lambda d: d.update(redundancy="some"),
                   "'redundancy' is 'some'; expected 'full' or 'dedup'"),
    "files int": (lambda d: d["files"].__setitem__(1, 7),
                  "'files' must be a list of file names, got ['rank_0/model_rank_0.safetensors', "
                  "7, 'rank_2/model_rank_2.safetensors', 'ra..."),
    "sizes short": (lambda d: d["file_sizes"].pop(),
                    "'file_sizes' must give each of the 4 files its size in bytes, got "),
    "xxh3 short": (lambda d: d["tensors"]["a"].update(xxh3="00"),
                   "tensor 'a': 'xxh3' must hold 2 checksums of 16 hex digits, one per chunk "
                   "of the strategy, got '00'"),
    "deep": (lambda d: d["tensors"]["a"].update(xxh3=_deep(50_000)), None),
    "explicit file index": (lambda d: d["tensors"].__setitem__(
        "c", {"shape": [3, 4], "dtype": "F16", "chunks": [[[0, 0], [3, 4], [9], "x"]]}),
        "malformed manifest: tensor 'c': ValueError: file index 9 is not one of the 4 files"),
    "explicit file name": (lambda d: d["tensors"].__setitem__(
        "c", {"shape": [3, 4], "dtype": "F16", "chunks": [[[0, 0], [3, 4], ["x"], "x"]]}),
        "malformed manifest: tensor 'c': ValueError: file index 'x' is not one of the 4 files"),
    "dtype": (lambda d: d["tensors"]["c"].update(dtype="F32"),
              "tensor 'c': is F32 [3, 4] but F16 [3, 4] in the checkpoint's strategy "
              "strategy.yaml"),
}


def _deep(n: int):
    x: list = []
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_manifest_defects_named(ckpts, tmp_path, case):
    change, message = CASES[case]
    if case == "deep":   # json.dumps cannot write it: write the text itself
        bad = tmp_path / "bad"
        shutil.copytree(ckpts["full"], bad)
        text = (bad / "manifest.json").read_text()
        (bad / "manifest.json").write_text(text.replace('"tensors": {', '"tensors": {"z": '
                                                        + "[" * 100_000 + "]" * 100_000 + ", "))
        where = str(bad / "manifest.json")
        message = "is nested too deeply to be valid"
    else:
        bad, where = damaged(ckpts, tmp_path, change)
    with pytest.raises(FormatError) as e:
        open_input(bad)
    got = str(e.value)
    want = f"{where}: " + message.format(root=bad)
    if case == "sizes short":
        assert got.startswith(want)
    else:
        assert got == want


def test_dedup_holder_outside_the_replicas(ckpts, tmp_path):
    def change(d):
        d["tensors"]["c"]["holders"] = [5]
    bad, where = damaged(ckpts, tmp_path, change, "dedup")
    with pytest.raises(FormatError) as e:
        open_input(bad)
    assert str(e.value) == (f"{where}: tensor 'c': holder 5 of chunk [0:3, 0:4] is not one of "
                            "its replica ranks")


def test_missing_strategy_file(ckpts, tmp_path):
    bad, where = damaged(ckpts, tmp_path, lambda d: None)
    (bad / "strategy.yaml").unlink()
    with pytest.raises(FormatError) as e:
        open_input(bad)
    assert str(e.value) == (f"{bad / 'strategy.yaml'}: not found, and {where} gives its "
                            "tensors' chunks by it")


def test_given_strategy_with_the_recorded_digest_is_used(ckpts, monkeypatch):
    """A job that passes the checkpoint's own strategy does not parse it again."""
    from hpcckpt.storage import inputs
    calls = []
    real = inputs.strategy_from_yaml_text
    monkeypatch.setattr(inputs, "strategy_from_yaml_text",
                        lambda *a: calls.append(a[1]) or real(*a))
    s = hpcckpt.strategy_from_dict(STRATEGY)
    assert open_input(ckpts["full"], s).strategy is s and calls == []
    other = hpcckpt.strategy_from_dict({**STRATEGY, "mesh": {"dp": 4, "tp": 1}})
    assert open_input(ckpts["full"], other).strategy is other
    assert calls == [str(ckpts["full"] / "strategy.yaml")]
