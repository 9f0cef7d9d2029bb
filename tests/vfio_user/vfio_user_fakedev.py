"""A small but real DeviceBackend for the vfio-user tests.

Real storage behind every region (BAR1 is a memfd the client can mmap),
real eventfds for IRQs, a real DMA table (fd-backed maps are mmapped,
fd-less ones go through the DmaPort as messages).  BAR0 has a DMA engine:
writing a guest address to DMA_DOORBELL makes ``run()`` read 16 bytes there
and write them back reversed at address + 16 (through the mapping or by
DMA_READ/DMA_WRITE messages), then count DMA_DONE up.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence

import trio

from mdevcore.vfio_user.backend import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MASK,
    DEVICE_FEATURE_MIG_DEVICE_STATE,
    DEVICE_FEATURE_MIGRATION,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    DMA_UNMAP_FLAG_ALL,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    DeviceInfo,
    DmaMapping,
    DmaPort,
    IrqInfo,
    RegionInfo,
    SparseArea,
)

BAR0_SIZE = 0x1000
BAR1_SIZE = 0x4000
CONFIG_SIZE = 256
SPECIAL_REGION = 9
SPECIAL_SIZE = 64
SPECIAL_TYPE = (0x8086 | 1 << 31, 3)
NUM_REGIONS = 10

DMA_DOORBELL = 0xF00  # write an 8-byte guest address here
DMA_DONE = 0xF08  # 8-byte count of finished DMA jobs
DMA_ERRORS = 0xF10  # 8-byte count of failed DMA jobs
BUGGY_OFFSET = 0xFF0  # reading here raises a non-OSError (device bug)

RW = REGION_FLAG_READ | REGION_FLAG_WRITE
MAX_DMA_MAPS = 64
IRQ_COUNTS = {0: 1, 1: 1, 2: 4, 3: 1, 4: 1}
MIG_STATE_RUNNING = 2


def initial_config() -> bytearray:
    cfg = bytearray(CONFIG_SIZE)
    cfg[0:4] = (0x1234 | 0x11E8 << 16).to_bytes(4, "little")  # vendor, device
    cfg[0x08:0x0C] = (0xFF000001).to_bytes(4, "little")  # class ff0000, rev 1
    cfg[0x3D] = 1  # INTA
    return cfg


class _Mapping:
    def __init__(self, m: DmaMapping) -> None:
        self.address = m.address
        self.size = m.size
        self.mm: mmap.mmap | None = None
        if m.fd is not None:
            # mmap needs a page-aligned offset; map from the aligned start.
            skew = m.offset % mmap.ALLOCATIONGRANULARITY
            try:
                self.mm = mmap.mmap(m.fd, m.size + skew, mmap.MAP_SHARED, offset=m.offset - skew)
            except (ValueError, OverflowError) as e:
                raise OSError(errno.EINVAL, f"cannot map: {e}") from None
            self.skew = skew

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()


class FakeDevice:
    """DeviceBackend with real storage, eventfds and DMA."""

    def __init__(self) -> None:
        self.bar0 = bytearray(BAR0_SIZE)
        self.bar1_fd = os.memfd_create("fakedev-bar1")
        os.ftruncate(self.bar1_fd, BAR1_SIZE)
        self.bar1 = mmap.mmap(self.bar1_fd, BAR1_SIZE, mmap.MAP_SHARED)
        self.config = initial_config()
        self.special = bytearray(SPECIAL_SIZE)
        self.irq_fds: dict[tuple[int, int], int] = {}
        self.irq_masked: set[tuple[int, int]] = set()
        self.dma: list[_Mapping] = []
        self.port: DmaPort | None = None
        self.resets = 0
        self.connects = 0
        self.disconnects = 0
        self.mig_state = MIG_STATE_RUNNING
        self.mig_out = bytearray()
        self.mig_in = bytearray()
        self._jobs_send, self._jobs_recv = trio.open_memory_channel[int](64)

    def close(self) -> None:
        self._drop_client_resources()
        self.bar1.close()
        os.close(self.bar1_fd)

    # --- description ------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI, NUM_REGIONS, len(IRQ_COUNTS))

    def region_info(self, index: int) -> RegionInfo:
        if index == 0:
            return RegionInfo(0, RW, BAR0_SIZE)
        if index == 1:
            return RegionInfo(
                1,
                RW | REGION_FLAG_MMAP,
                BAR1_SIZE,
                fd=self.bar1_fd,
                sparse_areas=(SparseArea(0, 0x1000), SparseArea(0x2000, 0x2000)),
            )
        if 2 <= index <= 6 or index == 8:
            return RegionInfo(index, 0, 0)
        if index == 7:
            return RegionInfo(7, RW, CONFIG_SIZE)
        if index == SPECIAL_REGION:
            return RegionInfo(index, RW, SPECIAL_SIZE, type_cap=SPECIAL_TYPE)
        raise OSError(errno.EINVAL, f"no region {index}")

    def _storage(self, index: int, offset: int, count: int) -> bytearray | mmap.mmap:
        store: bytearray | mmap.mmap
        if index == 0:
            store = self.bar0
        elif index == 1:
            store = self.bar1
        elif index == 7:
            store = self.config
        elif index == SPECIAL_REGION:
            store = self.special
        else:
            raise OSError(errno.EINVAL, f"region {index} has no storage")
        if offset < 0 or count < 0 or offset + count > len(store):
            raise OSError(errno.EINVAL, f"access {offset:#x}+{count} past region {index}")
        return store

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        store = self._storage(index, offset, count)
        if index == 0 and offset == BUGGY_OFFSET:
            raise ZeroDivisionError("simulated device bug")
        return bytes(store[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        store = self._storage(index, offset, len(data))
        store[offset : offset + len(data)] = data
        if index == 0 and offset == DMA_DOORBELL and len(data) == 8:
            self._queue_job(int.from_bytes(data, "little"))

    def _queue_job(self, address: int) -> None:
        try:
            self._jobs_send.send_nowait(address)
        except trio.WouldBlock:
            raise OSError(errno.EBUSY, "DMA queue full") from None

    # --- IRQs ---------------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        if index not in IRQ_COUNTS:
            raise OSError(errno.EINVAL, f"no IRQ index {index}")
        flags = IRQ_INFO_EVENTFD
        if index == 0:
            flags |= IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        else:
            flags |= IRQ_INFO_NORESIZE
        return IrqInfo(index, flags, IRQ_COUNTS[index])

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, data: bytes, fds: Sequence[int]
    ) -> None:
        vectors = range(start, start + count)
        if flags & IRQ_SET_ACTION_TRIGGER:
            if flags & IRQ_SET_DATA_EVENTFD:
                for i, v in enumerate(vectors):
                    self._set_eventfd(index, v, fds[i] if fds else None)
            elif flags & IRQ_SET_DATA_NONE and count == 0:
                for v in range(IRQ_COUNTS[index]):
                    self._set_eventfd(index, v, None)
            else:
                for i, v in enumerate(vectors):
                    if flags & IRQ_SET_DATA_NONE or data[i]:
                        self.trigger(index, v)
        elif flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK):
            if flags & IRQ_SET_DATA_EVENTFD:
                raise OSError(errno.ENOTTY, "mask/unmask eventfds not supported")
            for i, v in enumerate(vectors):
                if flags & IRQ_SET_DATA_BOOL and not data[i]:
                    continue
                if flags & IRQ_SET_ACTION_MASK:
                    self.irq_masked.add((index, v))
                else:
                    self.irq_masked.discard((index, v))

    def _set_eventfd(self, index: int, vector: int, fd: int | None) -> None:
        old = self.irq_fds.pop((index, vector), None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.irq_fds[(index, vector)] = os.dup(fd)  # the engine closes its copy

    def trigger(self, index: int, vector: int = 0) -> bool:
        fd = self.irq_fds.get((index, vector))
        if fd is None or (index, vector) in self.irq_masked:
            return False
        os.eventfd_write(fd, 1)
        if index == 0:
            self.irq_masked.add((0, 0))  # INTx auto-masks
        return True

    # --- DMA ------------------------------------------------------------

    def dma_map(self, mapping: DmaMapping) -> None:
        end = mapping.address + mapping.size
        if len(self.dma) >= MAX_DMA_MAPS:
            raise OSError(errno.ENOSPC, "too many DMA mappings")
        if mapping.fd is not None:
            # Touching a mapping past the end of its file is SIGBUS: check first.
            try:
                file_size = os.fstat(mapping.fd).st_size
            except OSError as e:
                raise OSError(errno.EINVAL, f"DMA fd unusable: {e}") from None
            if mapping.offset + mapping.size > file_size:
                raise OSError(errno.EINVAL, "DMA mapping extends past its file")
        for m in self.dma:
            if mapping.address < m.address + m.size and m.address < end:
                raise OSError(errno.EEXIST, "overlapping DMA mapping")
        self.dma.append(_Mapping(mapping))

    def dma_unmap(self, address: int, size: int, flags: int) -> None:
        if flags & DMA_UNMAP_FLAG_ALL:
            for m in self.dma:
                m.close()
            self.dma.clear()
            return
        for m in self.dma:
            if m.address == address and m.size == size:
                m.close()
                self.dma.remove(m)
                return
        raise OSError(errno.ENOENT, "no such DMA mapping")

    def _find(self, address: int, count: int) -> _Mapping:
        for m in self.dma:
            if m.address <= address and address + count <= m.address + m.size:
                return m
        raise OSError(errno.EFAULT, f"{address:#x}+{count} not mapped")

    async def guest_read(self, address: int, count: int) -> bytes:
        m = self._find(address, count)
        if m.mm is not None:
            off = m.skew + address - m.address
            return bytes(m.mm[off : off + count])
        if self.port is None:
            raise OSError(errno.ENOTCONN, "no client")
        return await self.port.dma_read(address, count)

    async def guest_write(self, address: int, data: bytes) -> None:
        m = self._find(address, len(data))
        if m.mm is not None:
            off = m.skew + address - m.address
            m.mm[off : off + len(data)] = data
            return
        if self.port is None:
            raise OSError(errno.ENOTCONN, "no client")
        await self.port.dma_write(address, data)

    # --- lifecycle ------------------------------------------------------

    def reset(self) -> None:
        self.resets += 1
        self.bar0[:] = bytes(BAR0_SIZE)
        self.config[:] = initial_config()
        self.irq_masked.clear()
        self.mig_state = MIG_STATE_RUNNING

    def device_feature(self, flags: int, data: bytes) -> bytes:
        feature = flags & DEVICE_FEATURE_MASK
        if feature == DEVICE_FEATURE_MIGRATION:
            if flags & DEVICE_FEATURE_SET:
                raise OSError(errno.EINVAL, "MIGRATION is GET only")
            return b"" if flags & DEVICE_FEATURE_PROBE else (1).to_bytes(8, "little")
        if feature == DEVICE_FEATURE_MIG_DEVICE_STATE:
            if flags & DEVICE_FEATURE_PROBE:
                return b""
            if flags & DEVICE_FEATURE_SET:
                if len(data) < 8:
                    raise OSError(errno.EINVAL, "short MIG_DEVICE_STATE")
                self.mig_state = int.from_bytes(data[:4], "little")
                if self.mig_state == 3:  # STOP_COPY: snapshot BAR0
                    self.mig_out = bytearray(self.bar0)
            elif not flags & DEVICE_FEATURE_GET:
                raise OSError(errno.EINVAL, "neither GET nor SET")
            return self.mig_state.to_bytes(4, "little") + bytes(4)
        raise OSError(errno.ENOTTY, f"feature {feature} not offered")

    def mig_data_read(self, size: int) -> bytes:
        out = bytes(self.mig_out[:size])
        del self.mig_out[:size]
        return out

    def mig_data_write(self, data: bytes) -> None:
        self.mig_in += data

    def connected(self, port: DmaPort) -> None:
        self.connects += 1
        self.port = port

    def disconnected(self) -> None:
        self.disconnects += 1
        self.port = None
        self._drop_client_resources()

    def _drop_client_resources(self) -> None:
        for m in self.dma:
            m.close()
        self.dma.clear()
        for fd in self.irq_fds.values():
            os.close(fd)
        self.irq_fds.clear()

    async def run(self) -> None:
        async for address in self._jobs_recv:
            try:
                data = await self.guest_read(address, 16)
                await self.guest_write(address + 16, data[::-1])
            except OSError:
                counter = DMA_ERRORS
            else:
                counter = DMA_DONE
            n = int.from_bytes(self.bar0[counter : counter + 8], "little") + 1
            self.bar0[counter : counter + 8] = n.to_bytes(8, "little")


class ThreadFakeDevice(FakeDevice):
    """FakeDevice that a connection thread may serve (the threading rule).

    Build it in the trio thread: the doorbell hands jobs to ``run`` with
    the trio token's ``run_sync_soon`` instead of touching the channel from
    the connection thread.
    """

    serve_in_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.device_lock = threading.RLock()
        self._token = trio.lowlevel.current_trio_token()
        self.hook_threads: set[int] = set()  # threads region_write ran on

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        assert self.device_lock._is_owned()  # type: ignore[attr-defined]
        self.hook_threads.add(threading.get_ident())
        super().region_write(index, offset, data)

    def _queue_job(self, address: int) -> None:
        self._token.run_sync_soon(self._jobs_send.send_nowait, address)
