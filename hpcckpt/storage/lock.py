"""One writer per output directory: a lock file inside OUT, held for the whole job.

``fcntl.lockf`` (POSIX record locks) rather than ``flock``: NFS carries them to the
server, and Lustre honours them when mounted with ``flock``. POSIX locks do not exclude
the process holding them, so locks this process holds are also remembered in ``_HELD``.
On a filesystem without locks (``ENOLCK``, ``ENOSYS``, ``EOPNOTSUPP``) the lock is
skipped: writers' unique temporary names still keep them from renaming each other's
files.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import time

from ..errors import UsageError
from .atomic import io_error

LOCK_NAME = ".hpcckpt.lock"
_HELD: dict[str, str] = {}   # lock file (real path) -> what holds it, in this process
_BUSY = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class OutputLock:
    """The lock of directory ``out`` (which must exist), for the job described by ``what``.

    Example:
        lock = OutputLock("out", "hpcckpt split")
        lock.acquire()          # or UsageError naming the holder
        ...
        lock.release()          # removes the lock file
    """

    def __init__(self, out: str, what: str):
        self.out = out
        self.path = os.path.join(out, LOCK_NAME)
        self.what = what
        self.fd: int | None = None
        #: what the lock file said when this job took it over from a job that ended
        #: without removing it (killed, node lost): None when there was no such file
        self.stale_holder: str | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.path)
        if key in _HELD:
            raise self._busy(f"{_HELD[key]} in this process")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise io_error(self.path, "cannot create the lock file", e) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in _BUSY:
                    raise self._busy(holder) from None
                if e.errno in _NO_LOCKS:
                    return
                raise io_error(self.path, "cannot lock", e) from None
            # the previous holder removes the file when it ends: a lock on a removed
            # file excludes nobody, so take the lock of the file now at this path
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD[key] = self.what
        self.stale_holder = _read_holder(fd) if os.fstat(fd).st_size else None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        info = f"{self.what}, pid {os.getpid()} on {os.uname().nodename}, since {stamp}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as e:
            self.release()
            raise io_error(self.path, "cannot write the lock file", e) from None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: nobody can take the
        lock of a file that is about to disappear)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        _HELD.pop(os.path.realpath(self.path), None)

    def _busy(self, holder: str) -> UsageError:
        return UsageError(f"{self.out}: another job is writing this output directory "
                          f"({holder}); wait for it to end or choose another output directory")


_HOLDER = re.compile(r", pid (\d+) on (\S+), since ")


def holder_is_dead(holder: str | None) -> bool:
    """Whether a lock file's holder line names a process of this host that has ended.

    Holding a lock proves no writer is alive only where locks reach every client (NFS
    mounted ``nolock`` keeps them local to each node): a holder on another host, or a
    lock file that says nothing, proves nothing."""
    m = _HOLDER.search(holder or "")
    if m is None or m.group(2) != os.uname().nodename:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
