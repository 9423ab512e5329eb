"""The load floor's worker: read one share of a file with one ``preadv`` into fresh memory.

    python benchmarks/read_floor.py FILE I N

Share I of N of FILE's bytes (``[size*I/N, size*(I+1)/N)``) lands in one anonymous
mapping (transparent huge pages requested, as numpy does for large arrays), faulted in
by the read as the arrays ``hpcckpt load`` fills are. Imports only
the standard library: its start-up is the least a Python process pays.
"""
import mmap
import os
import sys


def main(path: str, i: int, n: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    lo, hi = size * i // n, size * (i + 1) // n
    buf = mmap.mmap(-1, max(1, hi - lo))
    if hasattr(mmap, "MADV_HUGEPAGE"):   # as numpy does for large arrays: fewer faults
        buf.madvise(mmap.MADV_HUGEPAGE)
    view, done = memoryview(buf), 0
    while done < hi - lo:   # one call unless the kernel returns short
        got = os.preadv(fd, [view[done:hi - lo]], lo + done)
        if got <= 0:
            print(f"{path}: file ends at byte {lo + done}, expected {hi}", file=sys.stderr)
            return 1
        done += got
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
