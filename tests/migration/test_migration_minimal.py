"""The tool against a vfio-user server that is not ours in its habits.

``StrictDevice`` implements migration v2 from the uAPI's minimum: STOP_COPY
only (no P2P, no PRE_COPY), no MIG_DATA_SIZE, no dirty logging (ENOTTY),
single arcs only (a combination request is EINVAL, which the uAPI lets a
device's driver core walk but a client must not rely on), and short
MIG_DATA_READ replies before the end of its stream, which only a
zero-length read ends.  Its state is BAR0 (4 KiB of registers).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mdevcore.migration.arcs import State, device_arcs
from mdevcore.migration.guest_memory import PAGE_SIZE
from mdevcore.migration.sender import Options
from mdevcore.migration.session import Endpoint, migrate_local
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.server import DeviceServer

BAR0 = 4096
ARCS = {(int(a), int(b)) for a, b in device_arcs(1)}  # the 6 STOP_COPY-only arcs
MEM = 256 << 10


class StrictDevice:
    def __init__(self) -> None:
        self.bar0 = bytearray(BAR0)
        self.state = int(State.RUNNING)
        self.out = b""
        self.into = bytearray()
        self.requests: list[int] = []

    def device_info(self) -> vfio.DeviceInfo:
        return vfio.DeviceInfo(vfio.DEVICE_FLAGS_RESET | vfio.DEVICE_FLAGS_PCI, 9, 5)

    def region_info(self, index: int) -> vfio.RegionInfo:
        rw = vfio.REGION_FLAG_READ | vfio.REGION_FLAG_WRITE
        return vfio.RegionInfo(index, rw if index == 0 else 0, BAR0 if index == 0 else 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self.bar0[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.bar0[offset : offset + len(data)] = data

    def irq_info(self, index: int) -> vfio.IrqInfo:
        return vfio.IrqInfo(index, 0, 0)

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        raise OSError(errno.EINVAL, "no interrupts")

    def dma_map(self, mapping: vfio.DmaMapping) -> None:
        if mapping.fd is not None:
            os.close(mapping.fd)

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        pass

    def reset(self) -> None:
        self.state = int(State.RUNNING)
        self.out, self.into = b"", bytearray()

    def device_feature(self, flags: int, data: bytes) -> bytes:
        feature = flags & vfio.DEVICE_FEATURE_MASK
        if feature == vfio.DEVICE_FEATURE_MIGRATION:
            return (1).to_bytes(8, "little")
        if feature != vfio.DEVICE_FEATURE_MIG_DEVICE_STATE:
            raise OSError(errno.ENOTTY, f"feature {feature} not offered")
        if flags & vfio.DEVICE_FEATURE_SET:
            new = int.from_bytes(data[:4], "little")
            self.requests.append(new)
            if (self.state, new) not in ARCS:
                raise OSError(errno.EINVAL, f"no single arc {self.state} -> {new}")
            if new == State.STOP_COPY:
                self.out = bytes(self.bar0)
            if self.state == State.RESUMING:
                if len(self.into) != BAR0:
                    raise OSError(errno.EINVAL, "incomplete state")
                self.bar0[:] = self.into
            if new == State.RESUMING:
                self.into = bytearray()
            self.state = new
        return self.state.to_bytes(4, "little") + bytes(4)

    def mig_data_read(self, size: int) -> bytes:
        if self.state != State.STOP_COPY:
            raise OSError(errno.EINVAL, "not saving")
        chunk, self.out = self.out[: min(size, 1000)], self.out[min(size, 1000) :]
        return chunk  # short reads long before the end

    def mig_data_write(self, data: bytes) -> None:
        if self.state != State.RESUMING:
            raise OSError(errno.EINVAL, "not resuming")
        self.into += data

    def connected(self, port: Any) -> None:
        pass

    def disconnected(self) -> None:
        pass

    async def run(self) -> None:
        return


@contextmanager
def served(device: StrictDevice, path: Path) -> Iterator[None]:
    """Serve ``device`` from a trio loop in a thread (the test is the blocking VMM)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceServer(device, path, name="strict", spin_us=0).serve)
            box["token"], box["scope"] = trio.lowlevel.current_trio_token(), nursery.cancel_scope
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,))
    thread.start()
    try:
        assert ready.wait(10)
        yield
    finally:
        trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(10)


@pytest.fixture
def strict_pair(tmp_path: Path) -> Iterator[tuple[StrictDevice, StrictDevice, Path, Path]]:
    a, b = StrictDevice(), StrictDevice()
    pa, pb = tmp_path / "a.sock", tmp_path / "b.sock"
    with served(a, pa), served(b, pb):
        yield a, b, pa, pb


def test_migrates_a_stop_copy_only_single_arc_device(
    strict_pair: tuple[StrictDevice, StrictDevice, Path, Path],
) -> None:
    a, b, pa, pb = strict_pair
    pattern = bytes((i * 7) & 0xFF for i in range(BAR0))
    with Endpoint(pa, MEM, name="a") as src, Endpoint(pb, MEM, name="b") as dst:
        assert src.dev.flags == 1 and src.dev.data_size() is None
        src.client.region_write(0, 0, pattern)
        src.mem.write(5 * PAGE_SIZE, b"vcpu")
        report, receiver = migrate_local(src, dst, None, options=Options(max_rounds=2))
        assert report.ok, report.error
        assert not report.dirty_logging
        # Without a dirty log every page goes again at stop-copy.
        assert report.pages_sent == 2 * MEM // PAGE_SIZE
        assert report.device_bytes == BAR0
        assert dst.client.region_read(0, 0, BAR0) == pattern
        assert dst.mem.read(5 * PAGE_SIZE, 4) == b"vcpu"
    assert a.state == State.STOP and b.state == State.RUNNING
    # Only single arcs were asked for, and none was refused.
    assert a.requests == [State.STOP, State.STOP_COPY, State.STOP]
    assert b.requests == [State.STOP, State.RESUMING, State.STOP, State.RUNNING]


def test_rollback_walks_single_arcs_back_to_running(
    strict_pair: tuple[StrictDevice, StrictDevice, Path, Path],
) -> None:
    a, b, pa, pb = strict_pair
    b.into = bytearray()
    with Endpoint(pa, MEM, name="a") as src, Endpoint(pb, MEM, name="b") as dst:
        src.client.region_write(0, 0, b"keep")
        # Sabotage the destination: it drops whatever it is sent.
        b.mig_data_write = lambda data: None  # type: ignore[method-assign]
        report, _ = migrate_local(src, dst, None)
        assert not report.ok and report.errno == errno.EINVAL and report.rolled_back
        assert a.state == State.RUNNING and b.state == State.RUNNING
        assert a.requests == [State.STOP, State.STOP_COPY, State.STOP, State.RUNNING]
        assert src.client.region_read(0, 0, 4) == b"keep"


def test_refused_mig_data_write_rolls_back(
    strict_pair: tuple[StrictDevice, StrictDevice, Path, Path],
) -> None:
    a, b, pa, pb = strict_pair

    def refuse(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "no room for the state")

    b.mig_data_write = refuse  # type: ignore[method-assign]
    with Endpoint(pa, MEM, name="a") as src, Endpoint(pb, MEM, name="b") as dst:
        report, receiver = migrate_local(src, dst, None)
        assert not report.ok and report.errno == errno.ENOSPC and report.rolled_back
        assert a.state == State.RUNNING
        assert b.state == State.RUNNING and receiver.error is not None  # reset, not half-loaded
        assert dst.dev.state() == State.RUNNING


# --- a device that DMAs into guest memory and logs it at its own page size ---------

DMA_KICK = 0x800  # BAR0 register: writing an IOVA makes the device DMA a stamp there
LOG_PAGE = 8192  # the device raises the 4 KiB the client asks for


class DmaDevice(StrictDevice):
    def __init__(self) -> None:
        super().__init__()
        self.maps: list[tuple[int, mmap.mmap]] = []
        self.dirty: set[int] | None = None
        self.stamps = 0

    def dma_map(self, mapping: vfio.DmaMapping) -> None:
        assert mapping.fd is not None
        try:
            self.maps.append((mapping.address, mmap.mmap(mapping.fd, mapping.size, offset=0)))
        finally:
            os.close(mapping.fd)

    def disconnected(self) -> None:
        for _, m in self.maps:
            m.close()
        self.maps.clear()

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if offset != DMA_KICK:
            return super().region_write(index, offset, data)
        iova = int.from_bytes(data, "little")
        base, m = self.maps[0]
        self.stamps += 1
        stamp = b"DMA" + self.stamps.to_bytes(4, "little")
        m[iova - base : iova - base + len(stamp)] = stamp
        if self.dirty is not None:
            self.dirty.add(iova // LOG_PAGE)

    def device_feature(self, flags: int, data: bytes) -> bytes:
        feature = flags & vfio.DEVICE_FEATURE_MASK
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_START:
            _size, nranges, _ = struct.unpack_from("<QII", data)
            self.dirty = set()
            return struct.pack("<QII", LOG_PAGE, nranges, 0) + data[16:]
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_STOP:
            self.dirty = None
            return b""
        if feature == vfio.DEVICE_FEATURE_DMA_LOGGING_REPORT:
            iova, length, page = struct.unpack_from("<QQQ", data)
            if self.dirty is None or page != LOG_PAGE:
                raise OSError(errno.EINVAL, "bad report")
            bits = 0
            for p in range(iova // page, (iova + length) // page):
                if p in self.dirty:
                    bits |= 1 << (p - iova // page)
                    self.dirty.discard(p)
            nbytes = ((length // page) + 63) // 64 * 8
            return data[:24] + bits.to_bytes(nbytes, "little")
        return super().device_feature(flags, data)


class DmaKicker:
    """A stand-in guest driver: each run asks the device for one DMA write."""

    name = "kick"

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.iovas: list[int] = []

    def run_for(self, seconds: float) -> None:
        iova = 0x10000 + len(self.iovas) * LOG_PAGE + 0x10
        self.dev.region_write(0, DMA_KICK, iova.to_bytes(8, "little"))
        self.iovas.append(iova)

    def quiesce(self) -> None: ...
    def resume(self) -> None: ...
    def save(self) -> bytes:
        return b""

    def stats(self) -> dict[str, int]:
        return {"dmas": len(self.iovas)}


@pytest.fixture
def dma_pair(tmp_path: Path) -> Iterator[tuple[DmaDevice, DmaDevice, Path, Path]]:
    a, b = DmaDevice(), DmaDevice()
    pa, pb = tmp_path / "a.sock", tmp_path / "b.sock"
    with served(a, pa), served(b, pb):
        yield a, b, pa, pb


def test_dirty_report_at_the_device_page_size(
    dma_pair: tuple[DmaDevice, DmaDevice, Path, Path],
) -> None:
    _, _, pa, _ = dma_pair
    with Endpoint(pa, MEM, name="a") as src:
        assert src.dev.logging_start([(0, MEM)])
        assert src.dev.logging is not None and src.dev.logging.page_size == LOG_PAGE
        for iova in (0x10, 0x6010, 0x3FFF0):
            src.client.region_write(0, DMA_KICK, iova.to_bytes(8, "little"))
        assert src.dev.logging_report(0x2000, 0x6000) == {0x6000}  # a slice only
        assert src.dev.logging_report(0, MEM) == {0x0, 0x3E000}  # the rest
        assert src.dev.logging_report(0, MEM) == set()  # REPORT cleared them
        src.dev.logging_stop()


def test_device_dma_during_precopy_reaches_the_destination(
    dma_pair: tuple[DmaDevice, DmaDevice, Path, Path],
) -> None:
    _, _, pa, pb = dma_pair
    with Endpoint(pa, MEM, name="a") as src, Endpoint(pb, MEM, name="b") as dst:
        kicker = DmaKicker(src.client)
        opts = Options(max_rounds=3, dirty_target=0)
        report, _ = migrate_local(src, dst, kicker, options=opts)  # type: ignore[arg-type]
        assert report.ok, report.error
        assert report.dirty_logging and report.rounds == 3
        # Round 1 sends all 64 pages; each DMA dirties one 8 KiB log page = 2 pages.
        assert len(kicker.iovas) == 2
        assert report.pages_sent == MEM // PAGE_SIZE + 2 * 2
        for n, iova in enumerate(kicker.iovas, start=1):
            assert dst.mem.read(iova, 7) == b"DMA" + n.to_bytes(4, "little")
