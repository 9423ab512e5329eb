"""One report for a failure on many ranks: every failing rank named, each message once."""
from __future__ import annotations

from hpcckpt.errors import RankFailure, format_failures, rank_list


def test_rank_list():
    assert rank_list([3]) == "rank 3"
    assert rank_list([0, 1]) == "ranks 0, 1"
    assert rank_list([0, 1, 2, 5, 7, 8, 9]) == "ranks 0-2, 5, 7-9"
    assert rank_list(list(range(1024))) == "ranks 0-1023"


def test_same_message_on_every_rank_is_said_once():
    f = {r: "a.safetensors: file not found" for r in range(8)}
    assert format_failures(f) == "ranks 0-7: a.safetensors: file not found"
    assert str(RankFailure("copy", f)) == "ranks 0-7: a.safetensors: file not found"


def test_distinct_messages_grouped_in_rank_order():
    f = {4: "b", 0: "a", 2: "a", 5: "c", 1: "b"}
    assert format_failures(f) == "ranks 0, 2: a; ranks 1, 4: b; rank 5: c"


def test_many_distinct_messages_are_counted():
    f = {r: f"rank_{r}/x.safetensors: truncated" for r in range(6)}
    assert format_failures(f) == (
        "rank 0: rank_0/x.safetensors: truncated; rank 1: rank_1/x.safetensors: truncated; "
        "rank 2: rank_2/x.safetensors: truncated; ranks 3-5 failed with 3 other message(s) "
        "(--debug prints every rank's)")
    details = RankFailure("plan", f).details().splitlines()
    assert details[5] == "rank 5: rank_5/x.safetensors: truncated"
