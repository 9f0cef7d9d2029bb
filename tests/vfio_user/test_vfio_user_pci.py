"""Integration: a real PciDevice subclass served over vfio-user, seen by the client.

Config space, BAR sizing, sparse mmap of a BAR, MSI-X through eventfds and
PBA, DMA both through a mapped fd and by message.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import pytest
import trio
from vfio_user_gadget import Gadget

from mdevcore.tools.vfio_user_cli import decode_config
from mdevcore.vfio_user.backend import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    PCI_CONFIG_REGION_INDEX,
    REGION_FLAG_MMAP,
    SparseArea,
)
from mdevcore.vfio_user.client import Client, VfioUserError
from mdevcore.vfio_user.server import DeviceServer

T = TypeVar("T")
CFG = PCI_CONFIG_REGION_INDEX
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PCI_CAP_ID_MSIX = 0x11


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


@pytest.fixture(params=["native", "libvfio-user"])
async def gadget(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Gadget, str]]:
    """The gadget served by each transport: the device must not see a difference."""
    d = tempfile.mkdtemp(prefix="vu-pci-")
    path = os.path.join(d, "gadget.sock")
    device = Gadget()
    try:
        async with trio.open_nursery() as nursery:
            if request.param == "libvfio-user":
                from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

                await nursery.start(LibvfioUserServer(device, path, name="gadget").serve)
            else:
                await nursery.start(DeviceServer(device, path, name="gadget").serve)
            yield device, path
            nursery.cancel_scope.cancel()
    finally:
        device.close()
        shutil.rmtree(d, ignore_errors=True)


def u32(data: bytes) -> int:
    return int.from_bytes(data, "little")


def find_cap(c: Client, cap_id: int) -> int:
    ptr = c.region_read(CFG, 0x34, 1)[0]
    while ptr:
        if c.region_read(CFG, ptr, 1)[0] == cap_id:
            return ptr
        ptr = c.region_read(CFG, ptr + 1, 1)[0]
    raise AssertionError(f"capability {cap_id:#x} not found")


async def test_config_space_identity_and_capabilities(gadget: tuple[Gadget, str]) -> None:
    _, path = gadget

    def go() -> None:
        with Client(path) as c:
            c.negotiate()
            assert c.region_info(CFG).size == 4096  # PCI Express: extended config
            cfg = c.region_read(CFG, 0, 256)
            lines = decode_config(cfg)
            assert "vendor:device  1b36:0100" in lines
            assert "subsystem      1af4:1100" in lines
            assert any(line.startswith("class          ff0000") for line in lines)
            caps = [line.split(": ")[1] for line in lines if line.startswith("capability")]
            assert set(caps) == {"Power Management", "MSI", "PCI Express", "MSI-X"}

    await in_thread(go)


async def test_bar_sizing_through_config_writes(gadget: tuple[Gadget, str]) -> None:
    _, path = gadget

    def go() -> None:
        with Client(path) as c:
            c.negotiate()
            for reg in range(0x10, 0x28, 4):
                c.region_write(CFG, reg, b"\xff\xff\xff\xff")
            bars = [u32(c.region_read(CFG, 0x10 + 4 * i, 4)) for i in range(6)]
            assert bars[0] == 0xFFFFF000  # 4 KiB, 32-bit, non-prefetchable
            assert bars[1] == 0  # not implemented
            assert bars[2] == 0xFFFFC000 | 0x4 | 0x8  # 16 KiB, 64-bit, prefetchable
            assert bars[3] == 0xFFFFFFFF  # upper half of the 64-bit BAR
            assert bars[4] == 0xFFFFF000
            c.region_write(CFG, 0x10, (0xFEB00000).to_bytes(4, "little"))
            assert u32(c.region_read(CFG, 0x10, 4)) == 0xFEB00000
            assert [c.region_info(i).size for i in range(6)] == [0x1000, 0, 0x4000, 0, 0x1000, 0]

    await in_thread(go)


async def test_bar_handlers_and_sparse_mmap(gadget: tuple[Gadget, str]) -> None:
    device, path = gadget

    def go() -> None:
        with Client(path) as c:
            c.negotiate()
            assert c.region_read(0, 0x10, 4) == bytes([0xA5 ^ 0x10]) * 4
            c.region_write(0, 0x20, b"\x01\x02")
            assert device.writes[-1] == (0, 0x20, b"\x01\x02")
            expect = c.region_info(2, argsz=32)
            full = c.region_info(2, argsz=expect.argsz)
            assert full.fd is not None
            try:
                info = full.as_region_info()
                assert info.flags & REGION_FLAG_MMAP
                assert info.sparse_areas == (SparseArea(0x1000, 0x2000),)
                with mmap.mmap(
                    full.fd, 0x2000, mmap.MAP_SHARED, offset=full.offset + 0x1000
                ) as window:
                    window[0:8] = b"via-mmap"
                    assert bytes(device.shared[0x1000:0x1008]) == b"via-mmap"
                    # trapped access to the same bytes sees the same memory
                    assert c.region_read(2, 0x1000, 8) == b"via-mmap"
                    c.region_write(2, 0x1008, b"trapped!")
                    assert window[8:16] == b"trapped!"
            finally:
                os.close(full.fd)
            with pytest.raises(VfioUserError) as e:
                c.region_read(0, 0xFFE, 4)
            assert e.value.errno == errno.EINVAL

    await in_thread(go)


async def test_msix_vectors_signal_eventfds_and_pba(gadget: tuple[Gadget, str]) -> None:
    device, path = gadget
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    client = Client(path)
    try:

        def setup() -> None:
            client.negotiate()
            assert client.irq_info(2).count == 4
            client.set_irqs(2, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 4, fds=efds)
            cap = find_cap(client, PCI_CAP_ID_MSIX)
            ctrl = int.from_bytes(client.region_read(CFG, cap + 2, 2), "little")
            assert ctrl & 0x7FF == 3  # table size - 1
            client.region_write(CFG, cap + 2, (ctrl | 0x8000).to_bytes(2, "little"))
            # The VMM masks vector 2 (QEMU emulates the table and says so by SET_IRQS).
            client.set_irqs(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 2, 1)

        await in_thread(setup)
        device.raise_irq(1)
        assert os.eventfd_read(efds[1]) == 1
        device.raise_irq(2)  # still masked: pending, visible in the PBA
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[2])
        pba = await in_thread(lambda: client.region_read(4, 0x800, 8))
        assert int.from_bytes(pba, "little") & 0b100
        await in_thread(lambda: client.set_irqs(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 2, 1))
        assert os.eventfd_read(efds[2]) == 1  # delivered on unmask
        pba = await in_thread(lambda: client.region_read(4, 0x800, 8))
        assert not int.from_bytes(pba, "little") & 0b100
    finally:
        client.close()
        for fd in efds:
            os.close(fd)


async def test_pci_device_dma_by_fd_and_by_message(gadget: tuple[Gadget, str]) -> None:
    device, path = gadget
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, 0x2000)
    client = Client(path)
    guest = bytearray(b"message-dma-src!" + bytes(0x1000 - 16))
    try:

        def setup() -> None:
            client.negotiate()
            client.dma_map(0x10000, 0x2000, RW, fd=memfd)
            client.add_dma_buffer(0x80000, guest)
            client.dma_map(0x80000, 0x1000, RW)  # no fd: DMA by message

        await in_thread(setup)
        await device.dma_write(0x10010, b"fd-backed")
        with mmap.mmap(memfd, 0x2000, mmap.MAP_SHARED) as ram:
            assert ram[0x10:0x19] == b"fd-backed"
        finished = threading.Event()

        def answer_dma() -> None:
            # the client answers the server's DMA requests until we are done
            while not finished.is_set():
                client.poll(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, answer_dma)
            # libvfio-user does message DMA synchronously (it blocks this
            # thread until the answer): let the answering thread start first.
            await trio.sleep(0.2)
            try:
                assert await device.dma_read(0x80000, 16) == b"message-dma-src!"
                await device.dma_write(0x80100, b"written by device")
            finally:
                finished.set()
        assert guest[0x100:0x111] == b"written by device"
        assert client.dma_requests_served == 2
    finally:
        client.close()
        os.close(memfd)


async def test_a_reset_connection_costs_the_server_nothing(gadget: tuple[Gadget, str]) -> None:
    import time

    from mdevcore.vfio_user.constants import Command
    from mdevcore.vfio_user.wire import REGION_ACCESS

    device, path = gadget

    def reset_then_reconnect() -> bytes:
        first = Client(path)
        first.negotiate()
        # Gone without reading a reply: the server's next read of this
        # AF_UNIX socket fails with ECONNRESET.
        first.send(Command.REGION_READ, REGION_ACCESS.pack(0, CFG, 4))
        time.sleep(0.2)
        first.close()
        with Client(path) as second:
            second.negotiate()
            return second.region_read(CFG, 0, 4)

    ident = await in_thread(reset_then_reconnect)
    assert ident == device.config.read(0, 4)
