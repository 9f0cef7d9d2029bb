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
import random
import select
import socket
import struct
import time
from functools import partial
from typing import Any

import pytest
import trio
from libvfio_user_pair import Served, errno_of, in_thread, needs_libvfio_user, serve_pair
from vfio_user_gadget import REG_DONE, REG_DOORBELL, REG_DST, REG_ERRORS, REG_LEN, REG_SRC, Gadget

from mdevcore.samples.mtty import MttyDevice
from mdevcore.samples.mtty import uart as u
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.constants import Command

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
                out[f"region_info {i}"] = errno_of(partial(_region_info, c, i))
            for i in range(6):
                out[f"irq_info {i}"] = errno_of(partial(c.irq_info, i))
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
            none, boolean = vfio.IRQ_SET_DATA_NONE, vfio.IRQ_SET_DATA_BOOL
            trigger, mask = vfio.IRQ_SET_ACTION_TRIGGER, vfio.IRQ_SET_ACTION_MASK
            bad_set_irqs: dict[str, tuple[int, int, int, int, bytes, list[int]]] = {
                "start beyond count": (MSIX, TRIGGER_EVENTFD, 4, 1, b"", efds[:1]),
                "count 0, start 1": (MSIX, none | trigger, 1, 0, b"", []),
                "mask ERR": (vfio.PCI_ERR_IRQ_INDEX, none | mask, 0, 1, b"", []),
                "bools short": (MSIX, boolean | trigger, 0, 2, b"\x01", []),
                "fds for NONE": (MSIX, none | trigger, 0, 1, b"", efds[:1]),
                "2 fds for 1": (MSIX, TRIGGER_EVENTFD, 0, 1, b"", efds[:2]),
                "two actions": (MSIX, none | trigger | mask, 0, 1, b"", []),
                "index 5": (5, none | trigger, 0, 1, b"", []),
            }
            for what, args in bad_set_irqs.items():
                out[f"set_irqs {what}"] = errno_of(partial(c.set_irqs, *args))
            trio.from_thread.run_sync(dev.raise_irq, 1)
            out["msix vector 1 after bad SET_IRQS"] = _fired(efds[1])
            c.set_irqs(MSIX, boolean | trigger, 0, 2, b"\x00\x01")
            out["msix bool trigger"] = (_fired(efds[0]), _fired(efds[1]))
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


# --- migration: mtty's state from a libvfio-user-served card to a native one and back


def _set_state(c: Client, state: int) -> int:
    _, _, data = c.device_feature(FEATURE_SET, struct.pack("<II", state, 0))
    return int(struct.unpack_from("<I", data)[0])


def _save(c: Client) -> bytes:
    _set_state(c, STOP_COPY)  # from RUNNING: both walk RUNNING -> STOP -> STOP_COPY
    stream = b""
    while chunk := c.mig_data_read(64):
        stream += chunk
        if len(chunk) < 64:
            break
    _set_state(c, STOP)
    return stream


def _load(c: Client, stream: bytes) -> None:
    _set_state(c, RESUMING)
    for i in range(0, len(stream), 50):
        c.mig_data_write(stream[i : i + 50])
    _set_state(c, STOP)
    _set_state(c, RUNNING)


def _uart(c: Client, port: int, reg: int, value: int | None = None) -> int:
    if value is not None:
        c.region_write(port, reg, bytes([value]))
        return value
    return c.region_read(port, reg, 1)[0]


async def test_migration_moves_mtty_between_transports(sockdir: str) -> None:
    def go(native: Served, lvu: Served) -> None:
        with Client(lvu.path) as a, Client(native.path) as b:
            a.negotiate()
            b.negotiate()
            get = vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_MIGRATION
            # libvfio-user offers STOP_COPY|PRE_COPY whatever the device has (no P2P).
            assert _u64(a.device_feature(get)[2][:8]) == 0b101
            assert _u64(b.device_feature(get)[2][:8]) == 0b111
            _uart(a, 0, u.IIR_FCR, u.FCR_ENABLE_FIFO)
            for byte in b"in flight":
                _uart(a, 0, u.RBR_THR, byte)
            _uart(a, 1, u.SCR, 0x5C)
            from_lvu = _save(a)
            assert lvu.device.mig_state == STOP
            _load(b, from_lvu)
            assert _uart(b, 1, u.SCR) == 0x5C
            from_native = _save(b)
            assert from_native == from_lvu  # the same state, the same stream
            _load(a, from_native)
            assert lvu.device.mig_state == RUNNING
            assert bytes(_uart(a, 0, u.RBR_THR) for _ in range(9)) == b"in flight"
            assert _uart(a, 1, u.SCR) == 0x5C
            _set_state(b, RUNNING)
            assert bytes(_uart(b, 0, u.RBR_THR) for _ in range(9)) == b"in flight"
            # The device's own validation reaches the client through libvfio-user.
            _set_state(a, RESUMING)
            a.mig_data_write(from_native[:-1])
            with pytest.raises(OSError) as e:
                _set_state(a, STOP)
            assert e.value.errno == errno.EINVAL

    async with serve_pair(lambda: MttyDevice(2), sockdir) as (native, lvu):
        await in_thread(lambda: go(native, lvu))


async def test_reconnect_keeps_device_state_and_drops_client_resources(sockdir: str) -> None:
    async with serve_pair(lambda: MttyDevice(1), sockdir) as pair:
        for served in pair:
            efd = os.eventfd(0, os.EFD_NONBLOCK)
            memfd = os.memfd_create("ram")
            os.ftruncate(memfd, 0x1000)

            def first(served: Served = served, efd: int = efd, memfd: int = memfd) -> None:
                with Client(served.path) as c:
                    c.negotiate()
                    _uart(c, 0, u.SCR, 0x33)
                    c.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, fds=[efd])
                    c.dma_map(0x10000, 0x1000, RW, fd=memfd)
                    assert len(served.device.dma) == 1

            await in_thread(first)
            with trio.fail_after(5):
                while served.server.connected:
                    await trio.sleep(0.01)
            assert len(served.device.dma) == 0, served.transport
            served.device.raise_irq(0)
            assert _fired(efd) == 0, f"{served.transport}: the old client's eventfd fired"

            def second(served: Served = served) -> int:
                with Client(served.path) as c:
                    c.negotiate()
                    return _uart(c, 0, u.SCR)

            assert await in_thread(second) == 0x33, served.transport
            os.close(efd)
            os.close(memfd)


async def test_interrupt_raised_by_the_device_reaches_the_clients_eventfd(sockdir: str) -> None:
    """mtty's INTx through libvfio-user: signalled, auto-masked until UNMASK."""
    async with serve_pair(lambda: MttyDevice(1), sockdir) as (_, lvu):
        efd = os.eventfd(0, os.EFD_NONBLOCK)

        def go() -> list[int]:
            with Client(lvu.path) as c:
                c.negotiate()
                c.set_irqs(vfio.PCI_INTX_IRQ_INDEX, TRIGGER_EVENTFD, 0, 1, fds=[efd])
                _uart(c, 0, u.IER, u.IER_THRI)  # THR empty: the UART interrupts at once
                got = [_fired(efd)]
                _uart(c, 0, u.IER, 0)
                _uart(c, 0, u.IER, u.IER_THRI)  # again, but INTx is auto-masked
                got.append(_fired(efd))
                c.set_irqs(
                    vfio.PCI_INTX_IRQ_INDEX,
                    vfio.IRQ_SET_DATA_NONE | vfio.IRQ_SET_ACTION_UNMASK,
                    0,
                    1,
                )
                got.append(_waited(efd))
                return got

        try:
            assert await in_thread(go) == [1, 0, 1]
        finally:
            os.close(efd)


def _waited(fd: int, timeout: float = 2.0) -> int:
    select.select([fd], [], [], timeout)
    return _fired(fd)


# --- dirty logging: the device's own DMA writes show in the report on both


class MigratableGadget(Gadget):
    """The Gadget plus STOP_COPY migration (nothing to save): DMA logging is offered."""

    migration_flags = 1  # VFIO_MIGRATION_STOP_COPY

    def save_state(self) -> bytes:
        return b""

    def load_state(self, data: bytes) -> None:
        return None


def dirty_transcript(served: Served) -> list[int]:
    memfd = os.memfd_create("guest-ram")
    os.ftruncate(memfd, 0x4000)
    page = 4096
    start = vfio.DEVICE_FEATURE_SET | vfio.DEVICE_FEATURE_DMA_LOGGING_START
    report = vfio.DEVICE_FEATURE_GET | vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT
    reports = []
    try:
        with Client(served.path) as c:
            c.negotiate()
            c.dma_map(0x100000, 0x4000, RW, fd=memfd)
            c.device_feature(start, struct.pack("<QIIQQ", page, 1, 0, 0x100000, 0x4000))
            query = struct.pack("<QQQ", 0x100000, 0x4000, page)
            for n, dst in enumerate((0x102000, 0x103FF8), start=1):
                _doorbell(c, 0x100000, dst, 8)  # the device writes page 2, then page 3
                _wait_reg(c, REG_DONE, n)
                reports.append(_u64(c.device_feature(report, query)[2][24:32]))
            reports.append(_u64(c.device_feature(report, query)[2][24:32]))  # cleared
    finally:
        os.close(memfd)
    return reports


async def test_device_dma_writes_are_in_the_dirty_report_on_both(sockdir: str) -> None:
    async with serve_pair(MigratableGadget, sockdir) as (native, lvu):
        assert await in_thread(lambda: dirty_transcript(native)) == [0b100, 0b1000, 0]
        assert await in_thread(lambda: dirty_transcript(lvu)) == [0b100, 0b1000, 0]


# --- clients that stall: libvfio-user reads blocking; what that may cost


async def test_stalled_clients_cost_at_most_io_timeout(sockdir: str) -> None:
    from mdevcore.vfio_user.constants import Command
    from mdevcore.vfio_user.libvfio_user import LibvfioUserServer
    from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

    device = Gadget()
    path = os.path.join(sockdir, "stall.sock")
    read = HEADER.pack(7, Command.REGION_READ, 32, 0, 0) + REGION_ACCESS.pack(0x40, 0, 4)

    def go() -> None:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(path)  # and never sends VERSION: dropped after io_timeout
        t0 = time.monotonic()
        with Client(path) as c:
            c.negotiate()
            assert time.monotonic() - t0 < 2.0  # the silent one was given up on
            silent.settimeout(2)
            assert silent.recv(16) == b""
            c.send_raw(read[:10])  # a request arriving in pieces, within the timeout
            time.sleep(0.1)
            c.send_raw(read[10:])
            assert c.wait_reply(7).payload[16:] == bytes([0xA5 ^ 0x40]) * 4
            c.send_raw(read[:20])  # one that stalls: the client is dropped
            c.sock.settimeout(3)
            assert c.sock.recv(16) == b""
        silent.close()
        with Client(path) as c:  # and the next one is served
            c.negotiate()
            assert c.region_read(0, 0x40, 4) == bytes([0xA5 ^ 0x40]) * 4

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(LibvfioUserServer(device, path, name="stall", io_timeout=0.3).serve)
            await in_thread(go)
            nursery.cancel_scope.cancel()
    finally:
        device.close()


# --- differential: random valid and malformed requests to the same device on each


def _explain(cmd: int, body: bytes, native: Any, lvu: Any) -> str | None:
    """Why libvfio-user's answer differs, when it is one of its known choices."""
    n_err = native[1] if native[0] == "err" else None
    l_err = lvu[1] if lvu[0] == "err" else None
    if cmd == Command.DEVICE_RESET and body and n_err == errno.EINVAL and lvu == ("ok", b""):
        return "DEVICE_RESET with a payload: libvfio-user ignores it, the engine refuses it"
    if cmd == Command.DEVICE_FEATURE and (n_err, l_err) == (errno.ENOTTY, errno.EINVAL):
        return "feature not offered: EINVAL from libvfio-user, ENOTTY from the device"
    if cmd == Command.DEVICE_GET_IRQ_INFO and native[0] == lvu[0] == "ok":
        same_but_flags = native[1][:4] + native[1][8:] == lvu[1][:4] + lvu[1][8:]
        return "IRQ info flags: EVENTFD only from libvfio-user" if same_but_flags else None
    if cmd == Command.DEVICE_GET_REGION_IO_FDS and native[0] == "ok" and l_err == errno.EINVAL:
        return "IO_FDS of a region the device does not have: EINVAL from libvfio-user"
    if cmd == Command.DEVICE_GET_REGION_INFO and native[0] == lvu[0] == "ok":
        n_flags, l_flags = (
            struct.unpack_from("<I", native[1], 4)[0],
            struct.unpack_from("<I", lvu[1], 4)[0],
        )
        same_rest = native[1][8:12] + native[1][16:] == lvu[1][8:12] + lvu[1][16:]
        if n_flags == l_flags | vfio.REGION_FLAG_CAPS and same_rest:
            # (the engine also leaves cap_offset set; the kernel zeroes it)
            return "region info, argsz too small for the caps: libvfio-user drops the CAPS flag"
    if cmd == Command.DEVICE_SET_IRQS and native[0] == "err" and lvu == ("ok", b""):
        return "SET_IRQS the device refuses (e.g. MASK by eventfd): libvfio-user answered first"
    if cmd in (Command.REGION_READ, Command.REGION_WRITE) and len(body) >= 16:
        if struct.unpack_from("<I", body, 12)[0] == 0 and lvu == ("ok", b""):
            return "zero-length region access: libvfio-user replies with no payload"
    if cmd == Command.DMA_MAP and len(body) >= 32:
        flags = struct.unpack_from("<I", body, 4)[0]
        address, size = struct.unpack_from("<QQ", body, 16)
        if n_err == errno.EINVAL and lvu == ("ok", b"") and size == 0:
            return "DMA_MAP of size 0: libvfio-user accepts it, the engine refuses"
        if n_err == errno.EINVAL and lvu == ("ok", b"") and address + size > 1 << 64:
            return "DMA_MAP wrapping past 2^64: libvfio-user accepts it (no overflow check)"
        if n_err == errno.EINVAL and lvu == ("ok", b"") and not flags & RW:
            return "DMA_MAP with neither READ nor WRITE: libvfio-user maps it, the engine refuses"
        if l_err == errno.ENOSPC and size > 1 << 43:
            return "DMA_MAP over 8 TiB: ENOSPC from libvfio-user, EINVAL from the engine"
        if (n_err, l_err) == (errno.EEXIST, errno.EINVAL):
            return "DMA_MAP overlapping a mapping: EINVAL from libvfio-user, EEXIST (spec)"
    return None


def differential(paths: tuple[str, str], count: int, seed: int) -> tuple[int, dict[str, int]]:
    """Send the same random requests to both; (identical answers, explained differences)."""
    from vfio_user_fuzzgen import COMMANDS, random_body

    from mdevcore.vfio_user.constants import FLAG_ERROR
    from mdevcore.vfio_user.wire import HEADER, close_fds

    rng = random.Random(seed)
    # Not VERSION (each connection negotiates once), not REGION_WRITE_MULTI:
    # libvfio-user refuses it where the device applies the writes, a
    # divergence no reset undoes (the cross-check above pins it).
    commands = [c for c in COMMANDS if c not in (Command.VERSION, Command.REGION_WRITE_MULTI)]
    clients: list[Client | None] = [None, None]
    same = 0
    explained: dict[str, int] = {}

    def answer(i: int, msg_id: int, raw: bytes) -> Any:
        c = clients[i]
        if c is None:
            c = clients[i] = Client(paths[i], timeout=5)
            c.negotiate()
        try:
            c.send_raw(raw)
            reply = c.wait_reply(msg_id)
        except (OSError, EOFError):
            c.close()
            clients[i] = None
            return ("closed",)
        close_fds(reply.fds)
        return ("err", reply.error) if reply.flags & FLAG_ERROR else ("ok", bytes(reply.payload))

    def resync() -> None:
        for c in clients:
            if c is not None:
                c.dma_unmap(0, 0, vfio.DMA_UNMAP_FLAG_ALL)
                c.reset()

    try:
        for n in range(count):
            cmd = rng.choice(commands)
            body = random_body(rng, cmd)
            msg_id = n & 0xFFFF
            raw = HEADER.pack(msg_id, cmd, 16 + len(body), 0, 0) + body
            native, lvu = answer(0, msg_id, raw), answer(1, msg_id, raw)
            if native == lvu:
                same += 1
                continue
            why = _explain(cmd, body, native, lvu)
            if not why:
                why = f"UNEXPLAINED: request {n}, command {cmd}, {body.hex()}: {native} != {lvu}"
            explained[why] = explained.get(why, 0) + 1
            resync()  # the two devices may have diverged: same state again
    finally:
        for c in clients:
            if c is not None:
                c.close()
    return same, explained


async def test_random_requests_get_the_same_answers(sockdir: str) -> None:
    count = 3000
    async with serve_pair(Gadget, sockdir) as (native, lvu):
        same, explained = await in_thread(lambda: differential((native.path, lvu.path), count, 11))
    print(f"{same} of {count} identical; differences: {explained}")
    unexplained = [why for why in explained if why.startswith("UNEXPLAINED")]
    assert not unexplained, unexplained
    assert same + sum(explained.values()) == count
    assert same > count * 0.85


async def test_no_fd_leaks_across_clients(sockdir: str) -> None:
    """Peeked SET_IRQS fds, map_files fds for DMA, region fds: none stay behind."""

    def session(path: str) -> None:
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        memfd = os.memfd_create("ram")
        os.ftruncate(memfd, 0x2000)
        try:
            with Client(path) as c:
                c.negotiate()
                c.set_irqs(MSIX, TRIGGER_EVENTFD, 0, 4, fds=efds)
                c.dma_map(0x100000, 0x2000, RW, fd=memfd)
                info = c.region_info(2)
                assert info.fd is not None
                os.close(info.fd)
                c.dma_unmap(0x100000, 0x2000)
                c.dma_map(0x100000, 0x2000, RW, fd=memfd)  # left mapped: dropped on disconnect
        finally:
            os.close(memfd)
            for fd in efds:
                os.close(fd)

    async def cycle(served: Served) -> None:
        await in_thread(lambda: session(served.path))
        with trio.fail_after(5):
            while served.server.connected:
                await trio.sleep(0.01)

    async with serve_pair(Gadget, sockdir) as (_, lvu):
        await cycle(lvu)  # warm-up: the first client may allocate for good
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(3):
            await cycle(lvu)
        assert set(os.listdir("/proc/self/fd")) == before
