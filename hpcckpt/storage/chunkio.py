"""Execute byte runs: positioned reads from stored chunks, writes into outputs or memory.

Dumb on purpose: given ``StridedRuns`` from the planner, copy exactly those bytes. Reads
of many small runs become reads of their span (in slabs of a few MiB) plus a numpy
strided copy; writes of many small runs into a file are merged into their span in
windows (read, scatter, write), so nothing larger than a window is ever resident.

Buffers are anything writable with the buffer protocol (``bytearray``, numpy arrays).
numpy is imported only for strided copies of short runs: a split, merge or node-local
reshard whose runs are contiguous or long never loads it (see hpcckpt.dtypes for why
start-up matters).
"""
from __future__ import annotations

import os

import xxhash

from ..errors import FormatError
from ..formats.names import CHECKSUM_PREFIX
from ..layout.box import Box
from ..layout.tensor import TensorInfo
from ..planning.runs import StridedRuns
from ..planning.sources import SourceChunk
from .fileio import pread_into, pwrite_all
from .reader import CheckpointReader

WRITE_RUN = 1 << 10         #: runs this long are written one pwrite each
SMALL_RUN = 256 << 10       #: with sparse spans, runs this long are read one by one
SCRATCH_CAP = 4 << 20       #: span read at once for smaller runs (stays in the CPU cache)
#: runs this long, when they fill at least half their source span, are scattered into
#: place by ``preadv`` (gaps land in a junk buffer). From page cache on a 2-core VM:
#: preadv 3.9 / 6.6 GiB/s vs span read + numpy copy 5.3 / 6.2 GiB/s at 2 / 8 KiB runs.
#: It saves the second copy and keeps numpy out of a merge of column-split tensors.
SCATTER_RUN = 4 << 10
JUNK_CAP = 1 << 20          #: a wider gap ends one preadv and starts the next
#: memory-to-memory runs this long are copied one slice at a time; shorter ones by a
#: numpy strided copy (8 KiB runs: 8-10 GiB/s by slices, 16 GiB/s by numpy, but numpy
#: costs 0.13 s to import, the time to copy 1.5 GiB by slices)
LONG_RUN = 4 << 10


def strided_view(buf, base: int, length: int, counts, strides):
    """A (counts..., length) uint8 numpy view of ``buf`` starting at ``base``."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    return as_strided(arr[base:], shape=(*counts, length), strides=(*strides, 1), writeable=True)


def copy_runs(sr: StridedRuns, src, src_base: int, dst, dst_base: int) -> None:
    """Copy ``sr`` between two byte buffers (offsets in ``sr`` are relative to the bases)."""
    if sr.length == 0:
        return
    lo, hi = sr.src_span()
    dlo, dhi = sr.dst_span()
    assert src_base + hi <= len(src) and dst_base + dhi <= len(dst), (sr, len(src), len(dst))
    if not sr.counts:
        memoryview(dst)[dst_base + dlo:dst_base + dhi] = memoryview(src)[src_base + lo:src_base + hi]
        return
    if sr.length >= LONG_RUN:   # one slice copy per run; no numpy import
        smv, dmv, n = memoryview(src), memoryview(dst), sr.length
        for so, do in zip(*sr.offsets()):
            dmv[dst_base + do:dst_base + do + n] = smv[src_base + so:src_base + so + n]
        return
    d = strided_view(dst, dst_base + sr.dst_start, sr.length, sr.counts, sr.dst_strides)
    s = strided_view(src, src_base + sr.src_start, sr.length, sr.counts, sr.src_strides)
    d[...] = s


def slabs(sr: StridedRuns, max_span: int) -> list[StridedRuns]:
    """Split ``sr`` along its outer grid dimensions so each part's source span fits."""
    lo, hi = sr.src_span()
    if hi - lo <= max_span or not sr.counts:
        return [sr]
    c0, s0, d0 = sr.counts[0], sr.src_strides[0], sr.dst_strides[0]
    rest = (sr.counts[1:], sr.src_strides[1:], sr.dst_strides[1:])
    ilo, ihi = StridedRuns(sr.src_start, sr.dst_start, sr.length, *rest).src_span()
    inner = ihi - ilo
    if inner <= max_span:
        per = max(1, (max_span - inner) // max(1, s0) + 1)
        return [StridedRuns(sr.src_start + i * s0, sr.dst_start + i * d0, sr.length,
                            (min(per, c0 - i), *sr.counts[1:]), sr.src_strides, sr.dst_strides)
                for i in range(0, c0, per)]
    out = []
    for i in range(c0):
        out.extend(slabs(StridedRuns(sr.src_start + i * s0, sr.dst_start + i * d0, sr.length,
                                     *rest), max_span))
    return out


class ChunkReader:
    """Reads planned runs of stored chunks through a ``CheckpointReader``'s
    ``read_region`` (a directory path stands for its safetensors files).

    A region stored contiguously is read straight into the caller's buffer, and so is
    each run of at least ``SMALL_RUN`` bytes; runs of at least ``SCATTER_RUN`` that are
    dense in their span are scattered into it by one read with many views (``preadv``
    for files). Smaller runs are read with their span, in slabs of at most
    ``SCRATCH_CAP`` bytes, into a scratch buffer (allocated on first use) and gathered by
    a numpy strided copy: a few MiB that stay in the CPU cache, whatever
    ``scratch_bytes`` asks for above that.

    A chunk whose source records a checksum (``SourceChunk.checksums``) is verified when
    this reader's reads of it, in order, cover it whole: its bytes are hashed as they
    land in the caller's buffer (xxh3 runs at memory speed) and a mismatch fails the read
    naming file, tensor and chunk. Chunks read out of order or only in part are counted
    (``verify_counts``), not verified.
    """

    def __init__(self, source: "str | CheckpointReader", scratch_bytes: int = 16 << 20):
        if isinstance(source, (str, os.PathLike)):
            from .inputs import SafetensorsReader
            source = SafetensorsReader(source)
        self.source = source
        self.scratch_bytes = max(1 << 16, min(scratch_bytes, SCRATCH_CAP))
        self._scratch: bytearray | None = None
        self._junk_buf: memoryview | None = None
        self.bytes_read = 0
        #: (file, tensor) -> (bytes hashed in order, hasher), or None once out of order
        self._hashing: dict[tuple[str, str], tuple[int, object] | None] = {}
        self.chunks_verified = 0

    @property
    def scratch(self) -> bytearray:
        if self._scratch is None:
            self._scratch = bytearray(self.scratch_bytes)
        return self._scratch

    def read(self, chunk: SourceChunk, t: TensorInfo, sr: StridedRuns, out,
             out_base: int = 0, replica: int = 0) -> None:
        """Copy ``sr`` (source offsets relative to the tensor's stored data) into ``out``."""
        if sr.length == 0:
            return
        self.bytes_read += sr.nbytes
        self._read(chunk.files[replica], t, chunk.box, sr, out, out_base)
        if chunk.checksums and chunk.checksums[replica]:
            self._verify(chunk, t, replica, sr, out, out_base)

    def verify_counts(self) -> dict[str, int]:
        """Chunks with a recorded checksum: verified, and read only in part (or out of
        order), so not verified by this reader."""
        return {"chunks_verified": self.chunks_verified, "chunks_read_in_part": len(self._hashing)}

    def _verify(self, chunk: SourceChunk, t: TensorInfo, replica: int, sr: StridedRuns, out,
                out_base: int) -> None:
        key = (chunk.files[replica], t.name)
        state = self._hashing.get(key, (0, None))
        if state is None:
            return
        done, h = state
        lo, hi = sr.src_span()
        if lo != done or hi - lo != sr.nbytes:   # not the next bytes of the chunk
            self._hashing[key] = None
            return
        h = h or xxhash.xxh3_64()
        mv, n = memoryview(out), sr.length
        if not sr.counts:
            h.update(mv[out_base + sr.dst_start:out_base + sr.dst_start + n])
        else:   # dense in the source: the runs in order are the chunk's next bytes
            for d in sr.offsets()[1]:
                h.update(mv[out_base + d:out_base + d + n])
        done = hi
        if done < chunk.box.volume * t.itemsize:
            self._hashing[key] = (done, h)
            return
        self._hashing.pop(key, None)
        got, want = CHECKSUM_PREFIX + h.hexdigest(), chunk.checksums[replica]
        if got != want:
            path = os.path.join(self.source.root, chunk.files[replica])
            raise FormatError(f"{path}: tensor {t.name!r} chunk {chunk.box}: checksum mismatch "
                              f"(the bytes read hash to {got}, the manifest records {want}): "
                              "the file is damaged")
        self.chunks_verified += 1

    def _read(self, rel: str, t: TensorInfo, box: Box, sr: StridedRuns, out,
              out_base: int) -> None:
        region = self.source.read_region
        if not sr.counts:
            dlo = out_base + sr.dst_start
            region(rel, t, box, sr.src_start, [memoryview(out)[dlo:dlo + sr.length]])
            return
        lo, hi = sr.src_span()
        if sr.length >= SMALL_RUN and hi - lo > 2 * sr.nbytes:
            mv, n = memoryview(out), sr.length
            for so, do in zip(*sr.offsets()):
                region(rel, t, box, so, [mv[out_base + do:out_base + do + n]])
            return
        if sr.length >= SCATTER_RUN and hi - lo <= 2 * sr.nbytes:
            self._scatter(rel, t, box, sr, memoryview(out), out_base)
            return
        scratch = self.scratch
        for part in slabs(sr, len(scratch)):
            lo, hi = part.src_span()
            if not part.counts:
                dlo = out_base + part.dst_start
                region(rel, t, box, lo, [memoryview(out)[dlo:dlo + part.length]])
                continue
            region(rel, t, box, lo, [memoryview(scratch)[:hi - lo]])
            copy_runs(StridedRuns(part.src_start - lo, part.dst_start, part.length,
                                  part.counts, part.src_strides, part.dst_strides),
                      scratch, 0, out, out_base)

    def _scatter(self, rel: str, t: TensorInfo, box: Box, sr: StridedRuns, out: memoryview,
                 out_base: int) -> None:
        """Read ``sr`` in source order: each run into its place in ``out``, each gap
        between runs into a junk buffer, one ``read_region`` per stretch."""
        n = sr.length
        src_offsets, dst_offsets = sr.offsets()
        lo, hi = sr.src_span()
        if hi - lo == sr.nbytes:   # runs back to back in the source: one read, no junk
            self.source.read_region(rel, t, box, lo, [out[out_base + d:out_base + d + n]
                                                      for d in dst_offsets])
            return
        views: list[memoryview] = []
        start = expect = 0
        for src, do in zip(src_offsets, dst_offsets):
            if views and not 0 <= src - expect <= JUNK_CAP:   # a wide gap, or back
                self.source.read_region(rel, t, box, start, views)
                views = []
            if not views:
                start = src
            elif src > expect:
                views.append(self._junk(src - expect))
            d = out_base + do
            views.append(out[d:d + n])
            expect = src + n
        self.source.read_region(rel, t, box, start, views)

    def _junk(self, n: int) -> memoryview:
        if self._junk_buf is None or len(self._junk_buf) < n:
            self._junk_buf = memoryview(bytearray(max(n, 64 << 10)))
        return self._junk_buf[:n]

    def close(self) -> None:
        self.source.close()


def verify_totals(per_rank) -> dict:
    """Job totals of the chunk checksum counters (``ChunkReader.verify_counts``)."""
    keys = ("chunks_verified", "chunks_read_in_part")
    return {k: sum(r.get(k, 0) for r in per_rank) for k in keys}


def write_runs_to_file(fd: int, path: str, begin: int, sr: StridedRuns, src,
                       src_base: int = 0, max_window: int = 8 << 20,
                       exclusive: bool = True) -> None:
    """Scatter ``sr`` from memory into a file (destination offsets relative to ``begin``).

    ``exclusive``: the caller is the only writer of the destination span (node-local
    reshard: one rank per output file), so small runs may be merged by read-modify-write.
    False (other ranks write between the runs at the same time: integrated saves):
    every run is its own ``pwrite``. Runs of at least ``WRITE_RUN`` bytes are written one
    ``pwrite`` each (measured 0.35 GB/s at 1 KiB, 1.1 GB/s at 8 KiB, 2-4x faster than
    scattering through a memory map of a fresh sparse file, whose page faults dominate).
    Smaller runs are merged into their span in windows of at most ``max_window``: read
    the window back, scatter with numpy, write it.
    """
    if sr.length == 0:
        return
    if not sr.counts:
        s = src_base + sr.src_start
        pwrite_all(fd, memoryview(src)[s:s + sr.length], begin + sr.dst_start, path)
        return
    if sr.length >= WRITE_RUN or not exclusive:
        mv, n = memoryview(src), sr.length
        for so, do in zip(*sr.offsets()):
            pwrite_all(fd, mv[src_base + so:src_base + so + n], begin + do, path)
        return
    flipped = StridedRuns(sr.dst_start, sr.src_start, sr.length, sr.counts,
                          sr.dst_strides, sr.src_strides)
    window = bytearray(min(max_window, flipped.src_span()[1] - flipped.src_span()[0]))
    for part in slabs(flipped, len(window)):
        lo, hi = part.src_span()  # destination span (flipped)
        span = memoryview(window)[:hi - lo]
        pread_into(fd, span, begin + lo, path)
        back = StridedRuns(part.dst_start, part.src_start - lo, part.length, part.counts,
                           part.dst_strides, part.src_strides)
        copy_runs(back, src, src_base, window, 0)
        pwrite_all(fd, span, begin + lo, path)
