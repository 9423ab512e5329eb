"""Training directories (storage/training.py) and the CheckpointManager in one process:
names, MindSpore's prefix suffix, records, rotation, cleanup, --step resolution, and
the messages word for word."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hpcckpt
from hpcckpt.errors import FormatError, UsageError
from hpcckpt.layout.box import Box
from hpcckpt.layout.yaml_io import strategy_from_dict
from hpcckpt.ops.save import CheckpointManager, synthetic_slice, synthetic_state
from hpcckpt.storage import training as tdir

FMT = "hpcckpt.strategy/1"


def one_rank():
    return strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": {
        "w": {"shape": [40, 3], "dtype": "F32"}, "b": {"shape": [], "dtype": "I64"},
        "e": {"shape": [0, 2], "dtype": "BF16"}, "h": {"shape": [5], "dtype": "F16"}}},
        where="s1.yaml")


def test_names_and_parse_step():
    assert tdir.step_file_name("llama", 0, 3, 1, 200) == "rank_3/llama_rank_3-1_200.safetensors"
    assert tdir.step_file_name("llama", 2, 3, 1, 200) == "rank_3/llama_rank_3_2-1_200.safetensors"
    assert tdir.record_name(7, 1, 200) == "commits/000007-1_200.json"
    assert tdir.parse_step("2_40") == (2, 40)
    with pytest.raises(UsageError) as e:
        tdir.parse_step("40")
    assert str(e.value) == "--step '40': expected EPOCH_STEP, e.g. 1_200"


def test_prefix_suffix_mindspore_rule():
    names = ["CKP_rank_0-1_10.safetensors", "meta.json", "CKP_rank_0-1_20.safetensors.partial"]
    assert tdir.prefix_suffix([], "CKP", 0) == 0
    assert tdir.prefix_suffix(names, "CKP", 0) == 1
    assert tdir.prefix_suffix(names + ["CKP_rank_0_1-1_30.safetensors"], "CKP", 0) == 2
    assert tdir.prefix_suffix(names + ["CKP_rank_0_4-1_30.safetensors"], "CKP", 0) == 5
    # another prefix, another rank, a partial alone: no suffix
    assert tdir.prefix_suffix(["CKPX_rank_0-1_1.safetensors", "CKP_rank_1-1_1.safetensors",
                               "CKP_rank_0-1_2.safetensors.partial"], "CKP", 0) == 0


def test_is_step_file_and_rotation():
    assert tdir.is_step_file("a_rank_0-1_2.safetensors")
    assert tdir.is_step_file("a_rank_0_3-1_2.safetensors.partial")
    assert tdir.is_step_file("a_rank_0_3-1_2.safetensors.0f3a9b2c.partial")
    assert not tdir.is_step_file("a_rank_0.safetensors")      # split/reshard output
    assert not tdir.is_step_file("meta.json")
    recs = [tdir.StepRecord(i, 1, i * 10, "p" if i != 2 else "q", 0, f"commits/{i}", ())
            for i in range(1, 6)]
    assert [r.sequence for r in tdir.to_rotate(recs, "p", 2)] == [1, 3]
    assert tdir.to_rotate(recs, "p", 0) == [] and tdir.to_rotate(recs, "p", 9) == []


def test_find_record_messages(tmp_path):
    with pytest.raises(FormatError) as e:
        tdir.find_record(tmp_path)
    assert str(e.value) == f"{tmp_path}: training directory has no committed step"
    with pytest.raises(UsageError) as e:
        tdir.step_path(tmp_path, "1_2")
    assert str(e.value) == (f"{tmp_path}: --step needs a training directory (one written by "
                            "hpcckpt save or a CheckpointManager)")
    (tmp_path / "commits").mkdir()
    (tmp_path / "commits" / "000001-1_2.json").write_text("{")
    with pytest.raises(FormatError) as e:
        tdir.list_records(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'commits' / '000001-1_2.json'}: commit record "
                                   "is not valid JSON: ")
    (tmp_path / "commits" / "000001-1_2.json").write_text('{"commit": {"epoch": 1}}')
    with pytest.raises(FormatError) as e:
        tdir.list_records(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'commits' / '000001-1_2.json'}: not a commit record "
                            "(KeyError: 'sequence')")


def state_at(s, step):
    return synthetic_state(s, 0, step)


def test_manager_one_process(tmp_path):
    s = one_rank()
    d = tmp_path / "out" / "checkpoint"
    with CheckpointManager(d, s, None, prefix="llama", keep_max=2, save_steps=2,
                           network_only=("w", "b")) as m:
        assert m.latest() is None
        saved = [m.save(state_at(s, k), 1, k, extra={"loss": k}) for k in range(1, 7)]
        assert saved == [False, True, False, True, False, True]
        assert m.latest() == (1, 6)
        assert m.save(state_at(s, 6), 1, 6) is False           # already committed
    assert sorted(os.listdir(d)) == ["commits", "latest", "rank_0", "strategy.yaml"]
    assert sorted(os.listdir(d / "rank_0")) == [
        "llama_rank_0-1_4.safetensors", "llama_rank_0-1_6.safetensors", "meta.json"]
    assert sorted(os.listdir(d / "commits")) == ["000002-1_4.json", "000003-1_6.json"]
    assert json.loads((d / "rank_0" / "meta.json").read_text()) == {
        "last_epoch": 1, "last_step": 6, "last_ckpt_file": "llama_rank_0-1_6.safetensors"}
    latest = json.loads((d / "latest").read_text())
    assert (latest["record"], latest["epoch"], latest["step"]) == ("commits/000003-1_6.json", 1, 6)
    rec = json.loads((d / "commits" / "000003-1_6.json").read_text())
    assert rec["commit"]["extra"] == {"loss": 6} and rec["redundancy"] == "full"
    for step in (None, (1, 4), "1_6"):
        want = 6 if step in (None, "1_6") else 4
        got = hpcckpt.load(str(d), s, None, step=step)
        for t, box in s.rank_boxes(0):
            assert got[t.name].tobytes() == synthetic_slice(t.name, t.dtype, t.shape, box,
                                                            want).tobytes(), (t.name, step)
    net = tmp_path / "out" / "checkpoint_network"
    assert sorted(os.listdir(net / "rank_0")) == [
        "llama_rank_0-1_4.safetensors", "llama_rank_0-1_6.safetensors", "meta.json"]
    net_s = strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": {
        "w": {"shape": [40, 3], "dtype": "F32"}, "b": {"shape": [], "dtype": "I64"}}})
    got = hpcckpt.load(str(net), net_s, None)
    assert set(got) == {"w", "b"} and got["w"].tobytes() == state_at(s, 6)["w"].tobytes()

    # a second run: MindSpore's suffix, rotation shared with the first run's steps
    (d / "rank_0" / "llama_rank_0-1_8.safetensors.partial").write_bytes(b"junk")
    (d / "rank_0" / "llama_rank_0-1_8.safetensors.1234abcd.partial").write_bytes(b"junk")
    (d / "rank_0" / "llama_rank_0-1_8.safetensors").write_bytes(b"uncommitted")
    (d / "rank_0" / "notes.txt").write_text("mine")
    with CheckpointManager(d, s, None, prefix="llama", keep_max=2) as m:
        assert m.latest() == (1, 6)
        assert sorted(os.listdir(d / "rank_0")) == [   # leftovers gone, other files kept
            "llama_rank_0-1_4.safetensors", "llama_rank_0-1_6.safetensors", "meta.json",
            "notes.txt"]
        m.save(state_at(s, 7), 1, 7)
    assert sorted(os.listdir(d / "rank_0")) == [
        "llama_rank_0-1_6.safetensors", "llama_rank_0_1-1_7.safetensors", "meta.json",
        "notes.txt"]
    assert hpcckpt.load(str(d), s, None)["w"].tobytes() == state_at(s, 7)["w"].tobytes()


def test_manager_refuses_bad_state(tmp_path):
    s = one_rank()
    m = CheckpointManager(tmp_path / "c", s, None)
    good = state_at(s, 1)
    cases = [
        ({k: v for k, v in good.items() if k != "w"},
         "rank 0: local_state lacks tensor 'w' (its box [0:40, 0:3])"),
        ({**good, "x": np.zeros(2)},
         "rank 0: local_state has tensor 'x' that the strategy does not describe"),
        ({**good, "w": np.zeros((40, 4), np.float32)},
         "rank 0: tensor 'w' is [40, 4] of 4-byte items (640 bytes) but the strategy gives this "
         "rank F32 [40, 3] at [0:40, 0:3] (480 bytes)"),
        ({**good, "h": b"\0" * 9},
         "rank 0: tensor 'h' is a buffer of 9 bytes but the strategy gives this rank F16 [5] at "
         "[0:5] (10 bytes)"),
    ]
    for state, msg in cases:
        with pytest.raises(FormatError) as e:
            m.save(state, 1, 1)
        assert str(e.value) == msg
    assert m.save({**good, "h": bytes(10)}, 1, 1)      # a plain buffer of the right size
    m.close()
    with pytest.raises(UsageError) as e:
        m.save(good, 1, 2)
    assert str(e.value) == "CheckpointManager is closed"
    with pytest.raises(UsageError) as e:
        CheckpointManager(tmp_path / "d", s, None, integrated=True, max_shard_size=0)
    assert str(e.value) == "max_shard_size must be a positive number of bytes, not 0"
    # one process: the integrated weights are the rank's own tensors, as merge writes them
    with CheckpointManager(tmp_path / "d", s, None, integrated=True) as mi:
        assert mi.save({**good, "h": bytes(10)}, 1, 1)
    out = tmp_path / "d" / "integrated" / "CKP-1_1"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    hpcckpt.merge(str(tmp_path / "d"), str(tmp_path / "merged"))
    assert (out / "model.safetensors").read_bytes() == \
        (tmp_path / "merged" / "model.safetensors").read_bytes()


def test_synthetic_slices_agree_with_the_whole():
    shape = (300, 7)
    full = synthetic_slice("t", "BF16", shape, Box.full(shape), 9)
    box = Box((100, 2), (150, 3))
    got = synthetic_slice("t", "BF16", shape, box, 9)
    assert got.tobytes() == full[100:250, 2:5].tobytes()
    assert full.view(np.uint8).reshape(-1)[0] == 9


def test_synthetic_column_slice_costs_its_own_bytes():
    """A column-split slice is drawn block by block into its own array: its peak is its
    bytes plus a few 1 MiB blocks, not the tensor's rows whole (the save benchmark's RSS
    bound)."""
    import tracemalloc
    shape, box = (4096, 1024), Box((0, 256), (4096, 256))        # 16 MiB tensor, 4 MiB slice
    tracemalloc.start()
    try:
        got = synthetic_slice("w", "F32", shape, box, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.nbytes == 4 << 20 and peak < got.nbytes + (4 << 20), peak   # rows: +16 MiB


def test_manager_adopts_strategy_copy_of_an_earlier_release(tmp_path):
    """Copies are JSON now; a directory begun when they were block YAML keeps its
    strategy.yaml for the same layout, and a new layout still gets strategy-<hash>.yaml."""
    from hpcckpt.layout.yaml_io import strategy_file_bytes, strategy_to_yaml
    s = one_rank()
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "strategy.yaml").write_text(strategy_to_yaml(s))
    with CheckpointManager(d, s, None, prefix="p") as m:
        m.save(state_at(s, 1), 1, 1)
    assert sorted(p.name for p in d.glob("strategy*")) == ["strategy.yaml"]
    assert hpcckpt.load(str(d), s, None)["h"].tobytes() == state_at(s, 1)["h"].tobytes()
    two = strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": {
        "h": {"shape": [5], "dtype": "F16"}}}, where="s2.yaml")
    with CheckpointManager(d, two, None, prefix="p") as m:
        m.save(state_at(two, 2), 1, 2)
    [other] = [p for p in d.glob("strategy-*.yaml")]
    assert other.read_bytes() == strategy_file_bytes(two) and other.read_text()[0] == "{"


def test_balanced_dedup_read_without_manifest(tmp_path):
    """A balanced de-duplicated checkpoint stores slabs; read without its manifest (as a
    MindSpore-style directory, given the strategy) the files' own metadata place them."""
    from safetensors.numpy import save_file
    tensors = {"w": {"shape": [1 << 20, 1], "dtype": "F32"},     # 4 MiB: divided in two
               "b": {"shape": [], "dtype": "I64"}, "h": {"shape": [5], "dtype": "F16"}}
    s2 = strategy_from_dict({"format": FMT, "mesh": {"dp": 2}, "tensors": {
        **tensors, "h": {**tensors["h"], "split": ["dp"]}}}, where="s2.yaml")
    one = strategy_from_dict({"format": FMT, "mesh": {"dp": 1}, "tensors": tensors})
    full = synthetic_state(one, 0, 3)
    save_file(full, str(tmp_path / "m.safetensors"))
    hpcckpt.split(str(tmp_path / "m.safetensors"), str(tmp_path / "d"), s2, dedup="balanced")
    (tmp_path / "d" / "manifest.json").unlink()
    slabs = [json.loads(safe_metadata(tmp_path / "d" / f"rank_{r}" / f"model_rank_{r}.safetensors")
                        ["hpcckpt"])["w"]["offsets"] for r in range(2)]
    # rank 0 also stores the scalar and the larger half of h: rank 1 gets 5 bytes more of w
    assert slabs == [[0, 0], [(1 << 19) + 1, 0]]
    got = hpcckpt.load(str(tmp_path / "d"), one, None, src_strategy=s2)
    for name in tensors:
        assert got[name].tobytes() == full[name].tobytes(), name


def safe_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


def _model_dir(root):
    """A small Hugging Face style directory: weights (not carried), config, tokenizer, a
    subdirectory, a hidden directory (not carried)."""
    (root / "1_Pooling").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "tokenizer.json").write_text('{"vocab": {}}')
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (root / ".git" / "HEAD").write_text("ref")
    return root


def test_manager_carries_a_model_directory_once(tmp_path):
    s = one_rank()
    hf = _model_dir(tmp_path / "hf")
    d = tmp_path / "out" / "checkpoint"
    want = {"1_Pooling/config.json", "config.json", "tokenizer.json"}
    with CheckpointManager(d, s, None, keep_max=0, hf_dir=hf, network_only=("w",)) as m:
        for k in (1, 2):
            m.save(state_at(s, k), 1, k)
    for root in (d, tmp_path / "out" / "checkpoint_network"):
        got = {p.relative_to(root / "model_files").as_posix(): p.read_bytes()
               for p in (root / "model_files").rglob("*") if p.is_file()}
        assert got == {n: (hf / n).read_bytes() for n in want}
        for rec in (root / "commits").iterdir():
            entries = json.loads(rec.read_text())["model_files"]
            assert sorted(entries) == sorted(want)
            assert entries["config.json"]["size"] == len('{"model_type": "bert"}')
    # a resumed run with the same directory: nothing to do (a killed run's temporary file
    # is removed); with a changed file: refused
    torn = d / "model_files" / "1_Pooling" / "config.json.4242-0badf00d.partial"
    torn.write_bytes(b'{"wor')
    with CheckpointManager(d, s, None, keep_max=0, hf_dir=hf) as m:
        assert not torn.exists()
        m.save(state_at(s, 3), 1, 3)
    old = json.loads((d / "commits" / "000001-1_1.json").read_text())["model_files"]
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UsageError) as e:
        CheckpointManager(d, s, None, hf_dir=hf)
    new = "xxh3_64:" + __import__("xxhash").xxh3_64_hexdigest(b'{"model_type": "gpt2"}')
    assert str(e.value) == (
        f"{d / 'model_files' / 'config.json'}: carried by an earlier run with other contents "
        f"(22 bytes, {old['config.json']['checksum']}; the model directory's is 22 bytes, "
        f"{new}); use a new training directory")
    assert (d / "model_files" / "config.json").read_text() == '{"model_type": "bert"}'
    with pytest.raises(UsageError) as e:
        CheckpointManager(tmp_path / "c2", s, None, hf_dir=hf / "config.json")
    assert str(e.value) == (f"hf_dir {hf / 'config.json'}: not a directory (give the model "
                            "directory whose config and tokenizer files to carry)")
    assert not (tmp_path / "c2").exists()


def test_one_manager_per_directory(tmp_path):
    """A second manager on a directory in use is refused before it cleans anything up:
    its cleanup would remove the first one's uncommitted step, its rotation its steps."""
    import subprocess
    import sys
    import textwrap
    s = one_rank()
    d = tmp_path / "c"
    strategy = tmp_path / "s.yaml"
    from hpcckpt.layout import write_strategy_yaml
    write_strategy_yaml(s, str(strategy))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, hpcckpt
        from hpcckpt.ops.save import CheckpointManager
        m = CheckpointManager({str(d)!r}, hpcckpt.load_strategy({str(strategy)!r}), None)
        print("open", flush=True)
        sys.stdin.readline()
        m.close()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        (d / "rank_0" / "CKP_rank_0-1_1.safetensors.0badf00d.partial").write_bytes(b"x")
        with pytest.raises(UsageError) as e:
            CheckpointManager(d, s, None)
        assert str(e.value).startswith(f"{d}: another job is writing this output directory "
                                       f"(hpcckpt save, pid {holder.pid} on ")
        assert (d / "rank_0" / "CKP_rank_0-1_1.safetensors.0badf00d.partial").exists()
    finally:
        holder.communicate("\n", timeout=60)
    with CheckpointManager(d, s, None) as m:      # the first one closed: free again
        with pytest.raises(UsageError) as e:
            CheckpointManager(d, s, None)
        assert str(e.value) == (f"{d}: another job is writing this output directory "
                                "(hpcckpt save in this process); wait for it to end or "
                                "choose another output directory")
        assert m.save(state_at(s, 1), 1, 1)
    assert not (d / "rank_0" / "CKP_rank_0-1_1.safetensors.0badf00d.partial").exists()
