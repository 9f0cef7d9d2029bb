"""mdevcore.testing: what a parent author's tests stand on, on the counter sample."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

import pytest

from mdevcore.pci import caps
from mdevcore.samples.counter import MAGIC, REG_INCR, REG_MAGIC, REG_VALUE, Counter
from mdevcore.testing import GuestMemory, Interrupts, ServedDevice, migrate, serve
from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.client import VfioUserError


def u32(data: bytes) -> int:
    return int(struct.unpack("<I", data)[0])


def enable_msi(client: object, device: Counter) -> None:
    assert device.msi is not None
    flags = device.msi.offset + caps.MSI_FLAGS
    client.region_write(7, flags, (caps.MSI_FLAGS_ENABLE).to_bytes(2, "little"))  # type: ignore[attr-defined]


def test_bar_access_and_interrupts_through_the_real_server() -> None:
    device = Counter()
    with serve(device) as served, served.connect() as c:
        assert u32(c.region_read(0, REG_MAGIC, 4)) == MAGIC
        enable_msi(c, device)
        with Interrupts(c, index=1) as irqs:
            c.region_write(0, REG_INCR, struct.pack("<I", 5))
            assert irqs.wait() == 1
            assert irqs.take() == 0
        assert u32(c.region_read(0, REG_VALUE, 4)) == 5
        with pytest.raises(VfioUserError) as info:
            c.region_read(0, 0x1000, 4)  # beyond the BAR
        assert info.value.errno == errno.EINVAL


def test_a_missed_interrupt_times_out() -> None:
    with serve(Counter()) as served, served.connect() as c, Interrupts(c, index=1) as irqs:
        with pytest.raises(TimeoutError):
            irqs.wait(timeout=0.1)


def test_migrate_moves_the_state_between_instances() -> None:
    with serve(Counter()) as a, serve(Counter()) as b:
        with a.connect() as src, b.connect() as dst:
            src.region_write(0, REG_VALUE, struct.pack("<I", 0xC0FFEE))
            stream = migrate(src, dst)
            assert stream == struct.pack("<BI", 1, 0xC0FFEE)
            assert u32(dst.region_read(0, REG_VALUE, 4)) == 0xC0FFEE


def test_guest_memory_reaches_the_device() -> None:
    device = Counter()
    with serve(device) as served, served.connect() as c, GuestMemory(1 << 20, base=1 << 32) as ram:
        ram.map_into(c)
        ram.write(ram.base + 8, b"guest data")
        # The device sees the same bytes through its DMA table.
        view = device.dma.translate(ram.base + 8, 10, write=False)
        assert bytes(view) == b"guest data"
        view.release()


def test_the_fixture_serves_for_the_test(
    mdev_serve: Callable[[DeviceBackend], ServedDevice],
) -> None:
    served = mdev_serve(Counter())
    with served.connect() as c:
        assert u32(c.region_read(0, REG_MAGIC, 4)) == MAGIC
