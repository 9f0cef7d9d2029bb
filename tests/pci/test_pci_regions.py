"""Regions 0-8: info, bounds, BAR handlers, mmap areas backed by a memfd."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from pcitest_helpers import PlainDevice

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.vfio_user import backend as vfio


class Registers(PciDevice):
    """BAR0 is handled by code; BAR2 has a shared page at 0x1000."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=1, device_id=2, class_code=0))
        self.add_bar(0, 0x100)
        self.shared = self.add_bar(2, 0x4000, BarKind.MEM64, mmap_areas=((0x1000, 0x1000),))
        self.log_: list[tuple[str, int, int, bytes]] = []

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        if bar == 0:
            self.log_.append(("r", bar, offset, b""))
            return bytes([offset & 0xFF] * size)
        return super().bar_read(bar, offset, size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        self.log_.append(("w", bar, offset, data))
        super().bar_write(bar, offset, data)


def test_device_info() -> None:
    info = PlainDevice().device_info()
    assert info.flags == vfio.DEVICE_FLAGS_RESET | vfio.DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (9, 5)


def test_region_info_layout() -> None:
    dev = PlainDevice()
    sizes = [dev.region_info(i).size for i in range(9)]
    assert sizes == [0x1000, 8, 0x4000, 0, 0x2000, 0, 0, 256, 0]
    for index in (9, 100, -1):
        with pytest.raises(OSError) as info:
            dev.region_info(index)
        assert info.value.errno == errno.EINVAL


def test_handlers_see_accesses() -> None:
    dev = Registers()
    assert dev.region_read(0, 0x10, 4) == b"\x10" * 4
    dev.region_write(0, 0x20, b"\x01\x02")
    assert dev.log_ == [("r", 0, 0x10, b""), ("w", 0, 0x20, b"\x01\x02")]


@pytest.mark.parametrize(
    ("index", "offset", "count"),
    [(0, 0x100, 1), (0, 0xFF, 2), (0, -1, 1), (3, 0, 4), (5, 0, 4), (6, 0, 4), (8, 0, 1),
     (9, 0, 1)],
)  # fmt: skip
def test_out_of_bounds_access_is_einval(index: int, offset: int, count: int) -> None:
    dev = Registers()
    with pytest.raises(OSError) as info:
        dev.region_read(index, offset, count)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        dev.region_write(index, offset, bytes(max(count, 0)))
    assert info.value.errno == errno.EINVAL
    assert dev.log_ == []


def test_default_handlers_serve_backing_memory() -> None:
    dev = PlainDevice()
    dev.region_write(0, 0xFF8, b"12345678")
    assert dev.region_read(0, 0xFFC, 4) == b"5678"
    dev.region_write(1, 0, b"\xaa")
    assert dev.region_read(1, 0, 2) == b"\xaa\x00"


def test_sparse_mmap_region_info_and_shared_memory() -> None:
    dev = Registers()
    info = dev.region_info(2)
    assert info.flags & vfio.REGION_FLAG_MMAP
    assert info.flags & vfio.REGION_FLAG_READ and info.flags & vfio.REGION_FLAG_WRITE
    assert info.sparse_areas == (vfio.SparseArea(0x1000, 0x1000),)
    assert info.fd is not None and info.size == 0x4000
    assert os.fstat(info.fd).st_size == 0x4000
    assert dev.shared is not None
    # A client maps the fd exactly as the sparse area says.
    client = mmap.mmap(info.fd, 0x1000, mmap.MAP_SHARED, offset=info.fd_offset + 0x1000)
    try:
        client[0:4] = b"ping"
        assert bytes(dev.shared[0x1000:0x1004]) == b"ping"
        # A trapped access to the area (QEMU does that) sees the same bytes...
        assert dev.region_read(2, 0x1000, 4) == b"ping"
        dev.region_write(2, 0x1004, b"pong")
        assert client[4:8] == b"pong"
        # ...without going through the handlers; outside the area they are used.
        dev.region_write(2, 0x10, b"x")
        assert dev.log_ == [("w", 2, 0x10, b"x")]
    finally:
        client.close()
    assert dev.region_info(3).size == 0  # upper half of the 64-bit BAR


def test_short_handler_read_is_eio() -> None:
    class Broken(PciDevice):
        def __init__(self) -> None:
            super().__init__(PciIdentity(vendor_id=1, device_id=2, class_code=0))
            self.add_bar(0, 0x100)

        def bar_read(self, bar: int, offset: int, size: int) -> bytes:
            return b"\x00"

    with pytest.raises(OSError) as info:
        Broken().region_read(0, 0, 4)
    assert info.value.errno == errno.EIO


def test_bad_mmap_areas() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    with pytest.raises(ValueError):
        dev.add_bar(0, 0x2000, mmap_areas=((0x100, 0x1000),))
    with pytest.raises(ValueError):
        dev.add_bar(0, 0x2000, mmap_areas=((0x1000, 0x2000),))
    with pytest.raises(ValueError):
        dev.add_bar(1, 8, BarKind.IO, mmap_areas=((0, 0x1000),))


def test_bar_memory_that_cannot_be_mapped_leaks_no_memfd() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):  # 4 EiB: ENOMEM from mmap
        dev.add_bar(0, 1 << 62, BarKind.MEM64, mmap_areas=((0, 0x1000),))
    assert set(os.listdir("/proc/self/fd")) == before and dev.bars[0] is None


def test_close_releases_memfds() -> None:
    dev = Registers()
    fd = dev.region_info(2).fd
    assert fd is not None
    dev.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_expansion_rom() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    dev.add_rom(b"\x55\xaa" + b"rom" * 1000)  # 3002 bytes -> a 4 KiB ROM
    info = dev.region_info(vfio.PCI_ROM_REGION_INDEX)
    assert (info.flags, info.size) == (vfio.REGION_FLAG_READ, 0x1000)
    assert dev.region_read(6, 0, 2) == b"\x55\xaa"
    assert dev.region_read(6, 0xFFC, 4) == bytes(4)
    with pytest.raises(OSError) as err:
        dev.region_write(6, 0, b"x")
    assert err.value.errno == errno.EINVAL
    rom_bar = vfio.PCI_CONFIG_REGION_INDEX
    dev.region_write(rom_bar, 0x30, b"\xff\xff\xff\xff")
    assert dev.region_read(rom_bar, 0x30, 4) == (0xFFFFF001).to_bytes(4, "little")


def test_zero_length_accesses() -> None:
    dev = Registers()
    assert dev.region_read(0, 0x100, 0) == b""
    dev.region_write(0, 0, b"")
    assert dev.log_ == []
