"""The guest side for virtio tests: memfd guest RAM and a split-ring driver.

``GuestRam`` is a memfd the tests map twice: once here (the guest's view)
and once in the device's DmaTable (through DMA_MAP with the fd, in-process
or over vfio-user).  ``DriverQueue`` lays out a split virtqueue in it and
adds chains, as a virtio driver does, including the malformed ones the
error-path tests need.
"""

from __future__ import annotations

import mmap
import os
import struct

from mdevcore.pci.dma import DmaTable
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping
from mdevcore.virtio import spec

PAGE = 4096
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE


class GuestRam:
    """``size`` bytes of memfd at IOVA ``base``; alloc() hands out aligned chunks."""

    def __init__(self, size: int = 1 << 20, base: int = 0x100000) -> None:
        self.fd = os.memfd_create("virtio-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.base = base
        self.size = size
        self._next = base

    def mapping(self) -> DmaMapping:
        return DmaMapping(address=self.base, size=self.size, flags=RW, fd=self.fd, offset=0)

    def dma_table(self) -> DmaTable:
        table = DmaTable()
        table.map(self.mapping())
        return table

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self._next // align) * align
        self._next = addr + size
        assert self._next <= self.base + self.size, "guest RAM exhausted"
        return addr

    def read(self, iova: int, length: int) -> bytes:
        off = iova - self.base
        return bytes(self.mm[off : off + length])

    def write(self, iova: int, data: bytes) -> None:
        off = iova - self.base
        self.mm[off : off + len(data)] = data

    def u16(self, iova: int) -> int:
        return int(struct.unpack("<H", self.read(iova, 2))[0])

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class DriverQueue:
    """A split virtqueue as the driver owns it."""

    def __init__(self, ram: GuestRam, size: int) -> None:
        self.ram = ram
        self.size = size
        self.desc = ram.alloc(size * spec.DESC_SIZE, spec.DESC_ALIGN)
        self.avail = ram.alloc(spec.avail_bytes(size), spec.AVAIL_ALIGN)
        self.used = ram.alloc(spec.used_bytes(size), PAGE)
        self.avail_idx = 0
        self.used_seen = 0
        self.next_free = 0  # descriptors are handed out round-robin

    def set_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + index * spec.DESC_SIZE, spec.DESC.pack(addr, length, flags, nxt))

    def take(self, count: int) -> list[int]:
        out = [(self.next_free + i) % self.size for i in range(count)]
        self.next_free = (self.next_free + count) % self.size
        return out

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Make (addr, length, device_writable) buffers available as one direct chain."""
        ids = self.take(len(buffers))
        for n, (addr, length, writable) in enumerate(buffers):
            flags = spec.DESC_F_WRITE if writable else 0
            last = n == len(buffers) - 1
            nxt = 0 if last else ids[n + 1]
            self.set_desc(ids[n], addr, length, flags | (0 if last else spec.DESC_F_NEXT), nxt)
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, buffers: list[tuple[int, int, bool]]) -> int:
        """The same as one descriptor pointing at an indirect table."""
        table = self.ram.alloc(len(buffers) * spec.DESC_SIZE)
        for n, (addr, length, writable) in enumerate(buffers):
            flags = spec.DESC_F_WRITE if writable else 0
            if n < len(buffers) - 1:
                flags |= spec.DESC_F_NEXT
            self.ram.write(table + n * spec.DESC_SIZE, spec.DESC.pack(addr, length, flags, n + 1))
        (head,) = self.take(1)
        self.set_desc(head, table, len(buffers) * spec.DESC_SIZE, spec.DESC_F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.ram.write(self.avail + 2, struct.pack("<H", value))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def avail_event(self) -> int:
        return self.ram.u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.ram.u16(self.used + 2)

    def reap(self) -> list[tuple[int, int]]:
        """Used (id, len) entries the device returned since the last reap."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(spec.USED_ELEM.unpack(self.ram.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out
