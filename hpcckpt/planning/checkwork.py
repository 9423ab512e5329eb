"""Dividing a verification among ranks by bytes (pure: no files, no MPI).

``hpcckpt verify`` reads every stored byte of a checkpoint exactly once, on some rank.
The stored chunks (one ``CheckItem`` per copy, replicas included) are put in file
order and the byte stream they form is cut into ``world`` nearly equal parts. A chunk
whose checksum must be recomputed is read whole by one rank (xxh3 cannot be combined
from parts): it goes to the rank owning its middle byte. A chunk without a checksum
(complete weights, MindSpore-written files) may be cut into pieces of at most
``piece_bytes``, aligned to its elements, so a single huge tensor still spreads over
the job.

Every rank computes the same division from the same list, without communication.

``--shard I/N`` (a SLURM job array: one job per shard) first cuts the same byte stream
into ``N`` balanced shards by the same rule (``shard_items``); the job's ranks then divide
shard ``I`` among themselves. Shards count from 0 (``SLURM_ARRAY_TASK_ID -
SLURM_ARRAY_TASK_MIN``); together they read every byte exactly once.

Example:
    >>> items = [CheckItem("a.st", "w", Box((0,), (8,)), 4, None, 0, 32)]
    >>> [len(p) for p in divide_checks(items, 2, piece_bytes=16)]
    [1, 1]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..layout.box import Box


@dataclass(frozen=True, slots=True)
class CheckItem:
    """One stored copy of one chunk, or a piece of it, to be read and checked.

    Attributes:
        file: the file holding it, relative to the checkpoint root.
        tensor: the tensor's global name.
        box: the chunk's region of the tensor (global element coordinates).
        itemsize: bytes per element (pieces are cut at element boundaries).
        checksum: the recorded ``"xxh3_64:<hex>"`` of the whole chunk, or None.
        lo, hi: the byte range of the chunk's stored data this item covers, relative
            to the chunk's first data byte (``0, nbytes`` for a whole chunk).
        compare: this copy is the one compared with ``--against`` (one per distinct box).
        hashed: the chunk is hashed whole (to check ``checksum``, or to compare its
            replicas when nothing is recorded), so it is never cut into pieces.
    """

    file: str
    tensor: str
    box: Box
    itemsize: int
    checksum: str | None
    lo: int
    hi: int
    compare: bool = True
    hashed: bool = False

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.box.volume * self.itemsize


def split_pieces(item: CheckItem, piece_bytes: int) -> list[CheckItem]:
    """``item`` cut into pieces of at most ``piece_bytes`` (at least one element each),
    unless it is hashed whole."""
    if item.hashed or item.checksum is not None or item.nbytes <= piece_bytes:
        return [item]
    step = max(item.itemsize, piece_bytes // item.itemsize * item.itemsize)
    return [replace(item, lo=lo, hi=min(item.hi, lo + step))
            for lo in range(item.lo, item.hi, step)]


def divide_checks(items: list[CheckItem], world: int,
                  piece_bytes: int = 64 << 20) -> list[list[CheckItem]]:
    """Each rank's items: contiguous runs of the file-ordered byte stream, balanced.

    ``items`` must already be in file order (the caller's order is kept within a file).
    Every byte of every item lands on exactly one rank; a rank's total differs from
    ``total / world`` by less than the largest unsplittable item.
    """
    out: list[list[CheckItem]] = [[] for _ in range(world)]
    for r, p in _owners(items, world, piece_bytes):
        out[r].append(p)
    return out


def _owners(items: list[CheckItem], parts: int, piece_bytes: int):
    """``(part, piece)`` for every piece of ``items``: the part of ``parts`` balanced
    contiguous parts of the byte stream that owns the piece's middle byte."""
    pieces = [p for it in items for p in split_pieces(it, piece_bytes)]
    total = sum(p.nbytes for p in pieces)
    pos = 0
    for i, p in enumerate(pieces):
        if total:
            mid2 = 2 * pos + p.nbytes      # twice the middle byte: integers only
            yield min(parts - 1, mid2 * parts // (2 * total)), p
        else:   # nothing to read (all chunks empty): spread the header checks
            yield i % parts, p
        pos += p.nbytes


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard I/N``, counted from 0).

    Example:
        >>> Shard.parse("1/4")
        Shard(index=1, count=4)
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` -> ``Shard(I, N)``; ValueError with the message the CLI prints."""
        i, sep, n = text.partition("/")
        if not sep or not i.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"--shard {text!r}: expected I/N, shard I of N counted from 0 "
                             "(e.g. 0/4)")
        index, count = int(i), int(n)
        if count < 1:
            raise ValueError(f"--shard {text}: the shard count N must be at least 1")
        if index >= count:
            raise ValueError(f"--shard {text}: shard {index} out of range 0..{count - 1} "
                             "(shards count from 0)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_items(items: list[CheckItem], shard: Shard,
                piece_bytes: int = 64 << 20) -> list[CheckItem]:
    """The items (pieces) of shard ``shard.index``: ``divide_checks`` over ``shard.count``
    shards instead of ranks. Pass the result to ``divide_checks`` for the job's ranks
    (pieces are already at most ``piece_bytes``: they are not cut again)."""
    # not divide_checks(...)[index]: N may be large (one list per shard for nothing)
    return [p for r, p in _owners(items, shard.count, piece_bytes) if r == shard.index]


def divide_files(files: list[str], reads: list[list[CheckItem]], world: int) -> list[list[str]]:
    """Who checks each file's existence, size and header: the lowest rank reading any of
    its bytes, or, for a file with nothing to read, rank ``index % world``. Each file
    once, in ``files`` order."""
    first: dict[str, int] = {}
    for r, its in enumerate(reads):
        for it in its:
            first.setdefault(it.file, r)
    out: list[list[str]] = [[] for _ in range(world)]
    for i, f in enumerate(files):
        out[first.get(f, i % world)].append(f)
    return out


def divide_round_robin(n: int, world: int, rank: int) -> range:
    """Indices ``rank, rank + world, ...`` below ``n``: a share of ``n`` similar tasks."""
    return range(rank, n, world)


def tiles_as_grid(shape: tuple[int, ...], boxes: set[tuple[tuple[int, ...], tuple[int, ...]]]
                  ) -> bool:
    """True when the distinct ``(offsets, sizes)`` boxes are exactly the cells of one grid
    over ``shape``: then they lie inside it, do not overlap and cover it.

    Every layout a strategy produces is such a grid, so this settles most tensors in one
    pass over plain tuples (a 1024-rank 70B manifest: 370,176 chunks). False says
    nothing: the caller runs the general check, which also names the defect.

    Example:
        >>> tiles_as_grid((4, 6), {((0, 0), (2, 6)), ((2, 0), (2, 6))})
        True
    """
    ndim = len(shape)
    if ndim == 0:
        return boxes == {((), ())}
    if not boxes or any(s <= 0 for s in shape):
        return False
    starts: list[set[int]] = [set() for _ in range(ndim)]
    for offs, sizes in boxes:
        if len(offs) != ndim or len(sizes) != ndim:
            return False
        for d in range(ndim):
            starts[d].add(offs[d])
    ends: list[dict[int, int]] = []
    cells = 1
    for d in range(ndim):
        s = sorted(starts[d])
        if s[0] != 0 or s[-1] >= shape[d]:
            return False
        ends.append(dict(zip(s, s[1:] + [shape[d]])))
        cells *= len(s)
    if len(boxes) != cells:
        return False
    return all(offs[d] + sizes[d] == ends[d][offs[d]]
               for offs, sizes in boxes for d in range(ndim))
