"""The libvfio-user transport cross-checked against the native engine.

The same device class (the Gadget, mtty) is served by both transports; the
same requests from mdevcore's client must get the same answers.  Where
libvfio-user answers differently by its own design, the difference is
listed in DIFFERENCES with the reason, and test_differences_are_exactly_these
pins the list (a new or vanished difference fails it).
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from libvfio_user_pair import Served, errno_of, in_thread, needs_libvfio_user, serve_pair
from vfio_user_gadget import REG_DONE, REG_DOORBELL, REG_DST, REG_ERRORS, REG_LEN, REG_SRC, Gadget

from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.client import Client
from samples.mtty import MttyDevice
from samples.mtty import uart as u

pytestmark = needs_libvfio_user

CFG = vfio.PCI_CONFIG_REGION_INDEX
RW = vfio.DMA_MAP_FLAG_READ | vfio.DMA_MAP_FLAG_WRITE
MSIX = vfio.PCI_MSIX_IRQ_INDEX
TRIGGER_EVENTFD = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER
FEATURE_SET = vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_MIG_DEVICE_STATE
STOP, RUNNING, STOP_COPY, RESUMING = 1, 2, 3, 4

# label -> why libvfio-user answers otherwise (its own choices, not the device's)
DIFFERENCES = {
    "version": "libvfio-user's VERSION reply offers only max_msg_fds and max_data_xfer_size "
    "(no max_dma_maps, pgsizes, write_multiple; lib/tran.c)",
    **{
        f"irq_info {i}": "libvfio-user reports VFIO_IRQ_INFO_EVENTFD only: no MASKABLE|AUTOMASKED "
        "for INTx, no NORESIZE for MSI/MSI-X (lib/irq.c)"
        for i in range(3)
    },
    "feature MIGRATION GET (no migration)": "libvfio-user answers EINVAL for a feature the "
    "device does not offer; the device (like the kernel) answers ENOTTY",
    "region_write_multi": "libvfio-user does not implement REGION_WRITE_MULTI (15): EINVAL "
    "'bad command' (QEMU only sends it after write_multiple was offered)",
    "bar0 writes after multi": "so the device never sees those writes",
}


def _find_cap(c: Client, cap_id: int) -> int:
    ptr = c.region_read(CFG, 0x34, 1)[0]
    while ptr:
        if c.region_read(CFG, ptr, 1)[0] == cap_id:
            return ptr
        ptr = c.region_read(CFG, ptr + 1, 1)[0]
    raise AssertionError(f"capability {cap_id:#x} not found")


def _u64(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _region_info(c: Client, index: int) -> Any:
    r = c.region_info(index)
    window = None
    if r.fd is not None:
        try:
            # What the client would mmap: the first sparse area (or the region).
            area = (0, r.size)
            for cap in r.caps:
                if cap.id == 1:
                    area = struct.unpack_from("<QQ", cap.body, 8)
            with mmap.mmap(r.fd, area[1], mmap.MAP_SHARED, offset=r.offset + area[0]) as m:
                window = bytes(m[:16])
        finally:
            os.close(r.fd)
    return (r.argsz, r.flags, r.size, r.offset, [(cap.id, cap.body) for cap in r.caps], window)


def gadget_transcript(served: Served) -> dict[str, Any]:
    """Every request of the cross-check on one transport, answer by label."""
    out: dict[str, Any] = {}
    dev = served.device
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, 0x4000)
    try:
        with Client(served.path) as c, mmap.mmap(memfd, 0x4000, mmap.MAP_SHARED) as ram:
            major, minor, caps = c.negotiate()
            out["version"] = (major, minor, sorted(caps))
            out["device_info"] = c.device_info()
            for i in range(10):
                out[f"region_info {i}"] = errno_of(lambda i=i: _region_info(c, i))
            for i in range(6):
                out[f"irq_info {i}"] = errno_of(lambda i=i: c.irq_info(i))
            out["config 0-256"] = c.region_read(CFG, 0, 256).hex()
            out["config 256-4096"] = c.region_read(CFG, 256, 4096 - 256).hex()
            # BAR sizing and the command register: the device's write masks.
            c.region_write(CFG, 0x10, b"\xff\xff\xff\xff")
            c.region_write(CFG, 0x18, b"\xff\xff\xff\xff")
            c.region_write(CFG, 0x04, b"\xff\xff")
            out["config after writes"] = c.region_read(CFG, 0, 64).hex()
            c.region_write(CFG, 0x10, b"\x00\x00\x00\x00")
            out["config odd access"] = c.region_read(CFG, 0x3, 3).hex()
            out["bar0 read"] = c.region_read(0, 0x40, 8).hex()
            c.region_write(0, 0x44, b"\x01\x02")
            out["bar0 writes seen"] = dev.writes[-1]
            out["region_write_multi"] = errno_of(
                lambda: c.region_write_multi([(0, 0x48, b"\x07"), (0, 0x4C, b"\x08\x09")])
            )
            out["bar0 writes after multi"] = dev.writes[-1]
            out["bar2 read"] = c.region_read(2, 0x1000, 16).hex()
            out["read beyond bar0"] = errno_of(lambda: c.region_read(0, 0xFFE, 4))
            out["read region 1 (absent)"] = errno_of(lambda: c.region_read(1, 0, 4))
            out["read region 9"] = errno_of(lambda: c.region_read(9, 0, 4))
            out["write beyond config"] = errno_of(lambda: c.region_write(CFG, 0x1000, b"\0"))
            # MSI-X: eventfds by SET_IRQS, enable in config, the device raises.
            c.set_irqs(MSIX, TRIGGER_EVENTFD, 0, 4, fds=efds)
            cap = _find_cap(c, 0x11)
            ctrl = int.from_bytes(c.region_read(CFG, cap + 2, 2), "little")
            c.region_write(CFG, cap + 2, (ctrl | 0x8000).to_bytes(2, "little"))
            c.set_irqs(MSIX, vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_ACTION_MASK, 2, 1)
            trio.from_thread.run_sync(dev.raise_irq, 1)
            trio.from_thread.run_sync(dev.raise_irq, 2)
            out["msix vector 1 fired"] = _fired(efds[1])
            out["msix vector 2 masked"] = _fired(efds[2])
            out["pba"] = c.region_read(4, 0x800, 8).hex()
            c.set_irqs(MSIX, vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_ACTION_UNMASK, 2, 1)
            out["msix vector 2 on unmask"] = _fired(efds[2])
            out["set_irqs start beyond count"] = errno_of(
                lambda: c.set_irqs(MSIX, TRIGGER_EVENTFD, 4, 1, fds=efds[:1])
            )
            # DMA through a mapped fd: the device copies 16 bytes.
            c.dma_map(0x100000, 0x2000, RW, fd=memfd, offset=0x1000)
            ram[0x1100:0x1110] = b"sixteen bytes!!!"
            _doorbell(c, 0x100100, 0x100800, 16)
            _wait_reg(c, REG_DONE, 1)
            out["dma by fd"] = bytes(ram[0x1800:0x1810])
            # DMA without an fd: DMA_READ/DMA_WRITE messages the client answers.
            guest = bytearray(0x1000)
            guest[0x10:0x20] = b"by message, too."
            c.add_dma_buffer(0x200000, guest)
            c.dma_map(0x200000, 0x1000, RW)
            _doorbell(c, 0x200010, 0x200100, 16)
            _serve_dma(c, 2)
            _wait_reg(c, REG_DONE, 2)
            out["dma by message"] = bytes(guest[0x100:0x110])
            out["dma_unmap unknown"] = errno_of(lambda: c.dma_unmap(0x300000, 0x1000))
            c.dma_unmap(0x200000, 0x1000)
            c.dma_unmap(0x100000, 0x2000)
            out["dma table after unmaps"] = len(dev.dma)
            out["feature MIGRATION GET (no migration)"] = errno_of(
                lambda: c.device_feature(vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_MIGRATION)
            )
            resets = dev.resets
            c.region_write(0, REG_SRC, b"\x55" * 8)
            c.reset()
            out["reset"] = (dev.resets - resets, c.region_read(0, REG_SRC, 8).hex())
    finally:
        os.close(memfd)
        for fd in efds:
            os.close(fd)
    return out


def _fired(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _doorbell(c: Client, src: int, dst: int, length: int) -> None:
    c.region_write(0, REG_SRC, src.to_bytes(8, "little"))
    c.region_write(0, REG_DST, dst.to_bytes(8, "little"))
    c.region_write(0, REG_LEN, length.to_bytes(4, "little"))
    c.region_write(0, REG_DOORBELL, b"\x01\x00\x00\x00")


def _wait_reg(c: Client, reg: int, value: int) -> None:
    deadline = time.monotonic() + 5
    while _u64(c.region_read(0, reg, 4)) < value:
        assert _u64(c.region_read(0, REG_ERRORS, 4)) == 0, "device DMA failed"
        assert time.monotonic() < deadline, f"register {reg:#x} never reached {value}"


def _serve_dma(c: Client, count: int) -> None:
    """Answer the device's DMA_READ/DMA_WRITE without sending requests meanwhile.

    libvfio-user waits for the reply to its DMA request synchronously on the
    one socket: a request of ours arriving first would be taken for a bad
    reply.  The native server copes either way; both get this sequence.
    """
    deadline = time.monotonic() + 5
    while c.dma_requests_served < count:
        c.poll(0.05)
        assert time.monotonic() < deadline, "the device never asked for DMA"


async def _gadget_transcripts(sockdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async with serve_pair(Gadget, sockdir) as (native, lvu):
        a = await in_thread(lambda: gadget_transcript(native))
        b = await in_thread(lambda: gadget_transcript(lvu))
    return a, b


async def test_same_answers_from_both_transports(sockdir: str) -> None:
    native, lvu = await _gadget_transcripts(sockdir)
    assert native.keys() == lvu.keys()
    same = {k for k in native if native[k] == lvu[k]}
    differ = {k: (native[k], lvu[k]) for k in native if k not in same}
    unexpected = {k: v for k, v in differ.items() if k not in DIFFERENCES}
    assert not unexpected, f"transports disagree: {unexpected}"
    vanished = DIFFERENCES.keys() - differ.keys()
    assert not vanished, f"listed differences no longer differ: {vanished}"
    # The behaviour that matters most, spelled out.
    assert native["msix vector 1 fired"] == 1 and native["msix vector 2 masked"] == 0
    assert native["msix vector 2 on unmask"] == 1
    assert native["dma by fd"] == b"sixteen bytes!!!"
    assert native["dma by message"] == b"by message, too."
    assert native["reset"] == (1, "00" * 8)
    assert native["region_write_multi"] is None
