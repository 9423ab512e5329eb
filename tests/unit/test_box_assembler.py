"""BoxAssembler: received boxes assembled in memory, or piece by piece when full."""
from __future__ import annotations

import numpy as np

from hpcckpt.layout.box import Box
from hpcckpt.ops.route_exec import BoxAssembler, copy_route
from hpcckpt.planning.routes import Route, RoutePlan
from hpcckpt.planning.runs import strided_runs
from hpcckpt.layout.tensor import TensorInfo
from hpcckpt.planning.sources import SourceChunk
from hpcckpt.storage.chunkio import copy_runs

T = TensorInfo("w", (4, 6), "F32")
FULL = np.arange(24, dtype=np.float32).reshape(4, 6)
LEFT = SourceChunk(Box((0, 0), (4, 3)), ("rank_0/a",))
RIGHT = SourceChunk(Box((0, 3), (4, 3)), ("rank_1/b",))
TOP, BOTTOM = Box((0, 0), (2, 6)), Box((2, 0), (2, 6))


def route(chunk: SourceChunk, dst: Box, provider: int) -> Route:
    return Route(T, 0, chunk.box.intersect(dst), chunk, dst, provider, 0)


def sub_bytes(sub: Box) -> np.ndarray:
    return np.ascontiguousarray(FULL[sub.offsets[0]:sub.offsets[0] + sub.sizes[0],
                                     sub.offsets[1]:sub.offsets[1] + sub.sizes[1]]).view(np.uint8).reshape(-1)


def run(cap: int) -> tuple[np.ndarray, dict]:
    """Rank 0 writes TOP and BOTTOM; left halves are local, right halves arrive from
    rank 1, interleaved: half of TOP, all of BOTTOM, the rest of TOP."""
    out = {TOP: np.zeros(48, np.uint8), BOTTOM: np.zeros(48, np.uint8)}
    calls = {"pieces": 0, "boxes": 0}

    def write_piece(r, sub, data, base):
        calls["pieces"] += 1
        copy_runs(strided_runs(sub, sub, r.dst_box, 4), data, base, out[r.dst_box], 0)

    def write_box(key, arr):
        calls["boxes"] += 1
        out[key[1]][:] = arr

    def read(r, sub, buf, base):
        memoryview(buf)[base:base + sub.volume * 4] = sub_bytes(sub)

    def read_into(r, arr):
        copy_runs(strided_runs(r.region, r.region, r.dst_box, 4), sub_bytes(r.region), 0, arr, 0)

    local = [route(LEFT, TOP, 0), route(LEFT, BOTTOM, 0)]
    remote = [route(RIGHT, TOP, 1), route(RIGHT, BOTTOM, 1)]
    asm = BoxAssembler(RoutePlan(0, {}, {1: remote}, local), cap, read_into, write_piece,
                       write_box, read, 64)
    assert asm.plan.local == []  # both boxes receive bytes: their local halves wait
    top_rows = [Box((0, 3), (1, 3)), Box((1, 3), (1, 3))]
    for r, sub in [(remote[0], top_rows[0]), (remote[1], remote[1].region),
                   (remote[0], top_rows[1])]:
        asm.write(r, sub, sub_bytes(sub), 0)
    asm.check_done()
    return np.concatenate([out[TOP], out[BOTTOM]]), calls


def test_both_boxes_assembled_when_they_fit():
    got, calls = run(cap=96)
    assert got.tobytes() == FULL.tobytes()
    assert calls == {"pieces": 0, "boxes": 2}


def test_second_box_piece_by_piece_when_the_first_fills_the_cap():
    got, calls = run(cap=48)
    assert got.tobytes() == FULL.tobytes()
    assert calls == {"pieces": 2, "boxes": 1}  # BOTTOM: its local half, then the remote one


def _assemble(routes_in_order, local, cap: int):
    """Rank 0 receives ``routes_in_order`` (each whole, in that order) after ``local``;
    returns the bytes of TOP and BOTTOM and every buffer handed to write_box."""
    out = {TOP: np.zeros(48, np.uint8), BOTTOM: np.zeros(48, np.uint8)}
    boxes, pieces = [], []

    def write_piece(r, sub, data, base):
        pieces.append(sub)
        copy_runs(strided_runs(sub, sub, r.dst_box, 4), data, base, out[r.dst_box], 0)

    def write_box(key, arr):
        boxes.append(arr)
        out[key[1]][:] = arr

    def read(r, sub, buf, base):
        memoryview(buf)[base:base + sub.volume * 4] = sub_bytes(sub)

    def read_into(r, arr):
        copy_runs(strided_runs(r.region, r.region, r.dst_box, 4), sub_bytes(r.region), 0, arr, 0)

    asm = BoxAssembler(RoutePlan(0, {}, {1: list(routes_in_order)}, local), cap, read_into,
                       write_piece, write_box, read, 64)
    for r in asm.plan.local:
        copy_route(r, read, write_piece, bytearray(64))
    for r in routes_in_order:
        asm.write(r, r.region, sub_bytes(r.region), 0)
    asm.check_done()
    return np.concatenate([out[TOP], out[BOTTOM]]), boxes, pieces


def test_assembly_buffer_reused_for_the_next_box_of_that_size():
    """TOP is complete before BOTTOM's first bytes arrive: BOTTOM is assembled in
    TOP's buffer (no fresh allocation), and both land intact."""
    local = [route(LEFT, TOP, 0), route(LEFT, BOTTOM, 0)]
    got, boxes, pieces = _assemble([route(RIGHT, TOP, 1), route(RIGHT, BOTTOM, 1)], local, 96)
    assert got.tobytes() == FULL.tobytes()
    assert len(boxes) == 2 and boxes[0] is boxes[1] and pieces == []


def test_contiguous_routes_are_written_straight_not_assembled():
    """Boxes whose routes are row blocks of them (contiguous spans) are written piece by
    piece from the received bytes, however much room the assembler has."""
    rows = [SourceChunk(Box((0, 0), (1, 6)), ("rank_0/a",)),
            SourceChunk(Box((1, 0), (3, 6)), ("rank_1/b",))]
    local = [route(rows[0], TOP, 0)]
    remote = [route(rows[1], TOP, 1), route(rows[1], BOTTOM, 1)]
    got, boxes, pieces = _assemble(remote, local, 1 << 20)
    assert got.tobytes() == FULL.tobytes()
    assert boxes == [] and pieces == [Box((0, 0), (1, 6)), Box((1, 0), (1, 6)), BOTTOM]
