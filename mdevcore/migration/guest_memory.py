"""Guest memory owned by the VMM side: one memfd, mapped into devices.

The memory is a single memfd of ``size`` bytes that appears to devices at
IOVA ``base``.  Everything below ``size - fdless`` is given to a device
with DMA_MAP and the fd (the device mmaps it); the last ``fdless`` bytes
are mapped without an fd, so the device reaches them only through
DMA_READ / DMA_WRITE messages that the client answers from the same
memory.

Writes the VMM makes itself (a workload standing in for guest vCPUs) go
through :meth:`GuestMemory.write`, which records their pages the way a VMM
tracks vCPU writes with its own dirty bitmap; the device's writes are
logged by the device (DMA logging) and reported separately.
"""

from __future__ import annotations

import mmap
import os

from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE
from mdevcore.vfio_user.client import Client

PAGE_SIZE = 4096
_RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE


class GuestMemory:
    """``size`` bytes of guest RAM at IOVA ``base`` (both page aligned)."""

    def __init__(self, size: int, *, base: int = 0, fdless: int = 0, name: str = "guest") -> None:
        if size <= 0 or size % PAGE_SIZE or base % PAGE_SIZE:
            raise ValueError("guest memory size and base must be non-zero page multiples")
        if not 0 <= fdless <= size or fdless % PAGE_SIZE:
            raise ValueError("the fd-less part must be a page multiple within the memory")
        self.size = size
        self.base = base
        self.fdless = fdless
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.mem = memoryview(self._map)
        self._next = base  # bump allocator
        self._dirty: set[int] = set()  # page numbers (relative to base) the VMM wrote
        self._exported: list[memoryview] = []  # fd-less windows handed to clients

    # --- addressing -----------------------------------------------------------

    @property
    def end(self) -> int:
        return self.base + self.size

    def _offset(self, iova: int, length: int) -> int:
        if length < 0 or iova < self.base or iova + length > self.end:
            raise ValueError(f"{iova:#x}+{length:#x} outside guest memory")
        return iova - self.base

    def view(self, iova: int, length: int) -> memoryview:
        """A read-only window; write through :meth:`write` so the page is tracked."""
        off = self._offset(iova, length)
        return self.mem[off : off + length].toreadonly()

    def read(self, iova: int, length: int) -> bytes:
        off = self._offset(iova, length)
        return bytes(self.mem[off : off + length])

    def write(self, iova: int, data: bytes | memoryview) -> None:
        """A vCPU write: stores ``data`` and marks its pages dirty."""
        off = self._offset(iova, len(data))
        self.mem[off : off + len(data)] = data
        self.mark_dirty(iova, len(data))

    def store32(self, iova: int, value: int) -> None:
        """A vCPU's aligned 32-bit store: one store a polling device sees whole.

        For values a device reads while we write them (shadow doorbells); a
        bytes copy may be split into smaller stores.
        """
        if iova % 4:
            raise ValueError(f"unaligned 32-bit store at {iova:#x}")
        off = self._offset(iova, 4)
        with self.mem[off : off + 4].cast("I") as word:
            word[0] = value
        self.mark_dirty(iova, 4)

    def mark_dirty(self, iova: int, length: int) -> None:
        if length <= 0:
            return
        off = self._offset(iova, length)
        self._dirty.update(range(off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1))

    def take_dirty(self) -> set[int]:
        """Pages (numbered from ``base``) the VMM wrote since the last call."""
        pages, self._dirty = self._dirty, set()
        return pages

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        """Reserve ``size`` bytes (``align`` a power of two); returns the IOVA."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError("bad allocation size or alignment")
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.end - self.fdless:
            raise MemoryError(f"guest memory exhausted ({size} bytes wanted)")
        self._next = start + size
        return start

    # --- pages, for the migration stream ---------------------------------------

    def page(self, number: int) -> memoryview:
        start = number * PAGE_SIZE
        if not 0 <= start < self.size:
            raise ValueError(f"no guest page {number}")
        return self.mem[start : start + PAGE_SIZE]

    def load_page(self, number: int, data: bytes | memoryview) -> None:
        """Store a page that arrived from the source (not a vCPU write)."""
        if len(data) != PAGE_SIZE:
            raise ValueError("a guest page is 4096 bytes")
        self.page(number)[:] = data

    # --- devices ----------------------------------------------------------------

    def map_into(self, client: Client) -> None:
        """DMA_MAP all of it into the device behind ``client``."""
        mapped = self.size - self.fdless
        if mapped:
            client.dma_map(self.base, mapped, _RW, fd=self.fd, offset=0)
        if self.fdless:
            client.dma_map(self.base + mapped, self.fdless, _RW)
            # The client answers DMA_READ/WRITE for this part from our memory.
            window = self.mem[mapped:]
            self._exported.append(window)
            client.add_dma_buffer(self.base + mapped, window)  # type: ignore[arg-type]

    def unmap_from(self, client: Client) -> None:
        mapped = self.size - self.fdless
        if mapped:
            client.dma_unmap(self.base, mapped)
        if self.fdless:
            client.dma_unmap(self.base + mapped, self.fdless)

    def close(self) -> None:
        # A client may still hold the fd-less window: release it so the map
        # can close (the client's later use of it fails instead of reading freed memory).
        for window in self._exported:
            window.release()
        self._exported.clear()
        self.mem.release()
        self._map.close()
        os.close(self.fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
