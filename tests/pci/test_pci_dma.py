"""The DMA table with real memfds: map, overlap, unmap, translate, limits."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

import pytest
from pcitest_helpers import PlainDevice

from mdevcore.pci.dma import DmaTable
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.backend import DmaMapping

RW = vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE
RO = vfio.DMA_MAP_FLAG_READ
PAGE = mmap.PAGESIZE


@pytest.fixture
def guest_ram() -> Iterator[tuple[int, mmap.mmap]]:
    """A 64 KiB memfd standing in for the VMM's guest RAM, and our view of it."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 16 * PAGE)
    ram = mmap.mmap(fd, 16 * PAGE, mmap.MAP_SHARED)
    yield fd, ram
    ram.close()
    os.close(fd)


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def test_translate_reads_and_writes_guest_memory(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, ram = guest_ram
    table = DmaTable()
    table.map(DmaMapping(address=0x100000, size=4 * PAGE, flags=RW, fd=fd, offset=2 * PAGE))
    ram[2 * PAGE + 16 : 2 * PAGE + 21] = b"hello"
    assert bytes(table.translate(0x100010, 5, write=False)) == b"hello"
    view = table.translate(0x100000 + PAGE, 3, write=True)
    view[:] = b"abc"
    view.release()
    assert ram[3 * PAGE : 3 * PAGE + 3] == b"abc"
    # The whole mapping, up to its last byte, and no further.
    assert len(table.translate(0x100000, 4 * PAGE, write=False)) == 4 * PAGE
    assert errno_of(table.translate, 0x100000 + 4 * PAGE - 1, 2, False) == errno.EFAULT
    assert errno_of(table.translate, 0xFFFFF, 2, False) == errno.EFAULT
    assert errno_of(table.translate, 0x100000, 0, False) == errno.EFAULT


def test_unaligned_file_offset(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, ram = guest_ram
    table = DmaTable()
    table.map(DmaMapping(address=0x1000, size=0x100, flags=RO, fd=fd, offset=0x123))
    ram[0x123:0x126] = b"xyz"
    assert bytes(table.translate(0x1000, 3, write=False)) == b"xyz"


def test_permissions(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = guest_ram
    table = DmaTable()
    table.map(DmaMapping(address=0, size=PAGE, flags=RO, fd=fd, offset=0))
    table.map(DmaMapping(address=PAGE, size=PAGE, flags=vfio.DMA_MAP_FLAG_WRITE, fd=fd, offset=0))
    assert errno_of(table.translate, 0, 4, True) == errno.EFAULT
    assert errno_of(table.translate, PAGE, 4, False) == errno.EFAULT
    assert table.translate(0, 4, write=False).readonly
    table.translate(PAGE, 4, write=True)[:] = b"ok!!"


def test_accesses_never_span_two_mappings(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = guest_ram
    table = DmaTable()
    table.map(DmaMapping(address=0, size=PAGE, flags=RW, fd=fd, offset=0))
    table.map(DmaMapping(address=PAGE, size=PAGE, flags=RW, fd=fd, offset=PAGE))
    assert errno_of(table.translate, PAGE - 2, 4, False) == errno.EFAULT


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0x10000, PAGE), (0x10000 - PAGE, 2 * PAGE), (0x10000 + PAGE, PAGE),
     (0x10000 + 2 * PAGE - 1, 1), (0, 0x20000)],
)  # fmt: skip
def test_overlap_is_eexist(iova: int, size: int) -> None:
    table = DmaTable()
    table.map(DmaMapping(address=0x10000, size=2 * PAGE, flags=RW, fd=None, offset=0))
    mapping = DmaMapping(address=iova, size=size, flags=RW, fd=None, offset=0)
    assert errno_of(table.map, mapping) == errno.EEXIST
    assert len(table) == 1


def test_adjacent_mappings_are_fine() -> None:
    table = DmaTable()
    for start in (0x10000 + PAGE, 0x10000, 0x10000 - PAGE):
        table.map(DmaMapping(address=start, size=PAGE, flags=RW, fd=None, offset=0))
    assert [r.iova for r in table.regions()] == [0x10000 - PAGE, 0x10000, 0x10000 + PAGE]


@pytest.mark.parametrize(
    "mapping",
    [DmaMapping(address=0, size=0, flags=RW, fd=None, offset=0),
     DmaMapping(address=(1 << 64) - PAGE, size=2 * PAGE, flags=RW, fd=None, offset=0),
     DmaMapping(address=0, size=PAGE, flags=0, fd=None, offset=0),
     DmaMapping(address=0, size=PAGE, flags=RW | 0x10, fd=None, offset=0)],
)  # fmt: skip
def test_bad_maps_are_einval(mapping: DmaMapping) -> None:
    assert errno_of(DmaTable().map, mapping) == errno.EINVAL


def test_map_beyond_the_file_is_refused(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = guest_ram
    table = DmaTable()
    mapping = DmaMapping(address=0, size=32 * PAGE, flags=RW, fd=fd, offset=0)
    assert errno_of(table.map, mapping) == errno.EINVAL
    assert len(table) == 0


def test_write_mapping_of_readonly_fd_is_refused(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = guest_ram
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        table = DmaTable()
        assert errno_of(table.map, DmaMapping(0, PAGE, RW, ro, 0)) == errno.EACCES
        table.map(DmaMapping(0, PAGE, RO, ro, 0))
    finally:
        os.close(ro)


def test_exact_unmap_only() -> None:
    table = DmaTable()
    table.map(DmaMapping(address=0x10000, size=2 * PAGE, flags=RW, fd=None, offset=0))
    assert errno_of(table.unmap, 0x10000, PAGE, 0) == errno.ENOENT
    assert errno_of(table.unmap, 0x10000 + PAGE, PAGE, 0) == errno.ENOENT
    assert errno_of(table.unmap, 0x20000, PAGE, 0) == errno.ENOENT
    table.unmap(0x10000, 2 * PAGE, 0)
    assert len(table) == 0
    assert errno_of(table.unmap, 0x10000, 2 * PAGE, 0) == errno.ENOENT


def test_unmap_flags() -> None:
    table = DmaTable()
    for i in range(4):
        table.map(DmaMapping(address=i * PAGE, size=PAGE, flags=RW, fd=None, offset=0))
    get_dirty = vfio.DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    assert errno_of(table.unmap, 0, PAGE, get_dirty) == errno.EINVAL
    assert errno_of(table.unmap, 0, PAGE, vfio.DMA_UNMAP_FLAG_ALL) == errno.EINVAL
    assert errno_of(table.unmap, 0, PAGE, 1 << 5) == errno.EINVAL
    table.unmap(0, 0, vfio.DMA_UNMAP_FLAG_ALL)
    assert len(table) == 0


def test_max_maps_is_enospc() -> None:
    table = DmaTable(max_maps=3)
    for i in range(3):
        table.map(DmaMapping(address=i * PAGE, size=PAGE, flags=RW, fd=None, offset=0))
    mapping = DmaMapping(address=10 * PAGE, size=PAGE, flags=RW, fd=None, offset=0)
    assert errno_of(table.map, mapping) == errno.ENOSPC
    table.unmap(0, PAGE, 0)
    table.map(mapping)


def test_unmap_while_a_view_is_alive(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, ram = guest_ram
    table = DmaTable()
    table.map(DmaMapping(address=0, size=PAGE, flags=RW, fd=fd, offset=0))
    view = table.translate(0, 8, write=True)
    table.unmap(0, PAGE, 0)  # must not crash
    view[:4] = b"late"  # the memory stays mapped while the view lives
    assert ram[:4] == b"late"
    view.release()
    assert errno_of(table.translate, 0, 8, False) == errno.EFAULT


def test_message_based_mapping_cannot_be_translated() -> None:
    table = DmaTable()
    table.map(DmaMapping(address=0, size=PAGE, flags=RW, fd=None, offset=0))
    assert errno_of(table.translate, 0, 8, False) == errno.EFAULT


def test_disconnect_unmaps_everything(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, _ = guest_ram
    dev = PlainDevice()
    dev.dma_map(DmaMapping(address=0, size=PAGE, flags=RW, fd=fd, offset=0))
    dev.dma_map(DmaMapping(address=PAGE, size=PAGE, flags=RW, fd=None, offset=0))
    dev.disconnected()
    assert len(dev.dma) == 0


class FakePort:
    """Records message-based DMA the way the server's DmaPort would carry it."""

    def __init__(self) -> None:
        self.memory = bytearray(2 * PAGE)
        self.calls: list[tuple[str, int, int]] = []

    async def dma_read(self, address: int, count: int) -> bytes:
        self.calls.append(("read", address, count))
        return bytes(self.memory[address - PAGE : address - PAGE + count])

    async def dma_write(self, address: int, data: bytes) -> None:
        self.calls.append(("write", address, len(data)))
        self.memory[address - PAGE : address - PAGE + len(data)] = data


async def test_device_dma_uses_mapping_or_messages(guest_ram: tuple[int, mmap.mmap]) -> None:
    fd, ram = guest_ram
    dev = PlainDevice()
    port = FakePort()
    dev.connected(port)
    dev.dma_map(DmaMapping(address=0, size=PAGE, flags=RW, fd=fd, offset=0))
    dev.dma_map(DmaMapping(address=PAGE, size=2 * PAGE, flags=RW, fd=None, offset=0))
    await dev.dma_write(0x10, b"direct")
    assert ram[0x10:0x16] == b"direct"
    assert await dev.dma_read(0x10, 6) == b"direct"
    await dev.dma_write(PAGE + 8, b"message")
    assert await dev.dma_read(PAGE + 8, 7) == b"message"
    assert port.calls == [("write", PAGE + 8, 7), ("read", PAGE + 8, 7)]
    with pytest.raises(OSError) as info:
        await dev.dma_read(3 * PAGE, 1)
    assert info.value.errno == errno.EFAULT
    dev.disconnected()
    with pytest.raises(OSError):
        await dev.dma_read(0x10, 1)
