"""The DeviceBackend side of a PciDevice: what the vfio-user engine calls.

A parent never calls or overrides anything here (PciDevice refuses a
subclass that defines one of these names).  This layer routes region
accesses (config space, the ROM, MSI-X structures, mmap areas, the
parent's ``bar_read``/``bar_write``), applies config-space side effects
(INTx re-enable, FLR, MSI-X function mask, SR-IOV control), answers IRQ
and DMA requests from the device's IrqController and DmaTable, resets
the device, and hands DEVICE_FEATURE and MIG_DATA to ``features`` and the
migration session.

Requests reach it structurally valid: the engine checked sizes, flags and
fd counts (``mdevcore.vfio_user.validate``); what needs device knowledge
(region index and bounds, IRQ index and vectors, DMA overlap) is checked
here or in the component that owns it.

Reset follows the kernel's VFIO_DEVICE_RESET, which saves and restores
config space around a function reset: the registers the VMM programmed
(command, BARs, ROM BAR, cache line size, latency timer, interrupt line)
are kept, everything else (capability control registers, status bits,
MSI-X table) returns to its power-on value, all interrupt eventfds are
closed and the migration state returns to RUNNING.  A guest-initiated
FLR (PCI Express Device Control bit 15) resets all of config space and
keeps the eventfds (the VMM did not ask).

Threading: ``device_lock`` (an RLock) guards the device when a connection
thread serves it (the rule: ``mdevcore.vfio_user.locking``).  The engine
calls everything here with it held; ``reset`` and ``close``, which the
trio side also calls (a driver releasing a VF, device removal), take it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mdevcore.pci import caps, features
from mdevcore.pci import config as cfg
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import (
    DeviceInfo,
    DmaMapping,
    DmaPort,
    IrqInfo,
    RegionInfo,
    SparseArea,
)

if TYPE_CHECKING:
    import logging

    from mdevcore.pci.bars import Bar
    from mdevcore.pci.config import ConfigSpace
    from mdevcore.pci.dma import DmaTable
    from mdevcore.pci.irq import IrqController
    from mdevcore.pci.mig_session import MigrationSession
    from mdevcore.pci.msix import MsixTable
    from mdevcore.pci.sriov import SriovControl

# Config registers a DEVICE_RESET leaves alone (see the module doc).
_RESET_KEEPS = (
    (cfg.COMMAND, 2),
    (cfg.CACHE_LINE_SIZE, 2),
    (cfg.BAR0, 24),
    (cfg.ROM_ADDRESS, 4),
    (cfg.INTERRUPT_LINE, 1),
)

# Every name this layer owns; PciDevice refuses subclasses that define one.
BACKEND_NAMES = frozenset(
    {
        *vfio.REQUEST_METHODS,
        "connected",
        "disconnected",
        "close",
        "run",
        "device_lock",
        "serve_in_thread",
    }
)


class PciBackend:
    """DeviceBackend methods of PciDevice (a mixin: ``self`` is the PciDevice)."""

    # Set up by PciDevice.__init__.
    config: ConfigSpace
    bars: list[Bar | None]
    rom: bytes
    irqs: IrqController
    dma: DmaTable
    msix: caps.MsixLayout | None
    msix_table: MsixTable | None
    express_offset: int | None
    migration: MigrationSession | None
    log: logging.LoggerAdapter  # type: ignore[type-arg]
    _sriov: SriovControl | None
    _absent_irqs: set[int]
    _port: DmaPort | None
    _closed: bool
    _migratable: bool
    device_lock: threading.RLock  # see the module doc

    if TYPE_CHECKING:
        # The parent's hooks, defined (with defaults) by PciDevice.
        def bar_read(self, bar: int, offset: int, size: int) -> bytes: ...
        def bar_write(self, bar: int, offset: int, data: bytes) -> None: ...
        def on_config_write(self, offset: int, data: bytes) -> None: ...
        def on_config_read(self, offset: int, size: int) -> bytes | None: ...
        def on_disconnected(self) -> None: ...
        def on_reset(self) -> None: ...
        def on_irqs_changed(self, index: int) -> None: ...
        def on_close(self) -> None: ...
        async def background(self) -> None: ...
        def log_guest(self, kind: str, msg: str, *args: object, level: int = ...) -> None: ...

    # --- device and regions --------------------------------------------------

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            flags=vfio.DEVICE_FLAGS_RESET | vfio.DEVICE_FLAGS_PCI,
            num_regions=vfio.PCI_NUM_REGIONS,
            num_irqs=vfio.PCI_NUM_IRQS,
        )

    def region_info(self, index: int) -> RegionInfo:
        rw = vfio.REGION_FLAG_READ | vfio.REGION_FLAG_WRITE
        if 0 <= index <= 5:
            bar = self.bars[index]
            if bar is None:
                return RegionInfo(index=index, flags=0, size=0)
            if bar.memfd is None:
                return RegionInfo(index=index, flags=rw, size=bar.size)
            areas = tuple(SparseArea(off, size) for off, size in bar.mmap_areas)
            return RegionInfo(
                index=index,
                flags=rw | vfio.REGION_FLAG_MMAP,
                size=bar.size,
                fd=bar.memfd,
                fd_offset=0,
                sparse_areas=areas,
            )
        if index == vfio.PCI_CONFIG_REGION_INDEX:
            return RegionInfo(index=index, flags=rw, size=self.config.size)
        if index == vfio.PCI_ROM_REGION_INDEX and self.rom:
            return RegionInfo(index=index, flags=vfio.REGION_FLAG_READ, size=len(self.rom))
        if index in (vfio.PCI_ROM_REGION_INDEX, vfio.PCI_VGA_REGION_INDEX):
            return RegionInfo(index=index, flags=0, size=0)
        raise OSError(errno.EINVAL, f"no region {index}")

    def _region_size(self, index: int) -> int:
        if 0 <= index <= 5:
            bar = self.bars[index]
            return bar.size if bar is not None else 0
        if index == vfio.PCI_CONFIG_REGION_INDEX:
            return self.config.size
        if index == vfio.PCI_ROM_REGION_INDEX:
            return len(self.rom)
        if index == vfio.PCI_VGA_REGION_INDEX:
            return 0
        raise OSError(errno.EINVAL, f"no region {index}")

    def _check_access(self, index: int, offset: int, count: int) -> None:
        size = self._region_size(index)
        if size == 0:
            raise OSError(errno.EINVAL, f"region {index} is not implemented")
        if offset < 0 or count < 0 or offset + count > size:
            raise OSError(errno.EINVAL, f"region {index}: {offset:#x}+{count:#x} beyond {size:#x}")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        bar = self.bars[index] if 0 <= index <= 5 else None
        if bar is None:
            # Config space, the ROM, or an error (one place for all checks).
            self._check_access(index, offset, count)
            if count == 0:
                return b""
            if index == vfio.PCI_CONFIG_REGION_INDEX:
                if offset < cfg.STATUS + 2 and cfg.STATUS < offset + count:
                    self._refresh_status()
                special = self.on_config_read(offset, count)
                if special is not None:
                    if len(special) != count:
                        raise OSError(errno.EIO, "device returned a short config read")
                    return bytes(special)
                return self.config.read(offset, count)
            return self.rom[offset : offset + count]
        # BAR accesses are the hot path: keep the checks inline.
        if offset < 0 or count <= 0 or offset + count > bar.size:
            if count == 0 and 0 <= offset <= bar.size:
                return b""
            raise OSError(errno.EINVAL, f"BAR{index}: {offset:#x}+{count:#x} beyond {bar.size:#x}")
        if self.msix_table is not None:
            pending = self.irqs.indexes[vfio.PCI_MSIX_IRQ_INDEX].pending
            special = self.msix_table.read(index, offset, count, pending)
            if special is not None:
                return special
        if bar.mmap_areas and bar.in_mmap_area(offset, count):
            return bytes(bar.memory[offset : offset + count])
        data = self.bar_read(index, offset, count)
        if len(data) != count:
            self.log.error(
                "bar_read(%d, %#x, %d) returned %d bytes", index, offset, count, len(data)
            )
            raise OSError(errno.EIO, "device returned a short read")
        return bytes(data)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        bar = self.bars[index] if 0 <= index <= 5 else None
        count = len(data)
        if bar is None:
            self._check_access(index, offset, count)
            if not data:
                return
            if index == vfio.PCI_ROM_REGION_INDEX:
                raise OSError(errno.EINVAL, "the expansion ROM is read-only")
            self._config_write(offset, bytes(data))
            return
        if offset < 0 or count <= 0 or offset + count > bar.size:
            if count == 0 and 0 <= offset <= bar.size:
                return
            raise OSError(errno.EINVAL, f"BAR{index}: {offset:#x}+{count:#x} beyond {bar.size:#x}")
        if self.msix_table is not None:
            vectors = self.msix_table.write(index, offset, data)
            if vectors is not None:
                for vector in vectors:
                    self.irqs.retry_pending(vfio.PCI_MSIX_IRQ_INDEX, vector)
                return
        if bar.mmap_areas and bar.in_mmap_area(offset, count):
            bar.memory[offset : offset + count] = data
            return
        self.bar_write(index, offset, bytes(data))

    # --- config space side effects ---------------------------------------------

    def _refresh_status(self) -> None:
        status = self.config.get_u16(cfg.STATUS) & ~cfg.STATUS_INTERRUPT
        if self.irqs.intx_asserted():
            status |= cfg.STATUS_INTERRUPT
        self.config.update_u16(cfg.STATUS, status)

    def _config_write(self, offset: int, data: bytes) -> None:
        old_command = self.config.get_u16(cfg.COMMAND)
        self.config.write(offset, data)
        end = offset + len(data)

        def touches(reg: int, width: int) -> bool:
            return offset < reg + width and reg < end

        if touches(cfg.COMMAND, 2):
            new_command = self.config.get_u16(cfg.COMMAND)
            if (
                old_command & cfg.COMMAND_INTX_DISABLE
                and not new_command & cfg.COMMAND_INTX_DISABLE
            ):
                self.irqs.intx_reenabled()
        flr = False
        if self.express_offset is not None and touches(self.express_offset + caps.EXP_DEVCTL, 2):
            devctl_off = self.express_offset + caps.EXP_DEVCTL
            devctl = self.config.get_u16(devctl_off)
            if devctl & caps.EXP_DEVCTL_BCR_FLR:
                self.config.update_u16(devctl_off, devctl & ~caps.EXP_DEVCTL_BCR_FLR)
                flr = True
        if self.msix is not None and touches(self.msix.offset + caps.MSIX_FLAGS, 2):
            for vector in range(self.msix.vectors):  # the function mask may have lifted
                self.irqs.retry_pending(vfio.PCI_MSIX_IRQ_INDEX, vector)
        if self._sriov is not None and touches(self._sriov.layout.offset + caps.SRIOV_CTRL, 0x0A):
            self._sriov.written()
        if flr:
            self.log_guest("function level reset", "function level reset by the guest")
            self._reset(full=True)
            return
        self.on_config_write(offset, data)

    # --- interrupts ------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        if not 0 <= index < vfio.PCI_NUM_IRQS or index in self._absent_irqs:
            raise OSError(errno.EINVAL, f"no IRQ index {index}")
        count = self.irqs.indexes[index].count
        flags = vfio.IRQ_INFO_EVENTFD
        if index == vfio.PCI_INTX_IRQ_INDEX:
            flags |= vfio.IRQ_INFO_MASKABLE | vfio.IRQ_INFO_AUTOMASKED
        elif index in (vfio.PCI_MSI_IRQ_INDEX, vfio.PCI_MSIX_IRQ_INDEX):
            flags |= vfio.IRQ_INFO_NORESIZE
        return IrqInfo(index=index, flags=flags, count=count)

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        data: bytes,
        fds: Sequence[int],
    ) -> None:
        if index in self._absent_irqs:
            raise OSError(errno.EINVAL, f"no IRQ index {index}")
        self.irqs.set_irqs(index, flags, start, count, data, fds)
        self.on_irqs_changed(index)

    def _msix_masked(self, index: int, vector: int) -> bool:
        if index != vfio.PCI_MSIX_IRQ_INDEX or self.msix_table is None or self.msix is None:
            return False
        ctrl = self.config.get_u16(self.msix.offset + caps.MSIX_FLAGS)
        return self.msix_table.masked(vector, bool(ctrl & caps.MSIX_FLAGS_MASKALL))

    def _intx_allowed(self) -> bool:
        return not self.config.get_u16(cfg.COMMAND) & cfg.COMMAND_INTX_DISABLE

    # --- DMA, reset, lifetime --------------------------------------------------------

    def dma_map(self, mapping: DmaMapping) -> None:
        self.dma.map(mapping)

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        self.dma.unmap(address, size, flags)

    def reset(self) -> None:
        with self.device_lock:
            self.log_guest("reset", "device reset")
            self._reset(full=False)

    def _reset(self, *, full: bool) -> None:
        if full:
            for irq in self.irqs.indexes:
                irq.masked = [False] * irq.count
                irq.pending = [False] * irq.count
            self.irqs.intx_level = False
            self.config.reset()
        else:
            self.irqs.close_all()
            self.config.reset(keep=_RESET_KEEPS)
        if self.msix_table is not None:
            self.msix_table.reset()
        if self._sriov is not None:
            self._sriov.reset()
        if self.migration is not None:
            self.migration.reset()
        self.on_reset()

    def connected(self, port: DmaPort) -> None:
        self._port = port

    def disconnected(self) -> None:
        try:
            self.on_disconnected()  # before the mappings go: the device may still stop DMA
        except Exception:
            self.log.exception("on_disconnected failed")
        self.dma.clear()
        self.dma.dirty = None
        self.irqs.close_all()
        self._port = None

    def close(self) -> None:
        """Release everything (the device is being removed); safe to call twice."""
        with self.device_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.on_close()
            finally:
                self.disconnected()
                for bar in self.bars:
                    if bar is not None:
                        bar.close()
                self.bars = [None] * 6

    async def run(self) -> None:
        await self.background()

    # --- DEVICE_FEATURE and migration data ------------------------------------------

    def _offered_migration(self) -> MigrationSession | None:
        return self.migration if self._migratable else None

    def device_feature(self, flags: int, data: bytes) -> bytes:
        return features.device_feature(self._offered_migration(), self.dma, flags, data)

    def mig_data_read(self, size: int) -> bytes:
        session = self._offered_migration()
        if session is None:
            raise OSError(errno.EINVAL, "the device is not migratable")
        return session.data_read(size)

    def mig_data_write(self, data: bytes) -> None:
        session = self._offered_migration()
        if session is None:
            raise OSError(errno.EINVAL, "the device is not migratable")
        session.data_write(data)
