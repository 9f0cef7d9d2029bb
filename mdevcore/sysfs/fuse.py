"""FUSE transport for a :class:`SysfsTree` (pyfuse3 on trio).

Thin by design: every operation maps onto one tree call.  Choices that
make it behave like sysfs (what mdevctl and shells rely on):

- attribute files report size 4096 and are opened ``direct_io`` so every
  read reaches ``show`` and every write(2) is exactly one ``store``;
- a read at offset 0 renders afresh, later offsets continue that render;
- volatile entries (device dirs, links) have a zero entry timeout, so every
  path walk asks the tree again and sees what the last write left; static
  ones are cached briefly and invalidated when they are detached (a parent
  unregistering);
- attributes (mode, size) are cached briefly for every node, volatile or
  not: they never change while a node lives and its inode number is never
  reused, so a cached one is never wrong, and ``default_permissions``
  checks need no GETATTR per path component (two fewer requests per
  ``echo 1 > .../remove``);
- ``readdir`` serves a snapshot taken at ``opendir``;
- O_TRUNC arrives in ``open`` (atomic_o_trunc) and ``setattr`` is a no-op.

After each successful write the optional ``settle`` coroutine is awaited
before the syscall returns, so side effects outside the tree (the
vfio-user socket of a new device) exist when ``echo ... > create`` ends.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from mdevcore.sysfs.mounts import SUBTYPE, clear_stale_mount, is_mounted
from mdevcore.sysfs.tree import Attr, Dir, Link, Node, SysfsTree

log = logging.getLogger(__name__)

Settle = Callable[[], Awaitable[None]]

STATIC_TIMEOUT = 1.0  # seconds the kernel may cache entries that never vanish alone


@dataclasses.dataclass
class _OpenFile:
    node: Attr
    rendered: bytes | None = None


def _fuse_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


class SysfsOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over a tree."""

    def __init__(self, tree: SysfsTree, settle: Settle | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.settle = settle
        self._stamp = time.time_ns()
        self._fh = itertools.count(1)
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, list[Node]] = {}
        self.uid = os.getuid()
        self.gid = os.getgid()

    # --- helpers ----------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.node(inode)
        except OSError as e:
            raise _fuse_error(e) from None

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.ino)
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = 2 if isinstance(node, Dir) else 1
        a.st_size = node.size
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._stamp
        a.entry_timeout = 0 if node.volatile else STATIC_TIMEOUT
        a.attr_timeout = STATIC_TIMEOUT  # immutable per inode (module doc)
        return a

    # --- metadata ---------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        text = os.fsdecode(name)
        if text == ".":
            return self._attrs(parent)
        if text == "..":
            return self._attrs(parent.parent or parent)
        try:
            return self._attrs(self.tree.child(parent, text))
        except OSError as e:
            raise _fuse_error(e) from None

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        # sysfs ignores truncation and times; chmod/chown are not offered.
        return self._attrs(self._node(inode))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    async def forget(self, inode_list: Any) -> None:
        # Inodes live as long as their node; nothing is reference-counted.
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # --- directories ------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        with self.tree.lock:
            snapshot = list(node.children.values())
        fh = next(self._fh)
        self._dirs[fh] = snapshot
        return pyfuse3.FileHandleT(fh)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for index in range(start_id, len(entries)):
            node = entries[index]
            if not pyfuse3.readdir_reply(
                token, os.fsencode(node.name), self._attrs(node), index + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- attribute files --------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not isinstance(node, Attr):
            raise pyfuse3.FUSEError(errno.EINVAL)
        access = flags & os.O_ACCMODE
        if access in (os.O_RDONLY, os.O_RDWR) and node.show is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        if access in (os.O_WRONLY, os.O_RDWR) and node.store is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = next(self._fh)
        self._files[fh] = _OpenFile(node)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off == 0 or f.rendered is None:
            if not f.node.alive:
                raise pyfuse3.FUSEError(errno.ENODEV)
            try:
                f.rendered = f.node.render()
            except OSError as e:
                raise _fuse_error(e) from None
            except Exception:
                log.exception("show of /%s crashed", self.tree.path_of(f.node))
                raise pyfuse3.FUSEError(errno.EIO) from None
        return f.rendered[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._files.get(fh)
        if f is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            written = f.node.write(buf)
        except OSError as e:
            log.debug("write to /%s failed: %s", self.tree.path_of(f.node), e)
            raise _fuse_error(e) from None
        except Exception:
            log.exception("store of /%s crashed", self.tree.path_of(f.node))
            raise pyfuse3.FUSEError(errno.EIO) from None
        if self.settle is not None:
            await self.settle()
        return written

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    # --- what sysfs refuses (same errno as the VFS gives kernfs) ------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EACCES)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)


FUSE_OPTIONS = frozenset(
    {"fsname=mdevsysfs", f"subtype={SUBTYPE}", "allow_other", "default_permissions"}
)


def check_mountpoint(mountpoint: Path) -> None:
    """Raise OSError with a clear message when mounting cannot work."""
    clear_stale_mount(mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise OSError(errno.ENODEV, "/dev/fuse is missing (try: modprobe fuse)")
    if not mountpoint.exists():
        raise OSError(errno.ENOENT, f"{mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise OSError(errno.ENOTDIR, f"{mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise OSError(errno.EBUSY, f"{mountpoint} is busy (already a mount point)")


@asynccontextmanager
async def mounted(
    tree: SysfsTree, mountpoint: Path | str, *, settle: Settle | None = None
) -> AsyncIterator[SysfsOperations]:
    """Serve ``tree`` at ``mountpoint`` for the duration of the block.

    pyfuse3 supports one mount per process.  On exit the FUSE loop is
    terminated and the mount removed, also when the block is cancelled.
    """
    mp = Path(mountpoint)
    check_mountpoint(mp)
    ops = SysfsOperations(tree, settle)
    try:
        pyfuse3.init(ops, str(mp), set(FUSE_OPTIONS))
    except RuntimeError as e:
        raise OSError(errno.EIO, f"cannot mount FUSE at {mp}: {e}") from None
    log.info("sysfs mirror mounted at %s", mp)
    tree.on_detach = _invalidate
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            try:
                yield ops
            finally:
                pyfuse3.terminate()
    finally:
        tree.on_detach = None
        pyfuse3.close(unmount=True)
        log.info("sysfs mirror unmounted from %s", mp)


def _invalidate(directory: Dir, node: Node) -> None:
    # Only cached (non-volatile) entries get here, e.g. a parent going away.
    pyfuse3.invalidate_entry_async(
        pyfuse3.InodeT(directory.ino), os.fsencode(node.name), ignore_enoent=True
    )


__all__ = [
    "FUSE_OPTIONS",
    "SysfsOperations",
    "check_mountpoint",
    "clear_stale_mount",
    "is_mounted",
    "mounted",
]
