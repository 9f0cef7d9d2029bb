"""Gadget: a PciDevice for the integration tests (in-process and under QEMU).

BAR0 (4 KiB, 32-bit): reads return 0xA5 ^ offset in every byte, except the
DMA engine registers; writes are recorded.  DMA engine: write source
(0x100, u64), destination (0x108, u64), length (0x110, u32), then anything
to DOORBELL (0x118); ``run()`` copies with dma_read/dma_write (mapped fd or
DMA_READ/DMA_WRITE messages) and counts DONE (0x120) or ERRORS (0x124) up.
BAR2 (16 KiB, 64-bit prefetchable): memory with an mmap window 0x1000-0x3000.
BAR4 (4 KiB): MSI-X table (4 vectors) at 0, PBA at 0x800.
"""

from __future__ import annotations

import logging
import struct

import trio

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity

REG_SRC = 0x100
REG_DST = 0x108
REG_LEN = 0x110
REG_DOORBELL = 0x118
REG_DONE = 0x120
REG_ERRORS = 0x124
_REGS = range(REG_SRC, REG_ERRORS + 4)

log = logging.getLogger(__name__)


class Gadget(PciDevice):
    def __init__(self) -> None:
        super().__init__(
            PciIdentity(
                vendor_id=0x1B36,
                device_id=0x0100,
                class_code=0xFF0000,
                revision=2,
                subsystem_vendor_id=0x1AF4,
                subsystem_id=0x1100,
            )
        )
        self.add_bar(0, 0x1000, BarKind.MEM32)
        shared = self.add_bar(
            2, 0x4000, BarKind.MEM64, prefetchable=True, mmap_areas=((0x1000, 0x2000),)
        )
        assert shared is not None
        self.shared = shared
        self.add_bar(4, 0x1000, BarKind.MEM32)
        self.add_pm()
        self.add_msi(vectors=1)
        self.add_msix(4, table_bar=4, table_offset=0, pba_bar=4, pba_offset=0x800)
        self.add_express()
        self.writes: list[tuple[int, int, bytes]] = []
        self.regs = bytearray(0x28)
        self.resets = 0
        self._jobs_send, self._jobs_recv = trio.open_memory_channel[tuple[int, int, int]](16)

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == 0 and offset in _REGS:
            start = offset - REG_SRC
            return bytes(self.regs[start : start + size])
        if bar == 0:
            return bytes([0xA5 ^ (offset & 0xFF)]) * size
        return super().bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        self.writes.append((bar, offset, data))
        if bar == 0 and offset in _REGS:
            start = offset - REG_SRC
            self.regs[start : start + len(data)] = data
            if offset == REG_DOORBELL:
                src, dst, length = struct.unpack_from("<QQI", self.regs)
                try:
                    self._jobs_send.send_nowait((src, dst, length))
                except trio.WouldBlock:
                    self._count(REG_ERRORS)
            return
        super().bar_write(bar, offset, data)

    def on_reset(self) -> None:
        self.resets += 1
        self.regs[:] = bytes(len(self.regs))

    def _count(self, reg: int) -> None:
        start = reg - REG_SRC
        n = int.from_bytes(self.regs[start : start + 4], "little") + 1
        self.regs[start : start + 4] = n.to_bytes(4, "little")

    async def background(self) -> None:
        async for src, dst, length in self._jobs_recv:
            try:
                await self.dma_write(dst, await self.dma_read(src, length))
            except OSError as e:
                log.info("gadget DMA %#x -> %#x (%d) failed: %s", src, dst, length, e)
                self._count(REG_ERRORS)
            else:
                self._count(REG_DONE)
