"""PciDevice: the API a parent driver implements (CONTRACT - being implemented).

A parent subclasses PciDevice, describes identity, BARs and capabilities in
``__init__``, and overrides the handlers it needs.  It never sees a
vfio-user message: PciDevice implements ``DeviceBackend``.

Sketch of a parent device::

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

Signatures below are the contract other modules (samples/mtty, parents/pds,
the daemon) are written against.
"""

from __future__ import annotations

import dataclasses
import enum


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


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


class PciDevice:
    """Base class of every emulated PCI device.

    Attributes a subclass may use:
      config   -- ConfigSpace: read(off, n) / write(off, data) / raw bytes,
                  set(off, data, writable_mask=...) for vendor-specific bytes.
      dma      -- DmaTable: translate(iova, length, write) -> memoryview
                  (OSError(EFAULT) when not fully inside one mapping).
    """

    def __init__(self, identity: PciIdentity, *, config_size: int = 256) -> None:
        raise NotImplementedError

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
        the areas - and inside them while QEMU traps them - reach bar_read /
        bar_write; the default handlers serve the backing memory.
        """
        raise NotImplementedError

    def add_pm(self) -> int:
        """Power-management capability; returns its config offset."""
        raise NotImplementedError

    def add_msi(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False) -> int:
        raise NotImplementedError

    def add_msix(
        self, vectors: int, *, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
    ) -> int:
        raise NotImplementedError

    def add_express(self, *, device_type: int = 0) -> int:
        """PCI Express capability (device_type 0 = endpoint); makes config 4 KiB."""
        raise NotImplementedError

    def add_sriov(
        self, *, total_vfs: int, vf_offset: int, vf_stride: int, vf_device_id: int
    ) -> int:
        """SR-IOV extended capability; returns its offset (>= 0x100)."""
        raise NotImplementedError

    # --- handlers a subclass overrides -----------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` of BAR ``bar`` (already bounds-checked)."""
        raise NotImplementedError

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def on_config_write(self, offset: int, data: bytes) -> None:
        """Called after a config-space write has been applied (masks honoured)."""

    def on_reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR): return device state to power-on."""

    # --- interrupts ------------------------------------------------------

    def raise_irq(self, vector: int = 0) -> None:
        """Signal interrupt ``vector`` the way the guest enabled it.

        MSI-X if enabled (respecting function/vector masks, setting PBA bits
        when masked), else MSI (respecting the per-vector mask), else INTx
        (signals the INTx eventfd unless masked; INTx auto-masks and is
        unmasked by SET_IRQS UNMASK).
        """
        raise NotImplementedError

    def trigger(self, irq_index: int, vector: int = 0) -> bool:
        """Low level: signal eventfd ``vector`` of IRQ index ``irq_index``.

        Returns False if nothing was signalled (no eventfd or masked).
        """
        raise NotImplementedError

    # --- DMA -------------------------------------------------------------

    async def dma_read(self, iova: int, count: int) -> bytes:
        """Read guest memory: via the mapping when fd-backed, else by DMA_READ message."""
        raise NotImplementedError

    async def dma_write(self, iova: int, data: bytes) -> None:
        raise NotImplementedError

    # --- migration hooks (optional) --------------------------------------

    migration_flags: int = 0  # VFIO_MIGRATION_* bits; 0 = not migratable

    def save_state(self) -> bytes:
        """Device state for STOP_COPY (called in STOP)."""
        raise NotImplementedError

    def load_state(self, data: bytes) -> None:
        """Restore state at RESUMING -> STOP; raise OSError(EINVAL) if invalid."""
        raise NotImplementedError
