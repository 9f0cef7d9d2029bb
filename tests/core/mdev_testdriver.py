"""A small real parent for tests: a pool of slots shared by two types.

Type "1" takes one slot, type "2" two (like mtty's ports), so ENOSPC and
available_instances arithmetic are exercised the way a real parent does.
Each device is a tiny PCI-less backend with one 256-byte config region.
"""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Mapping, Sequence

from mdevcore.driver import MdevDriver, MdevTypeSpec
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DeviceInfo, DmaMapping, DmaPort, IrqInfo, RegionInfo


class ScratchDevice:
    """A DeviceBackend with a writable 256-byte config region and no IRQs."""

    serve_in_thread = True  # plain memory: a connection thread may serve it

    def __init__(self, slots: int) -> None:
        self.device_lock = threading.RLock()
        self.slots = slots
        self.config = bytearray(256)
        self.busy = False  # the test flips this to make remove refuse
        self.closed = False  # the core closes a removed device

    def close(self) -> None:
        self.closed = True

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(flags=vfio.DEVICE_FLAGS_PCI, num_regions=vfio.PCI_NUM_REGIONS, num_irqs=0)

    def region_info(self, index: int) -> RegionInfo:
        if index == vfio.PCI_CONFIG_REGION_INDEX:
            flags = vfio.REGION_FLAG_READ | vfio.REGION_FLAG_WRITE
            return RegionInfo(index=index, flags=flags, size=len(self.config))
        if 0 <= index < vfio.PCI_NUM_REGIONS:
            return RegionInfo(index=index, flags=0, size=0)
        raise OSError(errno.EINVAL, f"no region {index}")

    def _check(self, index: int, offset: int, count: int) -> None:
        if index != vfio.PCI_CONFIG_REGION_INDEX:
            raise OSError(errno.EINVAL, f"region {index} not accessible")
        if offset < 0 or count < 0 or offset + count > len(self.config):
            raise OSError(errno.EINVAL, "access outside the config region")

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check(index, offset, count)
        return bytes(self.config[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check(index, offset, len(data))
        self.config[offset : offset + len(data)] = data

    def irq_info(self, index: int) -> IrqInfo:
        raise OSError(errno.EINVAL, f"no irq index {index}")

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        raise OSError(errno.EINVAL, "no irqs")

    def dma_map(self, mapping: DmaMapping) -> None:
        raise OSError(errno.ENOTSUP, "no dma")

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        raise OSError(errno.ENOTSUP, "no dma")

    def reset(self) -> None:
        self.config[:] = bytes(len(self.config))

    def device_feature(self, flags: int, data: bytes) -> bytes:
        raise OSError(errno.ENOTTY, "no features")

    def mig_data_read(self, size: int) -> bytes:
        raise OSError(errno.ENOTTY, "no migration")

    def mig_data_write(self, data: bytes) -> None:
        raise OSError(errno.ENOTTY, "no migration")

    def connected(self, port: DmaPort) -> None:
        pass

    def disconnected(self) -> None:
        pass

    async def run(self) -> None:
        return None


class PoolDriver(MdevDriver):
    """MdevDriver with ``pool`` slots; thread-safe like a kernel parent."""

    name = "pool"
    types: Sequence[MdevTypeSpec] = (
        MdevTypeSpec(name="1", pretty_name="One slot", description="uses 1 slot\nno irqs"),
        MdevTypeSpec(name="2", pretty_name="Two slots"),
    )
    _cost = {"1": 1, "2": 2}

    def __init__(self, pool: int = 24) -> None:
        self.free = pool
        self._lock = threading.Lock()

    def available_instances(self, type_name: str) -> int:
        return self.free // self._cost[type_name]

    def probe(self, uuid: uuid.UUID, type_name: str) -> ScratchDevice:
        cost = self._cost[type_name]
        with self._lock:
            if self.free < cost:
                raise OSError(errno.ENOSPC, f"pool: {self.free} slots left, need {cost}")
            self.free -= cost
        return ScratchDevice(cost)

    def remove(self, uuid: uuid.UUID, device: vfio.DeviceBackend) -> None:
        assert isinstance(device, ScratchDevice)
        if device.busy:
            raise OSError(errno.EBUSY, "device is busy")
        with self._lock:
            self.free += device.slots

    def device_attributes(self, uuid: uuid.UUID, device: vfio.DeviceBackend) -> Mapping[str, str]:
        return {"vendor/sample_mdev_dev": f"This is MDEV {uuid}\n"}


def register(core: object, pool: int = 24) -> PoolDriver:
    """Register a PoolDriver as parent "pool" at devices/virtual/pool/pool."""
    from mdevcore.core import MdevCore

    assert isinstance(core, MdevCore)
    driver = PoolDriver(pool)
    core.register_parent("pool", "devices/virtual/pool/pool", driver)
    return driver


def BigPool() -> PoolDriver:  # noqa: N802 - a factory named like the class it makes
    """A pool large enough for benchmarks (``--parent mdev_testdriver:BigPool@...``)."""
    return PoolDriver(pool=1 << 16)
