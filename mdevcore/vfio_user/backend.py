"""The contract between the vfio-user protocol engine and a device.

The engine (``mdevcore.vfio_user.engine``) parses messages, checks their
structure (header, argsz, body lengths, fd counts) and calls exactly one
method of a :class:`DeviceBackend` per request.  The backend checks
everything that needs device knowledge (region index, offset + count within
the region, IRQ index/start/count, DMA overlap) and reports failure by
raising ``OSError(errno.X, "why")``; the engine turns that into a
header-only error reply carrying the errno.  Any other exception is a bug in
the device: the engine logs it and answers EIO (or EINVAL), it never lets it
escape the connection.

File descriptors: the engine owns every fd it received with a message and
closes them all after the call returns (or raises).  A backend that keeps an
fd (DMA_MAP, SET_IRQS eventfds) must ``os.dup`` it.  An fd a backend hands
out (``RegionInfo.fd``) stays owned by the backend; the engine only sends it.

``mdevcore.pci.device.PciDevice`` implements this protocol for PCI devices;
parents subclass PciDevice and never see this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# VFIO device flags (DEVICE_GET_INFO)
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

# Region info flags
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3

# IRQ info flags
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# SET_IRQS flags
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5

# PCI region and IRQ indexes (vfio-pci layout)
PCI_BAR0_REGION_INDEX = 0
PCI_ROM_REGION_INDEX = 6
PCI_CONFIG_REGION_INDEX = 7
PCI_VGA_REGION_INDEX = 8
PCI_NUM_REGIONS = 9

PCI_INTX_IRQ_INDEX = 0
PCI_MSI_IRQ_INDEX = 1
PCI_MSIX_IRQ_INDEX = 2
PCI_ERR_IRQ_INDEX = 3
PCI_REQ_IRQ_INDEX = 4
PCI_NUM_IRQS = 5

# DMA_MAP flags
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
# DMA_UNMAP flags
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# DEVICE_FEATURE flags
DEVICE_FEATURE_MASK = 0xFFFF
DEVICE_FEATURE_GET = 1 << 16
DEVICE_FEATURE_SET = 1 << 17
DEVICE_FEATURE_PROBE = 1 << 18
DEVICE_FEATURE_MIGRATION = 1
DEVICE_FEATURE_MIG_DEVICE_STATE = 2
DEVICE_FEATURE_DMA_LOGGING_START = 6
DEVICE_FEATURE_DMA_LOGGING_STOP = 7
DEVICE_FEATURE_DMA_LOGGING_REPORT = 8


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


@dataclasses.dataclass(frozen=True, slots=True)
class SparseArea:
    """An mmap-able window of a region, relative to the region start."""

    offset: int
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class RegionInfo:
    """What GET_REGION_INFO reports for one region.

    ``fd``/``fd_offset``: when the region (or some of its sparse areas) can be
    mmapped, the file to map and the file offset corresponding to region
    offset 0.  ``sparse_areas`` non-empty makes the engine emit a
    VFIO_REGION_INFO_CAP_SPARSE_MMAP capability.  ``type_cap`` (type,
    subtype) emits VFIO_REGION_INFO_CAP_TYPE for device-specific regions.
    """

    index: int
    flags: int
    size: int
    fd: int | None = None
    fd_offset: int = 0
    sparse_areas: tuple[SparseArea, ...] = ()
    type_cap: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class IrqInfo:
    index: int
    flags: int
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class DmaMapping:
    """A DMA_MAP request as the backend sees it (fd already dup-able)."""

    address: int
    size: int
    flags: int
    fd: int | None
    offset: int


class DmaPort(Protocol):
    """Server-to-client DMA by message (DMA_READ / DMA_WRITE).

    Given to the backend by the server on connect; used only for DMA regions
    that arrived without an fd.  Raises OSError(errno) when the client
    answers with an error or is gone.
    """

    async def dma_read(self, address: int, count: int) -> bytes: ...

    async def dma_write(self, address: int, data: bytes) -> None: ...


# The DeviceBackend methods the engine calls for requests (the profiler
# times these; PciDevice reserves them).
REQUEST_METHODS = (
    "device_info",
    "region_info",
    "region_read",
    "region_write",
    "irq_info",
    "set_irqs",
    "dma_map",
    "dma_unmap",
    "reset",
    "device_feature",
    "mig_data_read",
    "mig_data_write",
)


@runtime_checkable
class DeviceBackend(Protocol):
    """What the vfio-user engine needs from a device (see module doc)."""

    def device_info(self) -> DeviceInfo: ...

    def region_info(self, index: int) -> RegionInfo: ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> IrqInfo: ...

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None: ...

    def dma_map(self, mapping: DmaMapping) -> None: ...

    def dma_unmap(self, address: int, size: int, flags: int) -> None: ...

    def reset(self) -> None: ...

    def device_feature(self, flags: int, data: bytes) -> bytes:
        """DEVICE_FEATURE: return the reply payload after argsz/flags.

        Raise OSError(ENOTTY) for a feature the device does not offer.
        """
        ...

    def mig_data_read(self, size: int) -> bytes: ...

    def mig_data_write(self, data: bytes) -> None: ...

    def connected(self, port: DmaPort) -> None:
        """A client attached; ``port`` does message-based DMA for it."""
        ...

    def disconnected(self) -> None:
        """The client went away: unmap all DMA, close IRQ fds, keep state."""
        ...

    async def run(self) -> None:
        """Background work for the device's whole served lifetime.

        The server runs this in its nursery from start to close (across
        clients); a device with nothing to do in the background returns
        at once (or awaits trio.sleep_forever()).
        """
        ...
