"""A writer for the kernel's initramfs format (cpio "newc").

Written here rather than shelling out to cpio(1) so the archive layout is
exact and testable, needs no host tool, and can hold device nodes (the guest
needs /dev/console before /init runs) without privileges.

Entries are collected first and written in one go: adding a path twice keeps
the last version, which lets real binaries replace busybox applet links.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    mode: int  # including the S_IFMT type bits
    data: bytes = b""  # file content, or the symlink target
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, name: bytes, entry: Entry, nlink: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid: root
        0,  # gid
        nlink,
        0,  # mtime: fixed, so identical inputs give identical archives
        len(entry.data),
        0,  # dev major/minor of the containing fs: unused by the kernel
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,  # the name's size counts its NUL
        0,  # checksum: unused in newc
    )
    return MAGIC + b"".join(b"%08X" % f for f in fields)


class CpioArchive:
    """An in-memory set of paths, serialised as one newc archive."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return self._key(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(path: str | PurePosixPath) -> str:
        rel = PurePosixPath("/", path).relative_to("/")
        if str(rel) == "." or ".." in rel.parts:
            raise ValueError(f"bad archive path: {path}")
        return str(rel)

    def _parents(self, key: str) -> None:
        for parent in reversed(PurePosixPath(key).parents[:-1]):
            self._entries.setdefault(str(parent), Entry(stat.S_IFDIR | 0o755))

    def add(self, path: str | PurePosixPath, entry: Entry) -> None:
        key = self._key(path)
        self._parents(key)
        self._entries[key] = entry

    def add_dir(self, path: str | PurePosixPath, mode: int = 0o755) -> None:
        self.add(path, Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str | PurePosixPath, data: bytes, mode: int = 0o644) -> None:
        self.add(path, Entry(stat.S_IFREG | mode, data))

    def add_symlink(self, path: str | PurePosixPath, target: str) -> None:
        self.add(path, Entry(stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(
        self, path: str | PurePosixPath, major: int, minor: int, mode: int = 0o600
    ) -> None:
        self.add(path, Entry(stat.S_IFCHR | mode, b"", (major, minor)))

    def entry(self, path: str | PurePosixPath) -> Entry:
        return self._entries[self._key(path)]

    def write(self, out: BinaryIO) -> int:
        """Write the archive (parents before children); returns its size."""
        size = 0
        # Sorting puts every directory before its contents.
        items = sorted(self._entries.items(), key=lambda kv: PurePosixPath(kv[0]).parts)
        for ino, (key, entry) in enumerate(items, start=1):
            size += self._write_one(out, ino, key, entry, 2 if stat.S_ISDIR(entry.mode) else 1)
        size += self._write_one(out, 0, TRAILER, Entry(0), 1)
        return size

    @staticmethod
    def _write_one(out: BinaryIO, ino: int, name: str, entry: Entry, nlink: int) -> int:
        raw_name = name.encode()
        head = _header(ino, raw_name, entry, nlink) + raw_name + b"\0"
        head += _pad4(len(head))
        out.write(head)
        out.write(entry.data)
        out.write(_pad4(len(entry.data)))
        return len(head) + len(entry.data) + len(_pad4(len(entry.data)))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write(buf)
        return buf.getvalue()
