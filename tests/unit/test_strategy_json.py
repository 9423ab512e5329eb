"""A checkpoint's strategy copy is a JSON document (YAML 1.2): PyYAML and json read the
writer's text alike, the reader parses it with json only when that gives exactly what
YAML gives (errors word for word), and a verify run of such a checkpoint never imports
PyYAML."""
from __future__ import annotations

import json
import subprocess
import sys
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpcckpt
from hpcckpt.errors import StrategyError
from hpcckpt.layout import yaml_io
from hpcckpt.layout.yaml_io import (strategy_file_bytes, strategy_from_dict,
                                    strategy_from_yaml_text, strategy_to_json_text,
                                    strategy_to_yaml)
from hpcckpt.ops.filecopy import CopyOptions

from helpers import clean_env, make_tensors, write_safetensors_file
from test_planning_props import strategies

FMT = "hpcckpt.strategy/1"
PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: names YAML would take for something else, or that need escapes in one or the other
ODD = ["it's", 'say "hi"', "back\\slash", "é.w", "日本語", "😀", "null", "true", "1e3", "- x",
       "#", "# c", "a: b", "", "~", "<<", "tab\tx", "nl\nx", "\x7f\x85\u2028\u2029\ufffe", "{x}",
       "[y]", "yes", "0x10", "&a", "*a", "!t", "%d", "@", "`", "|", ">", "'", "\\u0041"]


def make(mesh: dict, tensors: dict):
    return strategy_from_dict({"format": FMT, "mesh": mesh, "tensors": tensors}, where="s.yaml")


def renamed(s, names):
    doc = s.to_dict()
    doc["tensors"] = dict(zip(names, doc["tensors"].values()))
    return strategy_from_dict(doc, where="gen")


def yaml_only(text, where):
    """What strategy_from_yaml_text gave before checkpoints' copies were JSON."""
    with mock.patch.object(yaml_io, "_strategy_from_json", lambda text, where: None):
        return strategy_from_yaml_text(text, where)


def outcome(read, text):
    try:
        return read(text, "s.yaml")
    except StrategyError as e:
        return "StrategyError", str(e)
    except Exception as e:   # whatever YAML raises, the reader must raise too
        return type(e).__name__, str(e)


def assert_reads_alike(s, text):
    """yaml (libyaml's parser and PyYAML's own) and json read ``text`` alike, as the
    strategy's document (with JSON's string keys for box ranks), by json's fast path."""
    as_json = json.loads(json.dumps(s.to_dict()))
    assert yaml.load(text, Loader=yaml.CSafeLoader) == as_json
    assert yaml.load(text, Loader=yaml.SafeLoader) == as_json
    assert json.loads(text) == as_json
    assert yaml_io._strategy_from_json(text, "s.yaml") == s
    assert yaml_io._strategy_from_json(text.encode(), "s.yaml") == s
    assert yaml_only(text, "s.yaml") == s


@PROPS
@given(strategies(max_world=16), st.data())
def test_written_json_reads_alike_in_yaml_and_json(s, data):
    names = data.draw(st.lists(st.sampled_from(ODD) | st.text(max_size=12),
                               min_size=len(s.tensors), max_size=len(s.tensors), unique=True))
    s = renamed(s, names)
    text = strategy_to_json_text(s)
    if text is None:   # a name JSON cannot carry so that YAML reads it alike: block YAML
        assert any("\\/" in n or " " * 64 in n for n in names)
        assert strategy_file_bytes(s) == strategy_to_yaml(s).encode()
        assert yaml_only(strategy_file_bytes(s), "s.yaml") == s
        return
    assert strategy_file_bytes(s) == text.encode()
    assert_reads_alike(s, text)


def test_json_text_has_one_key_and_one_tensor_a_line():
    s = make({"dp": 2, "tp": 2}, {
        "w": {"shape": [4, 2], "dtype": "BF16", "split": ["tp", None]},
        "b": {"shape": [4], "dtype": "F32", "boxes": {3: {"offsets": [0], "sizes": [4]}}}})
    assert strategy_to_json_text(s) == (
        '{"format": "hpcckpt.strategy/1",\n'
        ' "mesh": {"dp": 2, "tp": 2},\n'
        ' "tensors": {\n'
        '  "w": {"shape": [4, 2], "dtype": "BF16", "split": ["tp", null]},\n'
        '  "b": {"shape": [4], "dtype": "F32", "boxes": {"3": {"offsets": [0], "sizes": [4]}}}\n'
        ' }}\n')
    assert strategy_to_json_text(make({}, {})) == \
        '{"format": "hpcckpt.strategy/1",\n "mesh": {},\n "tensors": {\n }}\n'
    assert_reads_alike(make({}, {}), strategy_to_json_text(make({}, {})))


def test_odd_names_and_mesh_axes_read_alike():
    names = [n for n in ODD]
    s = make({"null": 2, "1e3": 1, "- x": 1, "é": 1},
             {n: {"shape": [2], "dtype": "F32", "split": [["null", "1e3"]]} for n in names})
    text = strategy_to_json_text(s)
    assert "\\u2028" in text and "\\u007f" in text and "😀" in text   # escaped / kept raw
    assert_reads_alike(s, text)


@pytest.mark.parametrize("name", ["k" * 151, "a" + " " * 64 + "b", "a\\/b", "a\\ud83d",
                                  "a\ud800b"])
def test_names_json_cannot_carry_are_written_as_block_yaml(name):
    s = make({"tp": 2}, {name: {"shape": [2], "dtype": "F32", "split": ["tp"]}})
    assert strategy_to_json_text(s) is None
    assert strategy_file_bytes(s) == strategy_to_yaml(s).encode()
    if "\ud800" not in name:   # libyaml refuses the escape PyYAML writes for a surrogate
        assert strategy_from_yaml_text(strategy_file_bytes(s), "s.yaml") == s


def entry(split='["tp"]'):
    return f'{{"shape": [2], "dtype": "F32", "split": {split}}}'


def doc(tensors: str, mesh='{"tp": 2}') -> str:
    return f'{{"format": "{FMT}",\n "mesh": {mesh},\n "tensors": {{\n{tensors}\n }}}}\n'


ESCAPED_A = "\\u0041"
NOT_AN_AXIS = '["dp"]'
# JSON texts that YAML reads otherwise than json: the reader gives YAML's reading
YAML_READS_OTHERWISE = {
    "1e3 is a string to YAML 1.1": doc(f'  "w": {entry("[1e3]")}', mesh='{"1e3": 2}'),
    "float": doc(f'  "w": {entry("[1.5]")}'),
    "key too long for a YAML simple key": doc(f'  "{"k" * 1100}": {entry()}'),
    "key far from its colon": doc(f'  "w"{" " * 1100}: {entry()}'),
    "key and colon on two lines": doc(f'  "w"\n  : {entry()}'),
    "escaped surrogate pair": doc(f'  "\\ud83d\\ude00": {entry()}'),
    "raw line separator": doc(f'  "a\u2028b": {entry()}'),
    "raw next line": doc(f'  "a\x85b": {entry()}'),
    "raw DEL": doc(f'  "a\x7fb": {entry()}'),
    "tab": doc(f'  "w":\t{entry()}'),
    "duplicate tensor": doc(f'  "w": {entry()},\n  "w": {entry("null")}'),
    "duplicate mesh axis": doc(f'  "w": {entry()}', mesh='{"tp": 2, "tp": 1}'),
    "invalid JSON": doc(f'  "w": {entry()},'),
    "not a strategy": doc(f'  "w": {entry(NOT_AN_AXIS)}'),
    "NaN": doc(f'  "w": {entry("[NaN]")}'),
}


@pytest.mark.parametrize("text", YAML_READS_OTHERWISE.values(), ids=YAML_READS_OTHERWISE)
def test_json_yaml_reads_otherwise_is_read_by_yaml(text):
    assert yaml_io._strategy_from_json(text, "s.yaml") is None
    assert outcome(strategy_from_yaml_text, text) == outcome(yaml_only, text)
    assert outcome(strategy_from_yaml_text, text.encode()) == outcome(yaml_only, text.encode())


def test_longest_key_json_takes_reads_alike():
    """150 characters, each a 6-character escape, and 63 spaces before the ':': still
    within YAML's limit on a simple key."""
    text = doc(f'  "{ESCAPED_A * 150}"{" " * 63}: {entry()}')
    fast = yaml_io._strategy_from_json(text, "s.yaml")
    assert fast is not None and fast == yaml_only(text, "s.yaml")
    assert fast.tensors[0].name == "A" * 150


def test_duplicate_key_in_json_is_reported_as_before():
    text = doc(f'  "w": {entry()},\n  "w": {entry("null")}')
    with pytest.raises(StrategyError) as e:
        strategy_from_yaml_text(text, "s.yaml")
    assert str(e.value) == "s.yaml: duplicate key 'w' at line 5 (first at line 4)"


def test_valid_json_yaml_reads_otherwise_gives_yaml_strategy():
    """YAML 1.1 reads 1e3 as the axis name "1e3": a valid strategy json would refuse."""
    text = YAML_READS_OTHERWISE["1e3 is a string to YAML 1.1"]
    assert strategy_from_yaml_text(text, "s.yaml") == \
        make({"1e3": 2}, {"w": {"shape": [2], "dtype": "F32", "split": ["1e3"]}})


@st.composite
def hostile_json(draw):
    """A strategy as JSON text, spelt in any of the ways json allows, then perhaps
    mutated into something YAML reads otherwise, or not at all."""
    s = draw(strategies(max_world=8))
    names = draw(st.lists(st.sampled_from(ODD) | st.text(max_size=6) | st.sampled_from(
        ["k" * 149, "k" * 150, "k" * 151, "😀" * 150, "\u2028" * 150]),
        min_size=len(s.tensors), max_size=len(s.tensors), unique=True))
    d = json.loads(json.dumps(s.to_dict()))
    d["tensors"] = dict(zip(names, d["tensors"].values()))
    if draw(st.booleans()):
        text = strategy_to_json_text(renamed(s, names)) or json.dumps(d)
    else:
        text = json.dumps(d, ensure_ascii=draw(st.booleans()),
                          indent=draw(st.sampled_from([None, 0, 1, "\t", " " * 70])),
                          separators=draw(st.sampled_from([None, (",", ":"), (" ,", " : ")])))
    mutation = draw(st.sampled_from(["none", "none", "number", "colon", "truncate", "crlf",
                                     "duplicate", "lead"]))
    if mutation == "number":
        token = draw(st.sampled_from(["1e3", "1E3", "1.5e3", "1.0e+3", "2.0", "-0", "NaN",
                                      "Infinity", "1" + "0" * 5000, "true", "null"]))
        at = draw(st.sampled_from([p for p in ("2", "0", "1", "null") if p in text] or ["{"]))
        text = text.replace(at, token, 1) if at != "{" else text
    elif mutation == "colon":
        sep = draw(st.sampled_from(["\n:", " " * 63 + ":", " " * 64 + ":", "\t:", "\n  :"]))
        text = text.replace('":', '"' + sep, 1)
    elif mutation == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif mutation == "crlf":
        text = text.replace("\n", "\r\n")
    elif mutation == "duplicate":
        text = text.replace("{", '{"format": "x", ', 1)
    elif mutation == "lead":
        text = draw(st.sampled_from([" \n", "\t", "\ufeff", "# c\n", "---\n"])) + text
    return text


@PROPS
@given(hostile_json())
def test_reader_gives_what_yaml_gives_on_any_json(text):
    assert outcome(strategy_from_yaml_text, text) == outcome(yaml_only, text)
    raw = text.encode("utf-8", "surrogatepass")
    assert outcome(strategy_from_yaml_text, raw) == outcome(yaml_only, raw)


def test_block_yaml_copies_still_read():
    s = make({"tp": 2}, {"w": {"shape": [2], "dtype": "F32", "split": ["tp"]}})
    assert yaml_io._strategy_from_json(strategy_to_yaml(s), "s.yaml") is None
    assert strategy_from_yaml_text(strategy_to_yaml(s).encode(), "s.yaml") == s


NO_YAML = """\
import sys
from hpcckpt.cli.main import main
status = main(sys.argv[2:])
assert status == 0, status
assert ("yaml" in sys.modules) == (sys.argv[1] == "yaml-imported"), sorted(sys.modules)
"""


@pytest.mark.timeout(120)
def test_verify_of_a_json_strategy_copy_never_imports_yaml(tmp_path):
    tensors = {"w": ([4, 2], "F32")}
    (tmp_path / "hf").mkdir()
    write_safetensors_file(tmp_path / "hf" / "model.safetensors", make_tensors(tensors, seed=1),
                           {"w": "F32"})
    s = make({"tp": 2}, {"w": {"shape": [4, 2], "dtype": "F32", "split": ["tp", None]}})
    dist = tmp_path / "dist"
    hpcckpt.split(str(tmp_path / "hf"), str(dist), s,
                  options=CopyOptions(fsync=False, progress=False))
    assert (dist / "strategy.yaml").read_bytes() == strategy_to_json_text(s).encode()

    def verify(expect: str):
        p = subprocess.run([sys.executable, "-c", NO_YAML, expect, "verify", str(dist)],
                           env=clean_env(), capture_output=True, text=True, timeout=100)
        assert p.returncode == 0, p.stdout + p.stderr
    verify("no-yaml")
    # a checkpoint written before the copies were JSON: read by YAML, as before
    (dist / "strategy.yaml").write_text(strategy_to_yaml(s))
    verify("yaml-imported")
