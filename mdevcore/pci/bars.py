"""Base address registers: their config-space encoding and backing memory.

A BAR's register is emulated entirely with write masks: the address bits
above the size are writable, the low flag bits read-only, so writing all
ones reads back the size mask the way real hardware answers BAR sizing.
A 64-bit BAR uses the next register for the upper half.

Each BAR has backing memory the default handlers serve: an anonymous mmap
(allocated lazily by the kernel), or - when the device declares mmap areas -
a memfd the client may map directly (sparse mmap).
"""

from __future__ import annotations

import dataclasses
import enum
import mmap
import os

from mdevcore.pci import config as cfg
from mdevcore.pci.config import ConfigSpace

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8
PAGE_SIZE = mmap.PAGESIZE


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclasses.dataclass(eq=False)
class Bar:
    index: int
    size: int
    kind: BarKind
    prefetchable: bool
    mmap_areas: tuple[tuple[int, int], ...]
    memfd: int | None
    backing: mmap.mmap
    memory: memoryview

    @property
    def flag_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO
        bits = BAR_MEM_64 if self.kind is BarKind.MEM64 else 0
        if self.prefetchable:
            bits |= BAR_MEM_PREFETCH
        return bits

    def in_mmap_area(self, offset: int, length: int) -> bool:
        for start, size in self.mmap_areas:
            if start <= offset and offset + length <= start + size:
                return True
        return False

    def close(self) -> None:
        self.memory.release()
        try:
            self.backing.close()
        except BufferError:
            pass  # a parent still holds a view; it unmaps when that goes
        if self.memfd is not None:
            os.close(self.memfd)
            self.memfd = None


def _check(index: int, size: int, kind: BarKind, areas: tuple[tuple[int, int], ...]) -> None:
    if not 0 <= index <= 5:
        raise ValueError(f"BAR index {index} not in 0..5")
    if kind is BarKind.MEM64 and index == 5:
        raise ValueError("a 64-bit BAR needs two registers; BAR5 has no pair")
    if size <= 0 or size & (size - 1):
        raise ValueError(f"BAR size {size:#x} is not a power of two")
    if kind is BarKind.IO and not 4 <= size <= 256:
        raise ValueError(f"I/O BAR size {size:#x} not in 4..256")
    if kind is BarKind.MEM32 and size > 1 << 31:
        raise ValueError(f"32-bit BAR of {size:#x} bytes does not fit below 4 GiB")
    if areas and kind is BarKind.IO:
        raise ValueError("I/O BARs cannot be mmapped")
    for start, length in areas:
        if start % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise ValueError(f"mmap area {start:#x}+{length:#x} not page aligned")
        if start < 0 or start + length > size:
            raise ValueError(f"mmap area {start:#x}+{length:#x} outside the BAR")


def create_bar(
    space: ConfigSpace,
    index: int,
    size: int,
    kind: BarKind,
    prefetchable: bool,
    mmap_areas: tuple[tuple[int, int], ...],
) -> Bar:
    """Validate, encode the register(s) in ``space`` and allocate backing memory."""
    _check(index, size, kind, mmap_areas)
    memfd: int | None = None
    if mmap_areas:
        memfd = os.memfd_create(f"mdev-bar{index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, size)
            backing = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(memfd)
            raise
    else:
        backing = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    bar = Bar(index, size, kind, prefetchable, mmap_areas, memfd, backing, memoryview(backing))
    reg = cfg.BAR0 + 4 * index
    low_bits = 0x3 if kind is BarKind.IO else 0xF
    mask = (~(size - 1)) & 0xFFFFFFFF & ~low_bits
    space.set(reg, bar.flag_bits.to_bytes(4, "little"), writable_mask=mask)
    if kind is BarKind.MEM64:
        high_mask = (~(size - 1) >> 32) & 0xFFFFFFFF
        space.set(reg + 4, bytes(4), writable_mask=high_mask)
    return bar
