"""PciDevice: the API a parent's device implements.

A parent subclasses PciDevice, describes identity, BARs and capabilities in
``__init__``, and overrides the hooks it needs.  It never sees a vfio-user
message: the DeviceBackend side lives in ``mdevcore.pci.backend``, and a
subclass that defines one of its names (``reset``, ``close``, ``run``,
``region_read``, ...) is refused when the class is created, with the hook
to use instead.

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

What the parent gets:

* Config space (``self.config``): the standard header from PciIdentity,
  BAR sizing, capability lists, write masks; guest writes land there and
  ``on_config_write`` is told afterwards.
* BARs: an access reaches ``bar_read``/``bar_write`` (bounds already
  checked; ``bar_read`` returns exactly ``size`` bytes) unless it lies
  wholly inside the MSI-X table or PBA (``mdevcore.pci.msix``) or inside
  an mmap area (served from the shared memory, exactly what a client that
  mapped it would see).
* Interrupts: ``raise_irq`` (MSI-X, MSI or INTx as the client set up),
  ``trigger``, ``set_intx`` for a level-triggered line, ``declare_irqs``;
  ``on_irqs_changed`` after the client changed them.
* DMA: ``self.dma`` (translate) and ``dma_read``/``dma_write``; the
  latter mark written pages dirty for migration.
* Reset: ``on_reset`` for DEVICE_RESET and FLR (see ``mdevcore.pci.backend``
  for what config space keeps).
* Migration v2 (when ``migration_flags`` is set): ``save_state`` /
  ``save_precopy`` / ``load_state`` and ``on_migration_state``; the FSM,
  the stream and DMA dirty logging are the framework's
  (``mig_session``, ``features``).
* Lifetime: ``background`` runs while the device is served; ``on_close``
  when it is removed (the core closes removed devices).
* Threading (the rule: ``mdevcore.vfio_user.locking``): a device may be
  served by a connection thread (``mdevd serve --io thread``, the
  default).  Every hook is then called with ``device_lock`` held, and the
  framework holds it for the trio side too: ``background`` runs under it
  except while it awaits, and ``reset``, ``close``, ``raise_irq``,
  ``set_migratable``, ... take it.  So a parent thinks of no lock, with
  one duty: hooks touch no trio object (no ``trio.Event.set()`` from
  ``bar_write``).  ``thread_safe_hooks`` says whether that holds; left
  None, a device with its own ``background`` is assumed to talk to it
  through trio and is served by trio, others by a thread.  Code of the
  parent's own that touches the device from trio outside these (a nursery
  of its own in ``background``, a sysfs attribute of a hosted parent)
  takes ``with device.device_lock:``.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import threading
from collections.abc import MutableMapping
from typing import Any, ClassVar

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.pci.backend import BACKEND_NAMES, PciBackend
from mdevcore.pci.bars import Bar, BarKind, create_bar
from mdevcore.pci.config import ConfigSpace
from mdevcore.pci.dma import DmaTable
from mdevcore.pci.irq import IrqController
from mdevcore.pci.mig_session import MigrationSession
from mdevcore.pci.migration import (
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    MigState,
)
from mdevcore.pci.msix import MsixTable
from mdevcore.pci.sriov import SriovControl
from mdevcore.ratelimit import RateLimitedLog
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DmaPort

__all__ = [
    "MIGRATION_P2P",
    "MIGRATION_PRE_COPY",
    "MIGRATION_STOP_COPY",
    "BarKind",
    "Irq",
    "MigState",
    "PciDevice",
    "PciIdentity",
]

log = logging.getLogger(__name__)

# What a parent overrides instead of a name the framework owns.
_INSTEAD = {
    "reset": "on_reset",
    "close": "on_close",
    "run": "background",
    "irq_info": "declare_irqs",
    "set_irqs": "on_irqs_changed",
    "region_read": "bar_read",
    "region_write": "bar_write (config: on_config_write)",
}


class Irq(enum.IntEnum):
    """VFIO's PCI interrupt indexes, as ``trigger``/``declare_irqs`` take them."""

    INTX = vfio.PCI_INTX_IRQ_INDEX
    MSI = vfio.PCI_MSI_IRQ_INDEX
    MSIX = vfio.PCI_MSIX_IRQ_INDEX
    ERR = vfio.PCI_ERR_IRQ_INDEX
    REQ = vfio.PCI_REQ_IRQ_INDEX


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


class PciDevice(PciBackend):
    """Base class of every emulated PCI device.

    Attributes a subclass may use:
      config   -- ConfigSpace: read(off, n) / write(off, data) / raw bytes,
                  set(off, data, writable_mask=...) for vendor-specific bytes.
      dma      -- DmaTable: translate(iova, length, write) -> memoryview
                  (OSError(EFAULT) when not fully inside one mapping).
      name     -- used in log messages (defaults to the class name).
      log      -- a logger that prefixes the name.
      log_guest(kind, msg, ...) -- for what a guest can make happen at will
                  (resets, bad register writes): rate-limited per kind.
    """

    # VFIO_MIGRATION_* bits; 0 = not migratable.
    migration_flags: int = 0
    # Whether the hooks may run on a connection thread (see the module doc):
    # None = yes unless the class has its own background().
    thread_safe_hooks: ClassVar[bool | None] = None
    # Microseconds a connection thread keeps polling for the client's next
    # request after serving one, while the client is in a burst (requests
    # closer together than this), instead of sleeping in recvmsg.  For
    # devices a guest waits on request by request (a doorbell per command
    # at queue depth 1): on a VM whose idle CPUs halt, waking a sleeping
    # thread costs more than the device's own work.  Costs up to a core
    # while the guest keeps the device busy; 0 = block at once.  A server
    # given spin_us explicitly uses that instead.
    request_spin_us: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        taken = sorted(BACKEND_NAMES & cls.__dict__.keys())
        if taken:
            hints = ", ".join(
                f"{name} (override {_INSTEAD[name]})" if name in _INSTEAD else name
                for name in taken
            )
            raise TypeError(
                f"{cls.__qualname__} defines {hints}: these belong to the vfio-user "
                "side of PciDevice and may not be replaced"
            )

    def __init__(
        self, identity: PciIdentity, *, config_size: int = 256, name: str | None = None
    ) -> None:
        self.identity = identity
        self.device_lock = threading.RLock()
        self._name = name or type(self).__name__
        self.log = _DeviceLog(log, self)
        self._guest_log: RateLimitedLog | None = None  # made on first use (most never need it)
        self.config = ConfigSpace(config_size)
        self.bars: list[Bar | None] = [None] * 6
        self.rom = b""  # expansion ROM image (padded to its power-of-two size)
        self._bar_upper: set[int] = set()  # register indexes holding 64-bit upper halves
        self.dma = DmaTable()
        self.irqs = IrqController(
            [1 if identity.interrupt_pin else 0, 0, 0, 1, 1], self._intx_allowed, self._msix_masked
        )
        self._absent_irqs: set[int] = set()
        self.msi: caps.MsiLayout | None = None
        self.msix: caps.MsixLayout | None = None
        self.msix_table: MsixTable | None = None
        self.pm_offset: int | None = None
        self.express_offset: int | None = None
        self.sriov: caps.SriovLayout | None = None
        self._sriov: SriovControl | None = None
        self._port: DmaPort | None = None
        self._closed = False
        self.migration = (
            MigrationSession(self.migration_flags, self, self.log) if self.migration_flags else None
        )
        self._migratable = True
        self.name = self._name  # tells the components
        self._write_header(identity)

    def log_guest(self, kind: str, msg: str, *args: object, level: int = logging.INFO) -> None:
        """Log an event the guest can repeat at will: the first few of ``kind``, then summaries.

        A guest resetting its device in a loop must not fill the disk or
        drown other devices' messages (mdevcore.ratelimit).
        """
        if self._guest_log is None:
            self._guest_log = RateLimitedLog(self.log)
        self._guest_log.log(level, "guest", kind, msg, *args)

    @property
    def name(self) -> str:
        """The device's name in log messages (a parent may set e.g. its UUID)."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value
        self.irqs.owner = value
        self.dma.owner = value

    @property
    def serve_in_thread(self) -> bool:
        """Whether a connection thread may serve this device (``thread_safe_hooks``)."""
        declared = type(self).thread_safe_hooks
        if declared is not None:
            return declared
        return type(self).background is PciDevice.background

    @property
    def mig_state(self) -> MigState:
        """The migration state (RUNNING for a device that does not migrate)."""
        return self.migration.state if self.migration is not None else MigState.RUNNING

    def set_migratable(self, on: bool) -> None:
        """Offer migration (the class's ``migration_flags``) or not, at run time.

        While off, DEVICE_FEATURE's migration features answer ENOTTY (pds:
        a VF migrates only while the PF's enable_lm is on).
        """
        if self.migration is None:
            raise ValueError(f"{type(self).__name__} has no migration_flags")
        with self.device_lock:
            if not on:
                self.migration.reset()
            self._migratable = on

    def set_migration_state(self, wanted: int) -> None:
        """Walk the FSM to ``wanted`` (what MIG_DEVICE_STATE SET does); for tests and tools."""
        with self.device_lock:
            session = self._offered_migration()
            if session is None:
                raise OSError(errno.ENOTTY, "the device is not migratable")
            session.set_state(wanted)

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
        self.msix_table = MsixTable(self.msix)
        self.irqs.resize(vfio.PCI_MSIX_IRQ_INDEX, vectors)
        return self.msix.offset

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
        self._sriov = SriovControl(
            self.config, self.sriov, lambda n, on: self.on_sriov_change(n, on), self.log
        )
        return self.sriov.offset

    def declare_irqs(self, index: int, count: int | None) -> None:
        """Set how many vectors IRQ ``index`` (an ``Irq``) offers the client.

        ``None``: the index does not exist at all (GET_IRQ_INFO and SET_IRQS
        answer EINVAL, as the kernel's mtty does for the ones it lacks);
        0 reports it with no vectors.  MSI and MSI-X follow their
        capabilities; call this for what config space does not say (e.g. an
        MSI vector without an MSI capability).
        """
        if not 0 <= index < vfio.PCI_NUM_IRQS:
            raise ValueError(f"no IRQ index {index}")
        if count is None:
            self._absent_irqs.add(index)
            count = 0
        else:
            self._absent_irqs.discard(index)
        self.irqs.resize(index, count)

    # --- hooks a subclass overrides --------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``bar`` (already bounds-checked).

        Must return exactly ``size`` bytes.  The default serves the BAR's
        backing memory.
        """
        memory = self._bar(bar).memory
        return bytes(memory[offset : offset + size])

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """Write to BAR ``bar`` (already bounds-checked); default: backing memory."""
        memory = self._bar(bar).memory
        memory[offset : offset + len(data)] = data

    def on_config_write(self, offset: int, data: bytes) -> None:
        """Called after a config-space write has been applied (masks honoured)."""

    def on_config_read(self, offset: int, size: int) -> bytes | None:
        """Bytes for a config read with side effects (e.g. virtio's pci_cfg window).

        Return None (the default) to read config space as it is; otherwise
        exactly ``size`` bytes.
        """
        return None

    def on_reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR): return device state to power-on."""

    def on_disconnected(self) -> None:
        """The client went away; its DMA mappings are still there: stop using them.

        The framework then unmaps them and closes the interrupt eventfds;
        device state is kept for the next client.
        """

    def on_irqs_changed(self, index: int) -> None:
        """The client changed IRQ ``index`` (SET_IRQS applied: eventfds, masks)."""

    def on_sriov_change(self, num_vfs: int, vf_enable: bool) -> None:
        """NumVFs or VF Enable changed in the SR-IOV capability."""

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        """One migration arc is being taken (e.g. quiesce when entering STOP).

        Raise OSError(errno) to refuse the arc: the device stays in ``old``.
        """

    def on_close(self) -> None:
        """The device is being removed: release what the parent opened."""

    async def background(self) -> None:
        """Background work while the device is served (default: none)."""
        return

    # --- interrupts ------------------------------------------------------

    def raise_irq(self, vector: int = 0) -> None:
        """Signal interrupt ``vector`` the way the client enabled it.

        Uses the index the client has eventfds on (MSI-X, else MSI, else
        INTx).  Masked vectors become pending (MSI-X: visible in the PBA)
        and fire on unmask.  INTx auto-masks; SET_IRQS UNMASK unmasks, and
        the command register's INTx-disable bit holds it back.
        """
        with self.device_lock:
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
        """Low level: signal eventfd ``vector`` of IRQ index ``irq_index`` (an ``Irq``).

        Returns False if nothing was signalled (no eventfd or masked).
        """
        if not 0 <= irq_index < vfio.PCI_NUM_IRQS:
            raise ValueError(f"no IRQ index {irq_index}")
        with self.device_lock:
            return self.irqs.signal(irq_index, vector)

    def set_intx(self, level: bool) -> None:
        """Level-triggered INTx: while asserted, every unmask signals again."""
        with self.device_lock:
            self.irqs.set_intx_level(level)

    @property
    def intx_level(self) -> bool:
        """Whether the device asserts its INTx line (see ``set_intx``)."""
        return self.irqs.intx_level

    def irq_in_use(self) -> Irq | None:
        """The index the client enabled (MSI-X, else MSI, else INTx), if any."""
        index = self.irqs.active_index()
        return None if index is None else Irq(index)

    # --- SR-IOV (host side) ---------------------------------------------------

    def sriov_configure(self, num_vfs: int) -> None:
        """Host-side VF setup, with sysfs ``sriov_numvfs`` semantics.

        0 disables the VFs; n > 0 sets NumVFs = n and VF Enable.  ERANGE
        beyond TotalVFs, EBUSY for a different non-zero count while VFs are
        enabled, ENOENT without an SR-IOV capability; same count: no-op.
        The parent hears of it through on_sriov_change, as for guest writes.
        """
        if self._sriov is None:
            raise OSError(errno.ENOENT, "no SR-IOV capability")
        with self.device_lock:
            self._sriov.configure(num_vfs)

    @property
    def sriov_state(self) -> tuple[int, bool]:
        """(NumVFs, VF Enable) as last programmed."""
        return self._sriov.state if self._sriov is not None else (0, False)

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
        """Write guest memory (the pages are logged dirty while migration logging runs)."""
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

    def _bar(self, index: int) -> Bar:
        bar = self.bars[index] if 0 <= index <= 5 else None
        if bar is None:
            raise OSError(errno.EINVAL, f"BAR{index} is not implemented")
        return bar
