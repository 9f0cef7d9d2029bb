"""PciDevice: the API a parent driver implements.

A parent subclasses PciDevice, describes identity, BARs and capabilities in
``__init__``, and overrides the handlers it needs.  It never sees a
vfio-user message: PciDevice implements ``DeviceBackend``.

Sketch of a parent device (``samples/counter.py`` is the runnable one)::

    class Counter(PciDevice):
        def __init__(self) -> None:
            super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x0001,
                                         class_code=0xFF0000))
            self.add_bar(0, 0x1000, BarKind.MEM32)
            self.add_msi(vectors=1)
            self.value = 0

        def bar_read(self, bar: int, offset: int, size: int) -> bytes:
            return self.value.to_bytes(size, "little")

        def bar_write(self, bar: int, offset: int, data: bytes) -> None:
            self.value = int.from_bytes(data, "little")
            self.raise_irq(0)

        def on_reset(self) -> None:
            self.value = 0

What PciDevice does for the parent:

* Config space (``self.config``): the standard header from PciIdentity,
  BAR sizing, capability lists, write masks; guest writes land there and
  ``on_config_write`` is told afterwards.
* Regions as vfio-pci numbers them (BAR0-5, ROM 6, config 7, VGA 8), with
  bounds checks.  A BAR access reaches ``bar_read``/``bar_write`` unless it
  lies wholly inside the MSI-X table or PBA (served here) or inside an mmap
  area (served from the shared memory, exactly what a client that mapped it
  would see - QEMU traps mapped areas at times, e.g. while INTx is pending).
* Interrupts: SET_IRQS bookkeeping, ``raise_irq`` / ``trigger`` /
  ``set_intx``, masks and pending bits.
* DMA: ``self.dma`` (translate) and ``dma_read``/``dma_write``.
* Reset: DEVICE_RESET behaves like the kernel's VFIO_DEVICE_RESET, which
  saves and restores config space around a function reset: the registers
  the VMM programmed (command, BARs, ROM BAR, cache line size, latency
  timer, interrupt line) are kept, everything else (capability control
  registers, status bits, MSI-X table) returns to its power-on value, all
  interrupt eventfds are closed and the migration state returns to
  RUNNING.  A guest-initiated FLR (PCI Express Device Control bit 15)
  resets all of config space and keeps the eventfds (the VMM did not ask).
* Migration v2 (when ``migration_flags`` is set): DEVICE_FEATURE, the state
  FSM, MIG_DATA_READ/WRITE, DMA dirty logging.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import struct
from collections.abc import MutableMapping, Sequence
from typing import Any

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.pci.bars import Bar, BarKind, create_bar
from mdevcore.pci.config import ConfigSpace
from mdevcore.pci.dma import DirtyLog, DmaTable
from mdevcore.pci.irq import IrqController
from mdevcore.pci.migration import (
    MIGRATION_FLAGS_ALL,
    MIGRATION_STOP_COPY,
    SAVING_STATES,
    MigrationStream,
    MigState,
    next_state,
)
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import (
    DeviceInfo,
    DmaMapping,
    DmaPort,
    IrqInfo,
    RegionInfo,
    SparseArea,
)

__all__ = ["BarKind", "PciDevice", "PciIdentity"]

log = logging.getLogger(__name__)

DEVICE_FEATURE_MIG_DATA_SIZE = 9
_FEATURE_FLAGS = (
    vfio.DEVICE_FEATURE_MASK
    | vfio.DEVICE_FEATURE_GET
    | vfio.DEVICE_FEATURE_SET
    | vfio.DEVICE_FEATURE_PROBE
)
_GET, _SET = vfio.DEVICE_FEATURE_GET, vfio.DEVICE_FEATURE_SET
# Config registers a DEVICE_RESET leaves alone (see the module doc).
_RESET_KEEPS = (
    (cfg.COMMAND, 2),
    (cfg.CACHE_LINE_SIZE, 2),
    (cfg.BAR0, 24),
    (cfg.ROM_ADDRESS, 4),
    (cfg.INTERRUPT_LINE, 1),
)
_MAX_MIGRATION_BYTES = 256 << 20
_MAX_BITMAP_BYTES = 256 << 20
_MAX_LOG_RANGES = 1 << 16


@dataclasses.dataclass(frozen=True, slots=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int  # 24 bits: base class << 16 | subclass << 8 | prog-if
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 1  # 1 = INTA, 0 = no INTx
    command: int = 0  # initial command register
    status: int = 0  # initial status register (capability bit is managed)


class _DeviceLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the device's (current) name."""

    def __init__(self, logger: logging.Logger, device: PciDevice) -> None:
        super().__init__(logger, None)
        self.device = device

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[{self.device.name}] {msg}", kwargs


class PciDevice:
    """Base class of every emulated PCI device.

    Attributes a subclass may use:
      config   -- ConfigSpace: read(off, n) / write(off, data) / raw bytes,
                  set(off, data, writable_mask=...) for vendor-specific bytes.
      dma      -- DmaTable: translate(iova, length, write) -> memoryview
                  (OSError(EFAULT) when not fully inside one mapping).
      name     -- used in log messages (defaults to the class name).
    """

    # VFIO_MIGRATION_* bits; 0 = not migratable.
    migration_flags: int = 0

    def __init__(self, identity: PciIdentity, *, config_size: int = 256) -> None:
        if self.migration_flags:
            _check_migration_flags(self.migration_flags)
        self.identity = identity
        self.log = _DeviceLog(log, self)
        self.config = ConfigSpace(config_size)
        self.bars: list[Bar | None] = [None] * 6
        self.rom = b""  # expansion ROM image (padded to its power-of-two size)
        self._bar_upper: set[int] = set()  # register indexes holding 64-bit upper halves
        self.dma = DmaTable()
        self.irqs = IrqController(
            [1 if identity.interrupt_pin else 0, 0, 0, 1, 1], self._intx_allowed, self._msix_masked
        )
        self.msi: caps.MsiLayout | None = None
        self.msix: caps.MsixLayout | None = None
        self._msix_table = bytearray()
        # Whether the client programs our MSI-X table itself (see _msix_masked).
        self._msix_table_owned = False
        self.pm_offset: int | None = None
        self.express_offset: int | None = None
        self.sriov: caps.SriovLayout | None = None
        self._sriov_state = (0, False)
        self._port: DmaPort | None = None
        self.mig_state = MigState.RUNNING
        self._stream = MigrationStream(_MAX_MIGRATION_BYTES)
        # A parent may have named the device before calling us: keep that.
        self.name = getattr(self, "_name", None) or type(self).__name__
        self._write_header(identity)

    @property
    def name(self) -> str:
        """The device's name in log messages (a parent may set e.g. its UUID)."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        if "irqs" in self.__dict__:  # not yet built when set before __init__
            self.irqs.owner = value
            self.dma.owner = value

    def _write_header(self, ident: PciIdentity) -> None:
        c = self.config
        c.set(cfg.VENDOR_ID, ident.vendor_id.to_bytes(2, "little"))
        c.set(cfg.DEVICE_ID, ident.device_id.to_bytes(2, "little"))
        c.set(cfg.COMMAND, ident.command.to_bytes(2, "little"), cfg.COMMAND_WRITABLE)
        status = ident.status & ~cfg.STATUS_CAP_LIST
        c.set(cfg.STATUS, status.to_bytes(2, "little"), w1c_mask=cfg.STATUS_W1C)
        c.set(cfg.REVISION_ID, bytes([ident.revision]))
        c.set(cfg.CLASS_PROG, ident.class_code.to_bytes(3, "little"))
        c.set(cfg.CACHE_LINE_SIZE, b"\x00\x00", writable_mask=0xFFFF)
        c.set(cfg.HEADER_TYPE, b"\x00")
        c.set(cfg.SUBSYSTEM_VENDOR_ID, ident.subsystem_vendor_id.to_bytes(2, "little"))
        c.set(cfg.SUBSYSTEM_ID, ident.subsystem_id.to_bytes(2, "little"))
        c.set(cfg.INTERRUPT_LINE, b"\x00", writable_mask=0xFF)
        c.set(cfg.INTERRUPT_PIN, bytes([ident.interrupt_pin]))

    # --- description (call from __init__) ---------------------------------

    def add_bar(
        self,
        index: int,
        size: int,
        kind: BarKind = BarKind.MEM32,
        *,
        prefetchable: bool = False,
        mmap_areas: tuple[tuple[int, int], ...] = (),
    ) -> memoryview | None:
        """Declare BAR ``index`` (0-5) of ``size`` bytes (power of two).

        ``mmap_areas`` ((offset, size), ...) are backed by a memfd the client
        mmaps (sparse-mmap capability); the returned memoryview is that
        shared memory (None when there are no mmap areas).  Accesses outside
        the areas reach bar_read / bar_write; the default handlers serve the
        BAR's backing memory (``self.bars[index].memory``).
        """
        taken = self.bars[index] is not None if 0 <= index <= 5 else False
        if taken or index in self._bar_upper:
            raise ValueError(f"BAR{index} already declared")
        if (
            kind is BarKind.MEM64
            and index < 5
            and (self.bars[index + 1] or index + 1 in self._bar_upper)
        ):
            raise ValueError(f"BAR{index + 1} is taken; a 64-bit BAR{index} needs it")
        bar = create_bar(self.config, index, size, kind, prefetchable, mmap_areas)
        self.bars[index] = bar
        if kind is BarKind.MEM64:
            self._bar_upper.add(index + 1)
        return bar.memory if mmap_areas else None

    def add_rom(self, image: bytes) -> None:
        """Declare an expansion ROM holding ``image`` (region 6, read-only).

        Its BAR at 0x30 sizes like any memory BAR (bit 0 = enable).
        """
        if self.rom:
            raise ValueError("expansion ROM already declared")
        if not image:
            raise ValueError("empty ROM image")
        size = max(2048, 1 << (len(image) - 1).bit_length())
        self.rom = bytes(image) + bytes(size - len(image))
        self.config.set(cfg.ROM_ADDRESS, bytes(4), writable_mask=(~(size - 1) & 0xFFFFF800) | 1)

    def add_pm(self, *, offset: int | None = None) -> int:
        """Power-management capability; returns its config offset."""
        self.pm_offset = caps.add_pm(self.config, offset=offset)
        return self.pm_offset

    def add_msi(
        self,
        vectors: int = 1,
        *,
        addr64: bool = True,
        per_vector_mask: bool = False,
        offset: int | None = None,
    ) -> int:
        """MSI capability with ``vectors`` (power of two <= 32); returns its offset."""
        if self.msi is not None:
            raise ValueError("MSI capability already added")
        self.msi = caps.add_msi(
            self.config, vectors, addr64=addr64, per_vector_mask=per_vector_mask, offset=offset
        )
        self.irqs.resize(vfio.PCI_MSI_IRQ_INDEX, vectors)
        return self.msi.offset

    def add_msix(
        self,
        vectors: int,
        *,
        table_bar: int,
        table_offset: int,
        pba_bar: int,
        pba_offset: int,
        offset: int | None = None,
    ) -> int:
        """MSI-X capability; table and PBA live in already declared memory BARs."""
        if self.msix is not None:
            raise ValueError("MSI-X capability already added")
        layout = caps.MsixLayout(0, vectors, table_bar, table_offset, pba_bar, pba_offset)
        for bar_index, start, length in (
            (table_bar, table_offset, layout.table_size),
            (pba_bar, pba_offset, layout.pba_size),
        ):
            bar = self.bars[bar_index] if 0 <= bar_index <= 5 else None
            if bar is None or bar.kind is BarKind.IO:
                raise ValueError(f"MSI-X structures need a declared memory BAR, not {bar_index}")
            if start + length > bar.size:
                raise ValueError(f"MSI-X structure {start:#x}+{length:#x} outside BAR{bar_index}")
        if table_bar == pba_bar and not (
            table_offset + layout.table_size <= pba_offset
            or pba_offset + layout.pba_size <= table_offset
        ):
            raise ValueError("MSI-X table and PBA overlap")
        self.msix = caps.add_msix(self.config, layout, offset=offset)
        self._msix_table = self._msix_table_defaults()
        self.irqs.resize(vfio.PCI_MSIX_IRQ_INDEX, vectors)
        return self.msix.offset

    def _msix_table_defaults(self) -> bytearray:
        assert self.msix is not None
        entry = bytes(12) + caps.MSIX_ENTRY_CTRL_MASKBIT.to_bytes(4, "little")
        return bytearray(entry * self.msix.vectors)

    def add_express(
        self, *, device_type: int = caps.EXP_TYPE_ENDPOINT, offset: int | None = None
    ) -> int:
        """PCI Express capability (device_type 0 = endpoint); makes config 4 KiB."""
        if self.express_offset is not None:
            raise ValueError("PCI Express capability already added")
        self.express_offset = caps.add_express(self.config, device_type=device_type, offset=offset)
        return self.express_offset

    def add_sriov(
        self, *, total_vfs: int, vf_offset: int, vf_stride: int, vf_device_id: int
    ) -> int:
        """SR-IOV extended capability; returns its offset (>= 0x100).

        The guest (or host) programming NumVFs / VF Enable is reported
        through ``on_sriov_change``.
        """
        if self.express_offset is None:
            raise ValueError("SR-IOV needs the PCI Express capability (add_express first)")
        self.sriov = caps.add_sriov(
            self.config,
            total_vfs=total_vfs,
            vf_offset=vf_offset,
            vf_stride=vf_stride,
            vf_device_id=vf_device_id,
        )
        return self.sriov.offset

    # --- handlers a subclass overrides -----------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``bar`` (already bounds-checked).

        The default serves the BAR's backing memory.
        """
        memory = self._bar(bar).memory
        return bytes(memory[offset : offset + size])

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """Write to BAR ``bar`` (already bounds-checked); default: backing memory."""
        memory = self._bar(bar).memory
        memory[offset : offset + len(data)] = data

    def on_config_write(self, offset: int, data: bytes) -> None:
        """Called after a config-space write has been applied (masks honoured)."""

    def on_reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR): return device state to power-on."""

    def on_sriov_change(self, num_vfs: int, vf_enable: bool) -> None:
        """NumVFs or VF Enable changed in the SR-IOV capability."""

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        """One migration arc is being taken (e.g. quiesce when entering STOP).

        Raise OSError(errno) to refuse the arc: the device stays in ``old``.
        """

    # --- interrupts ------------------------------------------------------

    def raise_irq(self, vector: int = 0) -> None:
        """Signal interrupt ``vector`` the way the client enabled it.

        Uses the index the client has eventfds on (MSI-X, else MSI, else
        INTx).  Masked vectors become pending (MSI-X: visible in the PBA)
        and fire on unmask.  INTx auto-masks; SET_IRQS UNMASK unmasks, and
        the command register's INTx-disable bit holds it back.
        """
        index = self.irqs.active_index()
        if index is None:
            if self.irqs.indexes[vfio.PCI_INTX_IRQ_INDEX].count and vector == 0:
                # Latch it: the guest sees Interrupt Status until it enables INTx.
                self.irqs.signal(vfio.PCI_INTX_IRQ_INDEX, 0)
            return
        if index == vfio.PCI_INTX_IRQ_INDEX and vector != 0:
            self.log.debug("vector %d raised while only INTx is enabled", vector)
            vector = 0
        self.irqs.signal(index, vector)

    def trigger(self, irq_index: int, vector: int = 0) -> bool:
        """Low level: signal eventfd ``vector`` of IRQ index ``irq_index``.

        Returns False if nothing was signalled (no eventfd or masked).
        """
        if not 0 <= irq_index < vfio.PCI_NUM_IRQS:
            raise ValueError(f"no IRQ index {irq_index}")
        return self.irqs.signal(irq_index, vector)

    def set_intx(self, level: bool) -> None:
        """Level-triggered INTx: while asserted, every unmask signals again."""
        self.irqs.set_intx_level(level)

    def _intx_allowed(self) -> bool:
        return not self.config.get_u16(cfg.COMMAND) & cfg.COMMAND_INTX_DISABLE

    # --- DMA -------------------------------------------------------------

    async def dma_read(self, iova: int, count: int) -> bytes:
        """Read guest memory: via the mapping when fd-backed, else by DMA_READ message."""
        region = self.dma.find(iova, count, write=False)
        if region.memory is not None:
            start = iova - region.iova
            return bytes(region.memory[start : start + count])
        if self._port is None:
            raise OSError(errno.ENODEV, "no client to do message-based DMA")
        return await self._port.dma_read(iova, count)

    async def dma_write(self, iova: int, data: bytes) -> None:
        region = self.dma.find(iova, len(data), write=True)
        self.dma.mark_dirty(iova, len(data))
        if region.memory is not None:
            start = iova - region.iova
            region.memory[start : start + len(data)] = data
            return
        if self._port is None:
            raise OSError(errno.ENODEV, "no client to do message-based DMA")
        await self._port.dma_write(iova, data)

    # --- migration hooks (optional) --------------------------------------

    def save_state(self) -> bytes:
        """Device state for STOP_COPY (called in STOP)."""
        raise NotImplementedError

    def save_precopy(self) -> bytes:
        """Initial state offered in PRE_COPY (default none).

        Whatever is returned here precedes save_state() in the stream, so
        load_state() receives precopy + stop-copy bytes concatenated.
        """
        return b""

    def load_state(self, data: bytes) -> None:
        """Restore state at RESUMING -> STOP; raise OSError(EINVAL) if invalid."""
        raise NotImplementedError

    def migration_data_size(self) -> int:
        """Estimated STOP_COPY data size (DEVICE_FEATURE MIG_DATA_SIZE).

        The default measures save_state(); override it when saving is costly
        or only valid in STOP.
        """
        return len(self.save_state())

    # =====================================================================
    # DeviceBackend implementation (called by the vfio-user engine)
    # =====================================================================

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
                return self.config.read(offset, count)
            return self.rom[offset : offset + count]
        # BAR accesses are the hot path: keep the checks inline.
        if offset < 0 or count <= 0 or offset + count > bar.size:
            if count == 0 and 0 <= offset <= bar.size:
                return b""
            raise OSError(errno.EINVAL, f"BAR{index}: {offset:#x}+{count:#x} beyond {bar.size:#x}")
        if self.msix is not None:
            special = self._msix_read(index, offset, count)
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
        if self.msix is not None and self._msix_write(index, offset, data):
            return
        if bar.mmap_areas and bar.in_mmap_area(offset, count):
            bar.memory[offset : offset + count] = data
            return
        self.bar_write(index, offset, bytes(data))

    def _bar(self, index: int) -> Bar:
        bar = self.bars[index] if 0 <= index <= 5 else None
        if bar is None:
            raise OSError(errno.EINVAL, f"BAR{index} is not implemented")
        return bar

    # --- config space side effects ---------------------------------------

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
        if self.sriov is not None and touches(self.sriov.offset + caps.SRIOV_CTRL, 0x0A):
            self._sriov_written()
        if flr:
            self.log.info("function level reset by the guest")
            self._reset(full=True)
            return
        self.on_config_write(offset, data)

    def _sriov_written(self) -> None:
        assert self.sriov is not None
        base = self.sriov.offset
        num = self.config.get_u16(base + caps.SRIOV_NUM_VF)
        enabled = bool(self.config.get_u16(base + caps.SRIOV_CTRL) & caps.SRIOV_CTRL_VFE)
        old_num, old_enabled = self._sriov_state
        if num != old_num and (old_enabled or num > self.sriov.total_vfs):
            # NumVFs may only change while VF Enable is clear, within TotalVFs.
            self.log.info("NumVFs write %d refused (enabled=%s)", num, old_enabled)
            self.config.update_u16(base + caps.SRIOV_NUM_VF, old_num)
            num = old_num
        if (num, enabled) != self._sriov_state:
            self._sriov_state = (num, enabled)
            self.on_sriov_change(num, enabled)

    def sriov_configure(self, num_vfs: int) -> None:
        """Host-side VF setup, with sysfs ``sriov_numvfs`` semantics.

        0 disables the VFs; n > 0 sets NumVFs = n and VF Enable.  ERANGE
        beyond TotalVFs, EBUSY for a different non-zero count while VFs are
        enabled, ENOENT without an SR-IOV capability; same count: no-op.
        The parent hears of it through on_sriov_change, as for guest writes.
        """
        if self.sriov is None:
            raise OSError(errno.ENOENT, "no SR-IOV capability")
        if not 0 <= num_vfs <= self.sriov.total_vfs:
            raise OSError(errno.ERANGE, f"{num_vfs} VFs, TotalVFs is {self.sriov.total_vfs}")
        current, enabled = self._sriov_state
        if enabled and num_vfs == current:
            return
        if enabled and num_vfs:
            raise OSError(errno.EBUSY, "VFs are enabled; disable them first")
        base = self.sriov.offset
        ctrl = self.config.get_u16(base + caps.SRIOV_CTRL)
        if num_vfs:
            self.config.update_u16(base + caps.SRIOV_NUM_VF, num_vfs)
            ctrl |= caps.SRIOV_CTRL_VFE | caps.SRIOV_CTRL_MSE
        else:
            ctrl &= ~(caps.SRIOV_CTRL_VFE | caps.SRIOV_CTRL_MSE)
        self.config.update_u16(base + caps.SRIOV_CTRL, ctrl)
        self._sriov_written()

    @property
    def sriov_state(self) -> tuple[int, bool]:
        """(NumVFs, VF Enable) as last programmed."""
        return self._sriov_state

    # --- MSI-X table and PBA ------------------------------------------------

    def _msix_area(self, index: int, offset: int, count: int) -> str | None:
        m = self.msix
        if m is None:
            return None
        if (
            index == m.table_bar
            and m.table_offset <= offset
            and offset + count <= m.table_offset + m.table_size
        ):
            return "table"
        if (
            index == m.pba_bar
            and m.pba_offset <= offset
            and offset + count <= m.pba_offset + m.pba_size
        ):
            return "pba"
        return None

    def _msix_read(self, index: int, offset: int, count: int) -> bytes | None:
        area = self._msix_area(index, offset, count)
        if area is None:
            return None
        assert self.msix is not None
        if area == "table":
            start = offset - self.msix.table_offset
            return bytes(self._msix_table[start : start + count])
        pending = self.irqs.indexes[vfio.PCI_MSIX_IRQ_INDEX].pending
        bits = sum(1 << i for i, p in enumerate(pending) if p)
        pba = bits.to_bytes(self.msix.pba_size, "little")
        start = offset - self.msix.pba_offset
        return pba[start : start + count]

    def _msix_write(self, index: int, offset: int, data: bytes) -> bool:
        area = self._msix_area(index, offset, len(data))
        if area is None:
            return False
        assert self.msix is not None
        if area == "table":
            start = offset - self.msix.table_offset
            self._msix_table[start : start + len(data)] = data
            self._msix_table_owned = True
            first = start // caps.MSIX_ENTRY_SIZE
            last = (start + len(data) - 1) // caps.MSIX_ENTRY_SIZE
            for vector in range(first, last + 1):
                self.irqs.retry_pending(vfio.PCI_MSIX_IRQ_INDEX, vector)
        return True  # PBA is read-only

    def _msix_masked(self, index: int, vector: int) -> bool:
        """MSI-X masks from the table and the function mask bit.

        Only honoured once the client has written our table: QEMU emulates
        the MSI-X table itself and never forwards table accesses, so with
        QEMU our copy keeps its power-on "all masked" state and delivery
        must follow SET_IRQS alone (QEMU then masks in its own emulation).
        A client that programs the table through the BAR gets PCI semantics.
        """
        if index != vfio.PCI_MSIX_IRQ_INDEX or self.msix is None or not self._msix_table_owned:
            return False
        ctrl = self.config.get_u16(self.msix.offset + caps.MSIX_FLAGS)
        if ctrl & caps.MSIX_FLAGS_MASKALL:
            return True
        entry = vector * caps.MSIX_ENTRY_SIZE + 12
        vector_ctrl = int.from_bytes(self._msix_table[entry : entry + 4], "little")
        return bool(vector_ctrl & caps.MSIX_ENTRY_CTRL_MASKBIT)

    # --- IRQs / DMA / reset entry points -------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        if not 0 <= index < vfio.PCI_NUM_IRQS:
            raise OSError(errno.EINVAL, f"no IRQ index {index}")
        count = self.irqs.indexes[index].count
        flags = vfio.IRQ_INFO_EVENTFD
        if index == vfio.PCI_INTX_IRQ_INDEX:
            flags |= vfio.IRQ_INFO_MASKABLE | vfio.IRQ_INFO_AUTOMASKED
        elif index in (vfio.PCI_MSI_IRQ_INDEX, vfio.PCI_MSIX_IRQ_INDEX):
            flags |= vfio.IRQ_INFO_NORESIZE
        return IrqInfo(index=index, flags=flags, count=count)

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        self.irqs.set_irqs(index, flags, start, count, data, fds)

    def dma_map(self, mapping: DmaMapping) -> None:
        self.dma.map(mapping)

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        self.dma.unmap(address, size, flags)

    def reset(self) -> None:
        self.log.info("device reset")
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
        if self.msix is not None:
            self._msix_table = self._msix_table_defaults()
            self._msix_table_owned = False
        self._sriov_state = (0, False)
        if self.migration_flags:
            self.mig_state = MigState.RUNNING
            self._stream.clear()
        self.on_reset()

    def connected(self, port: DmaPort) -> None:
        self._port = port

    def disconnected(self) -> None:
        self.dma.clear()
        self.dma.dirty = None
        self.irqs.close_all()
        self._port = None

    def close(self) -> None:
        """Release everything (the device is being removed)."""
        self.disconnected()
        for bar in self.bars:
            if bar is not None:
                bar.close()
        self.bars = [None] * 6

    async def run(self) -> None:
        """No background work by default."""
        return

    # --- DEVICE_FEATURE and migration ---------------------------------------

    def _features(self) -> dict[int, int]:
        """Offered features -> the GET/SET operations each supports."""
        if not self.migration_flags:
            return {}
        return {
            vfio.DEVICE_FEATURE_MIGRATION: _GET,
            vfio.DEVICE_FEATURE_MIG_DEVICE_STATE: _GET | _SET,
            DEVICE_FEATURE_MIG_DATA_SIZE: _GET,
            vfio.DEVICE_FEATURE_DMA_LOGGING_START: _SET,
            vfio.DEVICE_FEATURE_DMA_LOGGING_STOP: _SET,
            vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT: _GET,
        }

    def device_feature(self, flags: int, data: bytes) -> bytes:
        if flags & ~_FEATURE_FLAGS:
            raise OSError(errno.EINVAL, f"unknown DEVICE_FEATURE flags {flags:#x}")
        feature = flags & vfio.DEVICE_FEATURE_MASK
        ops = flags & (_GET | _SET)
        probe = bool(flags & vfio.DEVICE_FEATURE_PROBE)
        offered = self._features()
        if feature not in offered:
            raise OSError(errno.ENOTTY, f"feature {feature} not offered")
        if ops & ~offered[feature]:
            raise OSError(errno.EINVAL, f"feature {feature} does not support {ops:#x}")
        if probe:
            return b""
        if ops not in (_GET, _SET):
            raise OSError(errno.EINVAL, "exactly one of GET or SET is required")
        if feature == vfio.DEVICE_FEATURE_MIGRATION:
            return struct.pack("<Q", self.migration_flags)
        if feature == vfio.DEVICE_FEATURE_MIG_DEVICE_STATE:
            if ops == _SET:
                if len(data) < 4:
                    raise OSError(errno.EINVAL, "MIG_DEVICE_STATE needs a device_state")
                (wanted,) = struct.unpack_from("<I", data)
                self.set_migration_state(wanted)
            return struct.pack("<Ii", self.mig_state, -1)
        if feature == DEVICE_FEATURE_MIG_DATA_SIZE:
            if self.mig_state == MigState.STOP_COPY:
                return struct.pack("<Q", self._stream.pending_bytes())
            return struct.pack("<Q", self.migration_data_size())
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_START:
            return self._logging_start(data)
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_STOP:
            self.dma.dirty = None
            return b""
        return self._logging_report(data)

    def set_migration_state(self, wanted: int) -> None:
        """Walk the FSM to ``wanted`` one arc at a time (MIG_DEVICE_STATE SET)."""
        try:
            target = MigState(wanted)
        except ValueError:
            raise OSError(errno.EINVAL, f"no migration state {wanted}") from None
        while self.mig_state != target:
            step = next_state(self.migration_flags, self.mig_state, target)
            self._take_arc(self.mig_state, step)

    def _take_arc(self, old: MigState, new: MigState) -> None:
        try:
            if old == MigState.RESUMING and new == MigState.STOP:
                self.load_state(self._stream.received())
            self.on_migration_state(old, new)
            if new in SAVING_STATES and old not in SAVING_STATES:
                self._stream.start_saving()
                if new != MigState.STOP_COPY:
                    self._stream.append(self.save_precopy())
            if new == MigState.STOP_COPY:
                self._stream.append(self.save_state())
            if old in SAVING_STATES and new not in SAVING_STATES:
                self._stream.clear()
            if new == MigState.RESUMING:
                self._stream.start_resuming()
            if old == MigState.RESUMING:
                self._stream.clear()
        except OSError as exc:
            self.log.warning("migration arc %s -> %s failed: %s", old.name, new.name, exc)
            raise
        except Exception as exc:
            self.log.exception(
                "migration arc %s -> %s crashed; device in ERROR", old.name, new.name
            )
            self.mig_state = MigState.ERROR
            self._stream.clear()
            raise OSError(errno.EIO, f"migration arc {old.name} -> {new.name} failed") from exc
        self.log.debug("migration %s -> %s", old.name, new.name)
        self.mig_state = new

    def mig_data_read(self, size: int) -> bytes:
        if self.mig_state not in SAVING_STATES:
            raise OSError(errno.EINVAL, f"no migration data to read in {self.mig_state.name}")
        if size < 0:
            raise OSError(errno.EINVAL, "negative read size")
        return self._stream.read(size)

    def mig_data_write(self, data: bytes) -> None:
        if self.mig_state != MigState.RESUMING:
            raise OSError(errno.EINVAL, f"migration data written in {self.mig_state.name}")
        self._stream.write(data)

    def _logging_start(self, data: bytes) -> bytes:
        if len(data) < 16:
            raise OSError(errno.EINVAL, "DMA_LOGGING_START payload too short")
        page_size, num_ranges, _reserved = struct.unpack_from("<QII", data)
        if num_ranges > _MAX_LOG_RANGES or len(data) != 16 + 16 * num_ranges:
            raise OSError(errno.EINVAL, f"DMA_LOGGING_START with {num_ranges} ranges")
        if page_size <= 0 or page_size & (page_size - 1) or page_size > 1 << 30:
            raise OSError(errno.EINVAL, f"bad dirty page size {page_size}")
        page_size = max(page_size, 4096)  # the device may raise it; the reply says so
        ranges: list[tuple[int, int]] = []
        for i in range(num_ranges):
            iova, length = struct.unpack_from("<QQ", data, 16 + 16 * i)
            if length == 0 or iova + length > 1 << 64:
                raise OSError(errno.EINVAL, f"bad logging range {iova:#x}+{length:#x}")
            ranges.append((iova, length))
        ranges.sort()
        for (a, alen), (b, _) in zip(ranges, ranges[1:], strict=False):
            if a + alen > b:
                raise OSError(errno.EINVAL, "overlapping logging ranges")
        if self.dma.dirty is not None:
            raise OSError(errno.EBUSY, "DMA logging already started")
        self.dma.dirty = DirtyLog(page_size, ranges)
        return struct.pack("<QII", page_size, num_ranges, 0) + data[16:]

    def _logging_report(self, data: bytes) -> bytes:
        if len(data) < 24:
            raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT payload too short")
        iova, length, page_size = struct.unpack_from("<QQQ", data)
        log_ = self.dma.dirty
        if log_ is None:
            raise OSError(errno.EINVAL, "DMA logging not started")
        if page_size != log_.page_size or iova % page_size or length % page_size or not length:
            raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT range/page size mismatch")
        if iova + length > 1 << 64 or length // page_size > _MAX_BITMAP_BYTES * 8:
            raise OSError(errno.EINVAL, "DMA_LOGGING_REPORT range too large")
        return struct.pack("<QQQ", iova, length, page_size) + log_.report(iova, length)


def _check_migration_flags(flags: int) -> None:
    if flags & ~MIGRATION_FLAGS_ALL or not flags & MIGRATION_STOP_COPY:
        raise ValueError(f"migration_flags {flags:#x}: STOP_COPY is mandatory")
