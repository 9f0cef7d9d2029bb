"""Every vfio-user command, success and error path, through a real socket."""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio
from vfio_user_fakedev import (
    BAR0_SIZE,
    BAR1_SIZE,
    BUGGY_OFFSET,
    DMA_DONE,
    DMA_DOORBELL,
    DMA_ERRORS,
    SPECIAL_REGION,
    SPECIAL_TYPE,
    FakeDevice,
)
from vfio_user_served import Served, open_fds

from mdevcore.vfio_user import wire
from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MIG_DEVICE_STATE,
    DEVICE_FEATURE_MIGRATION,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    IRQ_INFO_AUTOMASKED,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    REGION_FLAG_CAPS,
    REGION_FLAG_MMAP,
    SparseArea,
)
from mdevcore.vfio_user.client import Client, VfioUserError, check
from mdevcore.vfio_user.constants import (
    FLAG_ERROR,
    FLAG_REPLY,
    SERVER_MAX_DATA_XFER_SIZE,
    Command,
)
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

T = TypeVar("T")
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
EVENTFD_TRIGGER = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def connect(served: Served, *, negotiate: bool = True) -> Client:
    c = Client(served.path)
    if negotiate:
        c.negotiate()
    return c


def expect_errno(code: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(VfioUserError) as info:
        fn(*args)
    assert info.value.errno == code


def expect_closed(c: Client) -> None:
    with pytest.raises((EOFError, ConnectionResetError)):
        c.recv_message()


def u64(data: bytes) -> int:
    return int.from_bytes(data, "little")


async def until_disconnected(served: Served) -> None:
    with trio.fail_after(10):
        while served.server.connected:
            await trio.sleep(0.005)


# --- VERSION -----------------------------------------------------------------


async def test_version_negotiation(served: Served) -> None:
    def go() -> None:
        with Client(served.path) as c:
            major, minor, caps = c.negotiate(minor=7)
            assert (major, minor) == (0, 2)  # min(client 7, server 2)
            assert caps["max_msg_fds"] == 8
            assert caps["max_data_xfer_size"] == SERVER_MAX_DATA_XFER_SIZE
            assert caps["pgsizes"] == 4096
            assert caps["max_dma_maps"] == 65535
            assert caps["write_multiple"] is True
            assert c.device_info().num_regions == 10
        with Client(served.path) as c:
            assert c.negotiate(None)[:2] == (0, 0)  # no JSON at all is fine
        with Client(served.path) as c:
            c.negotiate({"some_future_key": [1, 2], "twin_socket": {"supported": False}})
            assert c.device_info().num_irqs == 5

    await in_thread(go)


def _version_msg(body: bytes) -> bytes:
    return HEADER.pack(1, Command.VERSION, 16 + len(body), 0, 0) + body


def _caps(obj: Any) -> bytes:
    return struct.pack("<HH", 0, 0) + json.dumps(obj).encode() + b"\0"


BAD_VERSIONS = {
    "major": struct.pack("<HH", 1, 0),
    "too-short": b"\0\0",
    "no-nul": struct.pack("<HH", 0, 0) + b'{"capabilities":{}}',
    "not-json": struct.pack("<HH", 0, 0) + b"{nope\0",
    "not-utf8": struct.pack("<HH", 0, 0) + b'{"\xff":1}\0',
    "top-not-object": _caps([1]),
    "caps-not-object": _caps({"capabilities": 3}),
    "fds-too-many": _caps({"capabilities": {"max_msg_fds": 1025}}),
    "fds-negative": _caps({"capabilities": {"max_msg_fds": -1}}),
    "fds-string": _caps({"capabilities": {"max_msg_fds": "8"}}),
    "xfer-bool": _caps({"capabilities": {"max_data_xfer_size": True}}),
    "xfer-zero": _caps({"capabilities": {"max_data_xfer_size": 0}}),
    "migration-not-object": _caps({"capabilities": {"migration": 4096}}),
    "pgsize-string": _caps({"capabilities": {"migration": {"pgsize": "4k"}}}),
    "write-multiple-int": _caps({"capabilities": {"write_multiple": 1}}),
}


@pytest.mark.parametrize("case", sorted(BAD_VERSIONS))
async def test_bad_version_is_refused_and_closed(served: Served, case: str) -> None:
    def go() -> None:
        with Client(served.path) as c:
            c.send_raw(_version_msg(BAD_VERSIONS[case]))
            reply = c.recv_message()
            assert reply.flags & FLAG_ERROR and reply.error == errno.EINVAL
            assert len(reply.payload) == 0
            expect_closed(c)
        with connect(served) as c:  # the server goes on
            assert c.device_info().flags & DEVICE_FLAGS_PCI

    await in_thread(go)


async def test_request_before_version_and_version_with_fd(served: Served) -> None:
    def go() -> None:
        with Client(served.path) as c:
            expect_errno(errno.EINVAL, c.device_info)
            expect_closed(c)
        efd = os.eventfd(0)
        try:
            with Client(served.path) as c:
                c.send_raw(_version_msg(_caps({})), [efd])
                assert c.recv_message().error == errno.EINVAL
                expect_closed(c)
        finally:
            os.close(efd)

    await in_thread(go)


async def test_version_twice_is_einval_but_keeps_connection(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            expect_errno(errno.EINVAL, c.negotiate)
            assert c.device_info().num_regions == 10

    await in_thread(go)


# --- info ----------------------------------------------------------------


async def test_device_info_and_argsz(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            info = c.device_info()
            assert info.flags == DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI
            assert (info.num_regions, info.num_irqs) == (10, 5)
            short = struct.pack("<IIII", 8, 0, 0, 0)
            expect_errno(errno.EINVAL, lambda: c.request(Command.DEVICE_GET_INFO, short))
            expect_errno(errno.EINVAL, lambda: c.request(Command.DEVICE_GET_INFO, b"\x10\0\0\0"))

    await in_thread(go)


async def test_region_info_plain_caps_and_fd(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            bar0 = c.region_info(0)
            assert (bar0.size, bar0.fd, bar0.caps, bar0.argsz) == (BAR0_SIZE, None, [], 32)
            # Too small for the sparse-mmap capability: argsz says what is
            # needed, no capability and no fd come back.
            small = c.region_info(1, argsz=32)
            assert small.argsz == 32 + 8 + 8 + 2 * 16
            # CAPS and cap_offset 32 stay (QEMU checks them before retrying).
            assert small.flags & REGION_FLAG_CAPS and small.cap_offset == 32
            assert small.fd is None and small.caps == []
            full = c.region_info(1, argsz=small.argsz)
            assert full.fd is not None
            try:
                info = full.as_region_info()
                assert info.flags & REGION_FLAG_MMAP and info.size == BAR1_SIZE
                assert info.sparse_areas == (SparseArea(0, 0x1000), SparseArea(0x2000, 0x2000))
                # The fd really is the BAR: a write through it shows in the device.
                with mmap.mmap(full.fd, BAR1_SIZE, mmap.MAP_SHARED) as mm:
                    mm[0x2000:0x2004] = b"mmio"
                assert c.region_read(1, 0x2000, 4) == b"mmio"
            finally:
                os.close(full.fd)
            special = c.region_info(SPECIAL_REGION).as_region_info()
            assert special.type_cap == SPECIAL_TYPE and special.sparse_areas == ()
            expect_errno(errno.EINVAL, lambda: c.region_info(10))
            expect_errno(errno.EINVAL, lambda: c.region_info(0, argsz=31))
            expect_errno(
                errno.EINVAL, lambda: c.request(Command.DEVICE_GET_REGION_INFO, b"\x20" + bytes(30))
            )

    await in_thread(go)


async def test_region_io_fds(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            assert c.region_io_fds(0) == (16, 0)
            expect_errno(errno.EINVAL, lambda: c.region_io_fds(42))
            expect_errno(errno.EINVAL, lambda: c.region_io_fds(0, argsz=8))
            bad_flags = wire.RegionIoFds.build({"argsz": 16, "flags": 1, "index": 0, "count": 0})
            expect_errno(
                errno.EINVAL, lambda: c.request(Command.DEVICE_GET_REGION_IO_FDS, bad_flags)
            )

    await in_thread(go)


async def test_irq_info(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            intx = c.irq_info(0)
            assert intx.count == 1 and intx.flags & IRQ_INFO_AUTOMASKED
            assert c.irq_info(2).count == 4
            expect_errno(errno.EINVAL, lambda: c.irq_info(5))

    await in_thread(go)


# --- IRQs ------------------------------------------------------------------


async def test_set_irqs_eventfds_are_signalled(served: Served) -> None:
    dev = served.device
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    try:

        def assign() -> None:
            with connect(served) as c:
                c.set_irqs(2, EVENTFD_TRIGGER, 0, 4, fds=efds)
                c.set_irqs(0, EVENTFD_TRIGGER, 0, 1, fds=efds[:1])
                assert len(dev.irq_fds) == 5
                # The device signals MSI-X vector 3 and INTx.
                assert dev.trigger(2, 3)
                assert os.eventfd_read(efds[3]) == 1
                # Loopback triggers through SET_IRQS: DATA_NONE and DATA_BOOL.
                c.set_irqs(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 1, 1)
                assert os.eventfd_read(efds[1]) == 1
                c.set_irqs(2, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 3, b"\1\0\1")
                assert os.eventfd_read(efds[0]) == 1 and os.eventfd_read(efds[2]) == 1
                with pytest.raises(BlockingIOError):
                    os.eventfd_read(efds[1])
                # INTx auto-masks after firing; SET_IRQS UNMASK re-arms it.
                assert dev.trigger(0) and not dev.trigger(0)
                assert os.eventfd_read(efds[0]) == 1
                c.set_irqs(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1)
                assert dev.trigger(0)
                c.set_irqs(0, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 1)
                assert not dev.trigger(0)
                # count 0 + DATA_NONE|TRIGGER disables the whole index.
                c.set_irqs(2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0)
                assert not dev.trigger(2, 3) and len(dev.irq_fds) == 1
                # DATA_EVENTFD without fds de-assigns.
                c.set_irqs(0, EVENTFD_TRIGGER, 0, 1)
                assert dev.irq_fds == {}

        await in_thread(assign)
    finally:
        for fd in efds:
            os.close(fd)


async def test_set_irqs_errors(served: Served) -> None:
    efds = [os.eventfd(0) for _ in range(2)]
    try:

        def go() -> None:
            with connect(served) as c:
                cases: list[tuple[int, int, int, int, bytes, list[int]]] = [
                    (
                        2,
                        IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                        0,
                        1,
                        b"\1",
                        [],
                    ),
                    (2, IRQ_SET_DATA_NONE, 0, 1, b"", []),  # no action
                    (2, IRQ_SET_DATA_NONE | 1 << 9 | IRQ_SET_ACTION_TRIGGER, 0, 1, b"", []),
                    (2, EVENTFD_TRIGGER, 0, 1, b"", efds),  # 2 fds for count 1
                    (2, EVENTFD_TRIGGER, 3, 2, b"", efds),  # start + count > 4
                    (9, EVENTFD_TRIGGER, 0, 1, b"", efds[:1]),  # no such index
                    (2, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 2, b"\1", []),
                    (2, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 1, b"", efds[:1]),
                    (2, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 0, b"", []),
                ]
                for index, flags, start, count, data, fds in cases:
                    expect_errno(errno.EINVAL, c.set_irqs, index, flags, start, count, data, fds)
                # argsz not matching the body
                bad = wire.SetIrqs.build(
                    {
                        "argsz": 24,
                        "flags": IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                        "index": 2,
                        "start": 0,
                        "count": 1,
                    }
                )
                expect_errno(errno.EINVAL, lambda: c.request(Command.DEVICE_SET_IRQS, bad))
                # the device refuses mask eventfds (its own errno comes back)
                expect_errno(
                    errno.ENOTTY,
                    lambda: c.set_irqs(
                        0, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, 0, 1, fds=efds[:1]
                    ),
                )
            assert served.device.irq_fds == {}

        await in_thread(go)
    finally:
        for fd in efds:
            os.close(fd)


# --- region access ---------------------------------------------------------------


async def test_region_read_write(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            c.region_write(0, 0x10, b"\x01\x02\x03\x04\x05\x06\x07\x08")
            assert c.region_read(0, 0x10, 8) == bytes(range(1, 9))
            assert served.device.bar0[0x10:0x18] == bytes(range(1, 9))
            assert c.region_read(7, 0, 4) == (0x1234 | 0x11E8 << 16).to_bytes(4, "little")
            big = os.urandom(SERVER_MAX_DATA_XFER_SIZE // 64)
            c.region_write(1, 0, big[:BAR1_SIZE])
            assert c.region_read(1, 0, BAR1_SIZE) == big[:BAR1_SIZE]
            expect_errno(errno.EINVAL, lambda: c.region_read(0, BAR0_SIZE - 2, 4))
            expect_errno(errno.EINVAL, lambda: c.region_write(0, BAR0_SIZE, b"x"))
            expect_errno(errno.EINVAL, lambda: c.region_read(3, 0, 4))  # empty BAR
            expect_errno(errno.EINVAL, lambda: c.region_read(77, 0, 4))
            expect_errno(errno.EINVAL, lambda: c.region_read(0, 0, SERVER_MAX_DATA_XFER_SIZE + 1))
            # count disagreeing with the data carried
            lying = REGION_ACCESS.pack(0, 0, 8) + b"1234"
            expect_errno(errno.EINVAL, lambda: c.request(Command.REGION_WRITE, lying))
            expect_errno(
                errno.EINVAL,
                lambda: c.request(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4) + b"x"),
            )

    await in_thread(go)


async def test_posted_writes_get_no_reply_even_on_error(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            for i in range(50):
                c.region_write(0, 8 * i, i.to_bytes(8, "little"), no_reply=True)
            c.region_write(0, BAR0_SIZE, b"bad", no_reply=True)  # error: only logged
            c.send(Command.DEVICE_GET_INFO, b"short", no_reply=True)
            # The next reply on the wire is for this read, and sees every write.
            msg_id = c.send(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 400))
            reply = c.recv_message()
            assert reply.msg_id == msg_id and reply.flags == FLAG_REPLY
            data = reply.payload[16:]
            assert [u64(data[8 * i : 8 * i + 8]) for i in range(50)] == list(range(50))

    await in_thread(go)


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            msgs = []
            for i in range(200):
                msgs.append(
                    HEADER.pack(i, Command.REGION_WRITE, 16 + 16 + 4, 0, 0)
                    + REGION_ACCESS.pack(4 * i, 0, 4)
                    + i.to_bytes(4, "little")
                )
                msgs.append(
                    HEADER.pack(1000 + i, Command.REGION_READ, 32, 0, 0)
                    + REGION_ACCESS.pack(4 * i, 0, 4)
                )
            msgs.append(HEADER.pack(5000, 99, 16, 0, 0))  # unknown command in the stream
            c.send_raw(b"".join(msgs))
            for i in range(200):
                w = c.recv_message()
                r = c.recv_message()
                assert (w.msg_id, r.msg_id) == (i, 1000 + i)
                assert r.payload[16:] == i.to_bytes(4, "little")
            last = c.recv_message()
            assert last.msg_id == 5000 and last.error == errno.EINVAL

    await in_thread(go)


async def test_region_write_multi(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            c.region_write_multi([(0, 0x100, b"AB"), (0, 0x108, b"12345678"), (7, 0x3C, b"\x0b")])
            assert c.region_read(0, 0x100, 16) == b"AB" + bytes(6) + b"12345678"
            assert c.region_read(7, 0x3C, 1) == b"\x0b"
            c.region_write_multi([(0, 0x200 + i, b"z") for i in range(200)], no_reply=True)
            assert c.region_read(0, 0x200, 200) == b"z" * 200
            expect_errno(errno.EINVAL, lambda: c.region_write_multi([]))
            expect_errno(errno.EINVAL, lambda: c.region_write_multi([(0, 0, b"x")] * 201))
            too_long = wire.WRITE_MULTI_COUNT.pack(1) + wire.WRITE_MULTI_ENTRY.pack(
                0, 0, 9, b"x" * 8
            )
            expect_errno(errno.EINVAL, lambda: c.request(Command.REGION_WRITE_MULTI, too_long))
            expect_errno(
                errno.EINVAL,
                lambda: c.request(
                    Command.REGION_WRITE_MULTI, wire.WRITE_MULTI_COUNT.pack(2) + bytes(24)
                ),
            )
            # An entry past the region fails the request with the device's errno.
            expect_errno(errno.EINVAL, lambda: c.region_write_multi([(0, BAR0_SIZE, b"x")]))

    await in_thread(go)


# --- DMA -------------------------------------------------------------------------------


async def test_dma_map_with_fd_and_device_dma(served: Served) -> None:
    dev = served.device
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, 0x10000)
    try:

        def go() -> None:
            with connect(served) as c, mmap.mmap(memfd, 0x10000, mmap.MAP_SHARED) as ram:
                c.dma_map(0x100000, 0x8000, RW, fd=memfd, offset=0x8000)
                assert len(dev.dma) == 1
                ram[0x8100:0x8110] = bytes(range(16))
                c.region_write(0, DMA_DOORBELL, (0x100100).to_bytes(8, "little"))
                while u64(c.region_read(0, DMA_DONE, 8)) < 1:
                    pass
                assert ram[0x8110:0x8120] == bytes(range(16))[::-1]
                expect_errno(errno.EEXIST, lambda: c.dma_map(0x107000, 0x2000, RW, fd=memfd))
                expect_errno(errno.EINVAL, lambda: c.dma_map(0x200000, 0x1000, 1 << 7, fd=memfd))
                expect_errno(errno.EINVAL, lambda: c.dma_map(0x200000, 0, RW, fd=memfd))
                expect_errno(errno.EINVAL, lambda: c.dma_map((1 << 64) - 0x1000, 0x2000, RW))
                two = wire.DmaMap.build(
                    {"argsz": 32, "flags": RW, "offset": 0, "address": 0x300000, "size": 0x1000}
                )
                expect_errno(errno.EINVAL, lambda: c.request(Command.DMA_MAP, two, [memfd, memfd]))
                short = wire.DmaMap.build(
                    {"argsz": 16, "flags": RW, "offset": 0, "address": 0x300000, "size": 0x1000}
                )
                expect_errno(errno.EINVAL, lambda: c.request(Command.DMA_MAP, short, [memfd]))
                expect_errno(errno.ENOENT, lambda: c.dma_unmap(0x100000, 0x1000))
                expect_errno(errno.EINVAL, lambda: c.dma_unmap(0x100000, 0x8000, 1 << 5))
                expect_errno(errno.EINVAL, lambda: c.dma_unmap(0x100000, 0, DMA_UNMAP_FLAG_ALL))
                c.dma_unmap(0x100000, 0x8000)
                assert dev.dma == []
                c.dma_map(0x100000, 0x1000, RW, fd=memfd)
                c.dma_map(0x200000, 0x1000, RW)
                c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL)
                assert dev.dma == []

        await in_thread(go)
    finally:
        os.close(memfd)


async def test_dma_read_write_messages_while_client_requests_interleave(served: Served) -> None:
    """Memory mapped without an fd: the device DMAs by DMA_READ/DMA_WRITE
    on the one socket while the client keeps sending its own requests."""

    def go() -> None:
        with connect(served) as c:
            guest = bytearray(0x2000)
            guest[0x40:0x50] = b"0123456789abcdef"
            c.add_dma_buffer(0x40000, guest)
            c.dma_map(0x40000, 0x2000, RW)  # no fd
            c.region_write(0, DMA_DOORBELL, (0x40040).to_bytes(8, "little"))
            polls = 0
            while u64(c.region_read(0, DMA_DONE, 8)) < 1:
                polls += 1  # each read may carry a DMA request to answer
            assert guest[0x50:0x60] == b"fedcba9876543210"
            assert c.dma_requests_served == 2
            # A DMA the client cannot serve (no buffer there) fails cleanly.
            c.dma_map(0x90000, 0x1000, RW)
            c.region_write(0, DMA_DOORBELL, (0x90000).to_bytes(8, "little"))
            while u64(c.region_read(0, DMA_ERRORS, 8)) < 1:
                pass
            # Address not mapped at all: the device fails before any message.
            c.region_write(0, DMA_DOORBELL, (0x7000000).to_bytes(8, "little"))
            while u64(c.region_read(0, DMA_ERRORS, 8)) < 2:
                pass
            assert u64(c.region_read(0, DMA_DONE, 8)) == 1

    await in_thread(go)


async def test_dma_port_fails_when_client_goes(served: Served) -> None:
    dev = served.device

    def start() -> Client:
        c = connect(served)
        c.dma_map(0x1000, 0x1000, RW)
        return c

    c = await in_thread(start)
    port = dev.port
    assert port is not None
    async with trio.open_nursery() as nursery:
        outcome: list[BaseException] = []

        async def reader() -> None:
            try:
                await port.dma_read(0x1000, 8)
            except OSError as e:
                outcome.append(e)

        nursery.start_soon(reader)
        await in_thread(lambda: c.recv_message())  # the DMA_READ request arrives
        await in_thread(c.close)  # ... and is never answered
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.ENOTCONN
    with pytest.raises(OSError):
        await port.dma_write(0x1000, b"late")


async def test_dma_read_chunks_fit_our_limit_when_client_accepts_more(served: Served) -> None:
    """A client announcing a larger max_data_xfer_size than ours still gets
    DMA_READs whose replies fit what we accept (else the reply would be
    an impossible msg_size and end the connection)."""
    size = 2 * SERVER_MAX_DATA_XFER_SIZE + 123
    guest = bytearray(os.urandom(size))
    c = await in_thread(lambda: Client(served.path))
    try:
        await in_thread(lambda: c.negotiate({"max_msg_fds": 8, "max_data_xfer_size": 4 * size}))
        c.add_dma_buffer(0x100000, guest)
        port = served.device.port
        assert port is not None
        got: list[bytes | OSError] = []

        async def reader() -> None:
            try:
                got.append(await port.dma_read(0x100000, size))
            except OSError as e:
                got.append(e)

        def answer() -> None:
            while not got:
                c.poll(0.2)  # returns after 0.2 s of silence

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await in_thread(answer)
        assert got == [bytes(guest)] and c.dma_requests_served == 3
    finally:
        c.close()


# --- reset, features, migration ------------------------------------------------


async def test_reset(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            c.region_write(0, 0, b"dirty")
            c.reset()
            assert c.region_read(0, 0, 5) == bytes(5)
            assert served.device.resets == 1
            expect_errno(errno.EINVAL, lambda: c.request(Command.DEVICE_RESET, b"x"))

    await in_thread(go)


async def test_device_feature(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            get = DEVICE_FEATURE_GET | DEVICE_FEATURE_MIGRATION
            argsz, flags, data = c.device_feature(get)
            assert (argsz, flags, u64(data)) == (16, get, 1)
            # argsz too small: the reply says what is needed and carries no data
            assert c.device_feature(get, argsz=8) == (16, get, b"")
            assert c.device_feature(DEVICE_FEATURE_PROBE | DEVICE_FEATURE_GET | 1)[2] == b""
            state = DEVICE_FEATURE_SET | DEVICE_FEATURE_MIG_DEVICE_STATE
            assert (
                c.device_feature(state, (1).to_bytes(4, "little") + bytes(4))[2][:4] == b"\1\0\0\0"
            )
            expect_errno(errno.ENOTTY, lambda: c.device_feature(DEVICE_FEATURE_GET | 9))
            expect_errno(errno.EINVAL, lambda: c.device_feature(DEVICE_FEATURE_MIGRATION))
            expect_errno(
                errno.EINVAL, lambda: c.device_feature(DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | 1)
            )
            expect_errno(errno.EINVAL, lambda: c.device_feature(1 << 20 | DEVICE_FEATURE_GET | 1))
            expect_errno(errno.EINVAL, lambda: c.device_feature(get, argsz=4))
            expect_errno(errno.EINVAL, lambda: c.request(Command.DEVICE_FEATURE, b"\x08\0\0\0"))

    await in_thread(go)


async def test_migration_data(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            c.region_write(0, 0, b"state!")
            state = DEVICE_FEATURE_SET | DEVICE_FEATURE_MIG_DEVICE_STATE
            c.device_feature(state, (3).to_bytes(4, "little") + bytes(4))  # STOP_COPY
            stream = b""
            while chunk := c.mig_data_read(1000):
                stream += chunk
            assert len(stream) == BAR0_SIZE and stream.startswith(b"state!")
            c.mig_data_write(b"incoming")
            assert served.device.mig_in == b"incoming"
            expect_errno(errno.EINVAL, lambda: c.mig_data_read(SERVER_MAX_DATA_XFER_SIZE + 1))
            small_argsz = wire.MigData.build({"argsz": 8, "size": 16})
            expect_errno(errno.EINVAL, lambda: c.request(Command.MIG_DATA_READ, small_argsz))
            lying = wire.MigData.build({"argsz": 12, "size": 4}) + b"12"
            expect_errno(errno.EINVAL, lambda: c.request(Command.MIG_DATA_WRITE, lying))

    await in_thread(go)


# --- robustness ------------------------------------------------------------------


async def test_unknown_misdirected_and_fd_carrying_commands(served: Served) -> None:
    before = open_fds()
    efd = os.eventfd(0)

    def go() -> None:
        with connect(served) as c:
            for cmd in (0, 14, 19, 0xFFFF, Command.DMA_READ, Command.DMA_WRITE):
                expect_errno(errno.EINVAL, c.request, cmd, bytes(16))
            # fds on a command that takes none: EINVAL and the fds are closed
            for _ in range(20):
                expect_errno(
                    errno.EINVAL,
                    lambda: c.request(Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4), [efd] * 3),
                )
            expect_errno(
                errno.EINVAL,
                lambda: c.set_irqs(2, EVENTFD_TRIGGER, 0, 4, fds=[efd] * 9),  # > max_msg_fds
            )
            # A stray reply from the client is dropped without a reply.
            c.send_raw(HEADER.pack(77, Command.DMA_READ, 16, FLAG_REPLY, 0))
            assert c.device_info().num_irqs == 5

    await in_thread(go)
    os.close(efd)
    await until_disconnected(served)  # the server closes its end after the client's
    assert open_fds() == before


async def test_device_bug_gives_eio_and_connection_lives(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            expect_errno(errno.EIO, lambda: c.region_read(0, BUGGY_OFFSET, 4))
            assert c.region_read(0, 0, 4) == bytes(4)

    await in_thread(go)


@pytest.mark.parametrize("size", [0, 15, SERVER_MAX_DATA_XFER_SIZE + (1 << 20)])
async def test_impossible_msg_size_closes_only_that_connection(served: Served, size: int) -> None:
    def go() -> None:
        with connect(served) as c:
            c.send_raw(HEADER.pack(9, Command.REGION_READ, size, 0, 0) + bytes(64))
            expect_closed(c)
        with connect(served) as c:
            assert c.device_info().num_regions == 10

    await in_thread(go)


async def test_reconnect_keeps_device_state_and_drops_client_resources(served: Served) -> None:
    dev = served.device
    efd = os.eventfd(0)
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 0x1000)
    try:

        def first() -> None:
            with connect(served) as c:
                c.region_write(0, 0x20, b"persist")
                c.dma_map(0x1000, 0x1000, RW, fd=memfd)
                c.set_irqs(1, EVENTFD_TRIGGER, 0, 1, fds=[efd])
                assert dev.dma and dev.irq_fds

        await in_thread(first)
        while served.server.connected:
            await trio.sleep(0)
        assert dev.dma == [] and dev.irq_fds == {} and dev.disconnects == 1

        def second() -> None:
            with connect(served) as c:
                assert c.region_read(0, 0x20, 7) == b"persist"

        await in_thread(second)
        assert dev.connects == 2
    finally:
        os.close(efd)
        os.close(memfd)


async def test_second_client_waits_until_the_first_leaves(served: Served) -> None:
    def go() -> None:
        first = connect(served)
        with Client(served.path) as second:
            version_id = second.send(Command.VERSION, _caps({})[0:4])
            # Served only after the first client is gone; the first still works.
            first.region_write(0, 0, b"one")
            assert first.device_info().num_regions == 10
            first.close()
            reply = second.wait_reply(version_id)
            assert reply.flags == FLAG_REPLY
            assert second.region_read(0, 0, 3) == b"one"
        assert served.device.connects == 2

    await in_thread(go)


async def test_server_disconnect_drops_the_client(served: Served) -> None:
    c = await in_thread(lambda: connect(served))
    while not served.server.connected:
        await trio.sleep(0)
    served.server.disconnect()
    while served.server.connected:
        await trio.sleep(0)
    await in_thread(lambda: expect_closed(c))
    c.close()
    assert served.device.disconnects == 1


async def test_device_failing_in_connected_costs_the_client_not_the_server(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = served.device

    def broken(port: object) -> None:
        raise RuntimeError("device bug")

    monkeypatch.setattr(dev, "connected", broken)
    c = Client(served.path)
    await in_thread(lambda: expect_closed(c))
    c.close()
    monkeypatch.undo()

    def again() -> None:
        with connect(served) as c2:  # the server still serves
            assert c2.device_info().num_regions > 0

    await in_thread(again)
    assert dev.connects == 1


async def test_raw_socket_half_message_then_eof(served: Served) -> None:
    def go() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(served.path)
        s.sendall(HEADER.pack(1, Command.VERSION, 100, 0, 0) + b"\0\0")
        s.close()
        with connect(served) as c:
            assert c.device_info().num_regions == 10

    await in_thread(go)


async def test_error_reply_is_header_only(served: Served) -> None:
    def go() -> None:
        with connect(served) as c:
            msg_id = c.send(
                Command.DEVICE_GET_IRQ_INFO,
                wire.IrqInfoMsg.build({"argsz": 16, "flags": 0, "index": 42, "count": 0}),
            )
            reply = c.wait_reply(msg_id)
            assert reply.flags == FLAG_REPLY | FLAG_ERROR and reply.payload == b""
            assert reply.command == Command.DEVICE_GET_IRQ_INFO
            with pytest.raises(VfioUserError):
                check(reply)

    await in_thread(go)


async def test_client_vanishing_mid_reply_ends_only_its_connection(served: Served) -> None:
    def go() -> None:
        for _ in range(5):
            with connect(served) as c:
                # Replies far bigger than the socket buffer, never read.
                burst = HEADER.pack(5, Command.REGION_READ, 32, 0, 0) + REGION_ACCESS.pack(
                    0, 1, BAR1_SIZE
                )
                c.send_raw(burst * 200)
        with connect(served) as c:
            assert c.device_info().num_regions == 10

    await in_thread(go)
    while served.server.connected:
        await trio.sleep(0)
    assert served.device.disconnects == 6


async def test_spinning_server_serves_the_same(sockdir: str) -> None:
    """spin_us > 0 changes how the reader waits, never what it answers."""
    device = FakeDevice()
    path = os.path.join(sockdir, "spin.sock")

    def go() -> None:
        with connect_path(path) as c:
            for i in range(300):
                c.region_write(0, 8 * (i % 64), i.to_bytes(8, "little"))
                assert u64(c.region_read(0, 8 * (i % 64), 8)) == i
            guest = bytearray(b"spin-dma-source!" + bytes(48))
            c.add_dma_buffer(0x5000, guest)
            c.dma_map(0x5000, 0x40, RW)
            c.region_write(0, DMA_DOORBELL, (0x5000).to_bytes(8, "little"))
            while u64(c.region_read(0, DMA_DONE, 8)) < 1:
                pass
            assert guest[16:32] == b"spin-dma-source!"[::-1]

    try:
        async with trio.open_nursery() as nursery:
            server = DeviceServer(device, path, name="spin", spin_us=200)
            await nursery.start(server.serve)
            await in_thread(go)
            nursery.cancel_scope.cancel()
    finally:
        device.close()


def connect_path(path: str) -> Client:
    c = Client(path)
    c.negotiate()
    return c
