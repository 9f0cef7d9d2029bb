"""A namespace backed by a regular file.

Data moves straight between the file and guest-memory views
(``os.preadv``/``os.pwritev``).  The file is opened twice: with O_DIRECT
when the filesystem allows it (no double caching of guest data), and
buffered for the requests O_DIRECT refuses (buffers not aligned to the
device's block size, or filesystems without O_DIRECT).  Mixing both on one
inode is coherent: the kernel writes back and invalidates the page cache
around direct I/O.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import uuid as uuidlib
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

_ZERO_CHUNK = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _full_io(
    op: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    views: Sequence[memoryview],
    offset: int,
) -> None:
    """Repeat a vectored read/write until every byte moved (short I/O is legal)."""
    done = op(fd, views, offset)
    total = sum(map(len, views))
    if done == total:
        return  # the common case: one call moved it all
    if done <= 0:
        raise OSError(errno.EIO, "unexpected end of backing file")
    pending = [v for v in views if len(v)]
    while pending:
        offset += done
        while pending and done >= len(pending[0]):
            done -= len(pending[0])
            pending.pop(0)
        if pending and done:
            pending[0] = pending[0][done:]
        if not pending:
            return
        done = op(fd, pending, offset)
        if done <= 0:
            raise OSError(errno.EIO, "unexpected end of backing file")


class FileNamespace:
    """One namespace: ``size`` bytes of ``path`` in blocks of ``lba_size``.

    The file is created sparse (ftruncate) if it is missing or shorter than
    ``size``; an existing longer file keeps its extra bytes untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int,
        *,
        lba_size: int = 512,
        direct: bool = True,
        uuid: uuidlib.UUID | None = None,
    ) -> None:
        if lba_size not in (512, 4096):
            raise OSError(errno.EINVAL, f"unsupported LBA size {lba_size}")
        if size <= 0 or size % lba_size:
            raise OSError(errno.EINVAL, f"namespace size {size} is not a multiple of {lba_size}")
        self.path = os.fspath(path)
        self.lba_size = lba_size
        self.nlbas = size // lba_size
        self.uuid = uuid or uuidlib.uuid4()
        self.write_cache = True  # guest-visible VWC enable; off means write-through
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._direct_fd: int | None = None
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
            if direct:
                self._direct_fd = self._open_direct()
        except BaseException:
            self.close()
            raise

    def _open_direct(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            log.info("%s: O_DIRECT refused (%s), using buffered I/O", self.path, exc.strerror)
            return None

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def fds(self) -> tuple[int | None, int]:
        """The O_DIRECT descriptor (None without one) and the buffered one, for native I/O."""
        return self._direct_fd, self._fd

    @property
    def size(self) -> int:
        return self.nlbas * self.lba_size

    def close(self) -> None:
        for fd in (self._direct_fd, self._fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct_fd = None
        self._fd = -1

    # --- data path -------------------------------------------------------

    def _vectored(
        self,
        op: Callable[[int, Sequence[memoryview], int], int],
        views: Sequence[memoryview],
        offset: int,
    ) -> None:
        if self._direct_fd is not None:
            try:
                _full_io(op, self._direct_fd, views, offset)
                return
            except OSError as exc:
                # EINVAL: a buffer not aligned for O_DIRECT; nothing was transferred.
                if exc.errno != errno.EINVAL:
                    raise
        _full_io(op, self._fd, views, offset)

    def read(self, lba: int, views: Sequence[memoryview]) -> None:
        """Fill ``views`` (in order) from the blocks starting at ``lba``."""
        self._vectored(os.preadv, views, lba * self.lba_size)

    def write(self, lba: int, views: Sequence[memoryview]) -> None:
        self._vectored(os.pwritev, views, lba * self.lba_size)
        if not self.write_cache:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        """Make every completed write durable (fdatasync covers both fds: one inode)."""
        os.fdatasync(self._fd)

    def write_zeroes(self, lba: int, count: int, *, deallocate: bool = False) -> None:
        offset, length = lba * self.lba_size, count * self.lba_size
        # Either mode reads back zeroes; prefer keeping blocks allocated unless
        # the host asked to deallocate them.
        punch = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        zero = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        modes = [punch, zero] if deallocate else [zero, punch]
        for mode in modes:
            try:
                _fallocate(self._fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        else:
            self._write_zero_bytes(offset, length)
        if not self.write_cache:
            os.fdatasync(self._fd)

    def deallocate(self, lba: int, count: int) -> None:
        """Punch a hole; reads of deallocated blocks return zeroes (DLFEAT 001b)."""
        self.write_zeroes(lba, count, deallocate=True)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        while length > 0:
            chunk = min(length, len(_ZERO_CHUNK))
            os.pwrite(self._fd, _ZERO_CHUNK[:chunk], offset)
            offset += chunk
            length -= chunk
