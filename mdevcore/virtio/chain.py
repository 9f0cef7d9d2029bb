"""Descriptor chains of a split virtqueue: walking, checking, gather and scatter.

A chain is what the driver made available under one head index: direct
descriptors linked by NEXT, the last of which may (with
VIRTIO_F_INDIRECT_DESC) point at a table of descriptors in guest memory.
Everything read from the guest is checked here, once: indexes inside the
table, no chain longer than the table (which also catches loops), no
indirect table inside an indirect one, device-readable buffers before
device-writable ones.  A violation raises :class:`VirtqError`; the
transport turns it into DEVICE_NEEDS_RESET.  Buffer addresses are only reached through
``mem.translate``, so a buffer outside the DMA table faults (EFAULT, turned
into VirtqError too) without any byte outside the table being touched.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from mdevcore.virtio import spec


class GuestMemory(Protocol):
    """What a virtqueue needs of guest memory: mdevcore.pci.dma.DmaTable fits."""

    def translate(self, iova: int, length: int, write: bool) -> memoryview: ...

    def mark_dirty(self, iova: int, length: int) -> None: ...


class VirtqError(Exception):
    """The driver broke the virtqueue protocol; the device needs a reset."""


@dataclasses.dataclass(slots=True)
class Chain:
    """One available buffer: its head index and (iova, length) segments."""

    head: int
    readable: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    writable: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)

    def _add(self, addr: int, length: int, flags: int) -> None:
        if flags & spec.DESC_F_WRITE:
            self.writable.append((addr, length))
        elif self.writable:
            raise VirtqError(f"chain {self.head}: device-readable buffer after a writable one")
        else:
            self.readable.append((addr, length))


def view(mem: GuestMemory, iova: int, length: int, write: bool) -> memoryview:
    """``mem.translate`` with a fault reported as a protocol error."""
    try:
        return mem.translate(iova, length, write)
    except OSError as exc:
        raise VirtqError(f"guest address {iova:#x}+{length:#x}: {exc.strerror or exc}") from None


def walk(mem: GuestMemory, table: int, size: int, head: int, *, indirect_ok: bool) -> Chain:
    """The chain starting at descriptor ``head`` of the ``size``-entry table at ``table``."""
    if not 0 <= head < size:
        raise VirtqError(f"head {head} outside a queue of {size}")
    descs = view(mem, table, size * spec.DESC_SIZE, False)
    chain = Chain(head)
    index = head
    for _ in range(size):
        addr, length, flags, nxt = spec.DESC.unpack_from(descs, index * spec.DESC_SIZE)
        if flags & spec.DESC_F_INDIRECT:
            if not indirect_ok:
                raise VirtqError(f"chain {head}: indirect descriptor not negotiated")
            if flags & spec.DESC_F_NEXT:
                # Never with NEXT (2.7.5.3.1).  WRITE is ignored, and the table
                # may end a chain of direct descriptors (2.7.5.3.2: both MUSTs).
                raise VirtqError(f"chain {head}: indirect descriptor with NEXT")
            _walk_indirect(mem, chain, addr, length, size)
            return chain
        if length:
            chain._add(addr, length, flags)
        if not flags & spec.DESC_F_NEXT:
            return chain
        if nxt >= size:
            raise VirtqError(f"chain {head}: next {nxt} outside a queue of {size}")
        index = nxt
    raise VirtqError(f"chain {head} longer than the queue size {size} (a loop?)")


def _walk_indirect(mem: GuestMemory, chain: Chain, table: int, length: int, limit: int) -> None:
    if length == 0 or length % spec.DESC_SIZE:
        raise VirtqError(f"chain {chain.head}: indirect table of {length} bytes")
    entries = length // spec.DESC_SIZE
    if entries > limit:
        raise VirtqError(f"chain {chain.head}: indirect table of {entries} > queue size {limit}")
    descs = view(mem, table, length, False)
    index = 0
    for _ in range(entries):
        addr, seg_len, flags, nxt = spec.DESC.unpack_from(descs, index * spec.DESC_SIZE)
        if flags & spec.DESC_F_INDIRECT:
            raise VirtqError(f"chain {chain.head}: indirect descriptor inside an indirect table")
        if seg_len:
            chain._add(addr, seg_len, flags)
        if not flags & spec.DESC_F_NEXT:
            return
        if nxt >= entries:
            raise VirtqError(f"chain {chain.head}: indirect next {nxt} outside {entries}")
        index = nxt
    raise VirtqError(f"chain {chain.head}: indirect chain loops")


def gather(mem: GuestMemory, chain: Chain, limit: int) -> bytes:
    """The device-readable bytes of ``chain``; VirtqError beyond ``limit`` bytes."""
    total = chain.readable_len
    if total > limit:
        raise VirtqError(f"chain {chain.head}: {total} readable bytes, at most {limit}")
    out = bytearray()
    for addr, length in chain.readable:
        out += view(mem, addr, length, False)
    return bytes(out)


def scatter(mem: GuestMemory, chain: Chain, data: bytes | memoryview, skip: int = 0) -> int:
    """Write ``data`` into the writable buffers from byte ``skip``; returns bytes written.

    Every byte written is marked dirty (dirty logging for migration).
    """
    src = memoryview(data)
    done = 0
    for addr, length in chain.writable:
        if done == len(src):
            break
        if skip >= length:
            skip -= length
            continue
        addr, length = addr + skip, length - skip
        skip = 0
        count = min(length, len(src) - done)
        view(mem, addr, count, True)[:] = src[done : done + count]
        mem.mark_dirty(addr, count)
        done += count
    return done
