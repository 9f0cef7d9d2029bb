"""The pds NVMe VF served over a real vfio-user socket, driven like a guest would.

A blocking vfio-user client (in a worker thread) maps a memfd as guest
memory, enables MSI-X with eventfds and runs an NVMe host driver through
REGION_READ/WRITE on BAR0 (or, in mmap mode, through the mmapped doorbell
page).  The device's run() task executes the commands.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from nvme_host import PAGE, GuestMemory, Host, VfHost

from mdevcore.nvme import NvmeController
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import CSTS_RDY, REG_CSTS, AdminOpcode, IoOpcode
from mdevcore.parents.pds.vf import PDS_NVME_VF_DEVICE_ID, DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.pci import caps
from mdevcore.vfio_user.backend import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PCI_CONFIG_REGION_INDEX,
    PCI_MSIX_IRQ_INDEX,
    REGION_FLAG_MMAP,
)
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.server import DeviceServer

NS_BYTES = 8 << 20


class RemoteHost(Host):
    """The test Host, with registers reached over vfio-user instead of in-process."""

    def __init__(
        self, client: Client, mem: GuestMemory, irq_fds: list[int], shared: memoryview | None
    ) -> None:
        super().__init__(NvmeController.__new__(NvmeController), mem, shared)
        self.client = client
        self.irq_fds = irq_fds
        self.wait_rounds = 2000
        self.interrupts = 0

    def write32(self, offset: int, value: int) -> None:
        self.client.region_write(0, offset, struct.pack("<I", value))

    def write64(self, offset: int, value: int) -> None:
        self.client.region_write(0, offset, struct.pack("<Q", value))

    def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.client.region_read(0, offset, 4))[0])

    def read64(self, offset: int) -> int:
        return int(struct.unpack("<Q", self.client.region_read(0, offset, 8))[0])

    def ring(self, index: int, value: int) -> None:
        if self.shared is not None:
            self.shared[index] = value
        else:
            self.client.region_write(0, 0x1000 + 4 * index, struct.pack("<I", value))

    def run(self) -> None:
        # Wait (briefly) for any interrupt; completions are then read from memory.
        ready, _, _ = select.select(self.irq_fds, [], [], 0.005)
        for fd in ready:
            self.interrupts += os.eventfd_read(fd)


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pds-")  # short: UNIX socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def serve_vf(workdir: str, mode: DoorbellMode) -> AsyncIterator[tuple[PdsNvmeVf, str]]:
    vf = PdsNvmeVf(
        VfConfig(
            backing=os.path.join(workdir, "vf.img"), size=NS_BYTES, doorbells=mode, io_queues=4
        )
    )
    path = os.path.join(workdir, "vf.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceServer(vf, path, name="pds-vf").serve)
            yield vf, path
            nursery.cancel_scope.cancel()
    finally:
        vf.close()


def find_capability(client: Client, cap_id: int) -> int:
    ptr = client.region_read(PCI_CONFIG_REGION_INDEX, 0x34, 1)[0]
    while ptr:
        cid, nxt = client.region_read(PCI_CONFIG_REGION_INDEX, ptr, 2)
        if cid == cap_id:
            return ptr
        ptr = nxt
    raise AssertionError(f"capability {cap_id:#x} missing")


def guest_session(path: str, backing: Path, mode: DoorbellMode) -> dict[str, object]:
    """Everything a guest driver does, from config space to verified I/O."""
    result: dict[str, object] = {}
    mem = GuestMemory(size=4 << 20)
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    doorbell_map: mmap.mmap | None = None
    with Client(path) as client:
        client.negotiate()
        cfg = client.region_read(PCI_CONFIG_REGION_INDEX, 0, 64)
        result["ids"] = struct.unpack_from("<HH", cfg, 0)
        result["class"] = int.from_bytes(cfg[9:12], "little")
        result["caps"] = [
            find_capability(client, c) > 0
            for c in (caps.CAP_ID_PM, caps.CAP_ID_MSI, caps.CAP_ID_MSIX, caps.CAP_ID_EXP)
        ]
        bar0 = client.region_info(0)
        result["bar0"] = (bar0.size, bool(bar0.flags & REGION_FLAG_MMAP))
        shared = None
        if mode is DoorbellMode.MMAP:
            assert bar0.fd is not None
            doorbell_map = mmap.mmap(bar0.fd, PAGE, offset=bar0.offset + 0x1000)
            os.close(bar0.fd)
            shared = memoryview(doorbell_map)
        client.dma_map(mem.base, mem.size, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, fd=mem.fd)
        # MSI-X on, one eventfd per vector in use
        msix = find_capability(client, caps.CAP_ID_MSIX)
        ctl = int.from_bytes(client.region_read(PCI_CONFIG_REGION_INDEX, msix + 2, 2), "little")
        client.region_write(
            PCI_CONFIG_REGION_INDEX, msix + 2, (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little")
        )
        client.set_irqs(
            PCI_MSIX_IRQ_INDEX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 3, fds=efds
        )

        host = RemoteHost(client, mem, efds, shared)
        host.enable()
        for _ in range(1000):
            if host.read32(REG_CSTS) & CSTS_RDY:
                break
        result["ready"] = bool(host.read32(REG_CSTS) & CSTS_RDY)
        ident = mem.alloc(PAGE)
        result["identify"] = host.admin(AdminOpcode.IDENTIFY, prp1=ident, cdw10=1).status
        result["model"] = mem.read(ident + 24, 40).rstrip()
        nsbuf = mem.alloc(PAGE)
        host.admin(AdminOpcode.IDENTIFY, nsid=1, prp1=nsbuf, cdw10=0)
        result["nsze"] = struct.unpack("<Q", mem.read(nsbuf, 8))[0]
        host.create_io_queue_pair(1, size=32, vector=1)
        host.create_io_queue_pair(2, size=32, vector=2)
        statuses = []
        data = {}
        for qid, slba in ((1, 0), (2, 4096), (1, NS_BYTES // 512 - 8)):
            buf = mem.alloc(PAGE)
            data[slba] = os.urandom(PAGE)
            mem.write(buf, data[slba])
            cmd = make_command(IoOpcode.WRITE, nsid=1, prp1=buf, cdw10=slba, cdw12=7)
            statuses.append(host.command(qid, cmd).status)
        statuses.append(host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status)
        readback = {}
        for slba in data:
            buf = mem.alloc(PAGE)
            statuses.append(
                host.command(
                    2, make_command(IoOpcode.READ, nsid=1, prp1=buf, cdw10=slba, cdw12=7)
                ).status
            )
            readback[slba] = mem.read(buf, PAGE)
        result["statuses"] = statuses
        result["readback_ok"] = readback == data
        with open(backing, "rb") as f:
            result["file_ok"] = all(
                (f.seek(slba * 512), f.read(PAGE))[1] == blob for slba, blob in data.items()
            )
        result["interrupts"] = host.interrupts
        client.reset()
        result["ready_after_reset"] = bool(host.read32(REG_CSTS) & CSTS_RDY)
        if shared is not None:
            host.shared.release()  # type: ignore[union-attr]
            shared.release()
    if doorbell_map is not None:
        doorbell_map.close()
    for fd in efds:
        os.close(fd)
    mem.close()
    return result


@pytest.mark.parametrize("mode", [DoorbellMode.TRAPPED, DoorbellMode.MMAP])
async def test_vf_end_to_end(workdir: str, mode: DoorbellMode) -> None:
    async with serve_vf(workdir, mode) as (vf, path):
        result = await trio.to_thread.run_sync(guest_session, path, Path(workdir) / "vf.img", mode)
        assert result["ids"] == (0x1DD8, PDS_NVME_VF_DEVICE_ID)
        assert result["class"] == 0x010802
        assert result["caps"] == [True, True, True, True]
        assert result["bar0"] == (0x4000, mode is DoorbellMode.MMAP)
        assert result["ready"] is True
        assert result["identify"] == 0
        assert result["model"] == b"Pensando NVMe VF (mdevcore)"
        assert result["nsze"] == NS_BYTES // 512
        assert result["statuses"] == [0] * 7
        assert result["readback_ok"] is True
        assert result["file_ok"] is True
        assert isinstance(result["interrupts"], int) and result["interrupts"] > 0
        assert result["ready_after_reset"] is False
        assert not vf.controller.sqs


async def test_coalesced_interrupt_fires_from_the_run_task(workdir: str) -> None:
    """Below the aggregation threshold, the run() task's timer delivers the interrupt."""
    from mdevcore.vfio_user.backend import DmaMapping

    mem = GuestMemory(size=1 << 20)
    vf = PdsNvmeVf(VfConfig(backing=os.path.join(workdir, "c.img"), size=NS_BYTES, io_queues=2))
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    try:
        rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
        vf.dma_map(DmaMapping(address=mem.base, size=mem.size, flags=rw, fd=mem.fd, offset=0))
        msix = vf.msix
        assert msix is not None
        ctl = vf.config.get_u16(msix.offset + caps.MSIX_FLAGS)
        vf.region_write(
            PCI_CONFIG_REGION_INDEX,
            msix.offset + caps.MSIX_FLAGS,
            (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little"),
        )
        vf.set_irqs(
            PCI_MSIX_IRQ_INDEX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 2, b"", efds
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vf.run)
            host = VfHost(vf, mem)
            host.enable()
            for _ in range(100):
                if vf.controller.ready:
                    break
                await trio.sleep(0)
            host.create_io_queue_pair(1, vector=1)
            # 8 entries or 5 ms: one completion stays below the threshold
            cqe = host.admin(AdminOpcode.SET_FEATURES, cdw10=0x08, cdw11=50 << 8 | 7)
            assert cqe.status == 0
            while True:  # drain vector 1 so only the coming completion counts
                try:
                    os.eventfd_read(efds[1])
                except BlockingIOError:
                    break
            await trio.testing.wait_all_tasks_blocked()  # run() is idle, waiting
            host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))  # served inside bar_write
            with trio.fail_after(10):  # a hang guard, not a timing assertion
                await trio.lowlevel.wait_readable(efds[1])
            assert os.eventfd_read(efds[1]) == 1
            assert len(host.reap(1)) == 1
            nursery.cancel_scope.cancel()
    finally:
        vf.close()
        for fd in efds:
            os.close(fd)
        mem.close()


@pytest.mark.parametrize("mode", [DoorbellMode.TRAPPED, DoorbellMode.MMAP])
@pytest.mark.parametrize(
    "bad",
    [
        {"io_queues": 600},  # its MSI-X table would overlap the PBA
        {"queue_entries": 70000},  # beyond CAP.MQES: the controller refuses
    ],
)
def test_failed_vf_construction_leaks_no_fds(
    tmp_path: Path, mode: DoorbellMode, bad: dict[str, int]
) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    config = VfConfig(backing=tmp_path / "vf.img", size=1 << 20, doorbells=mode, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PdsNvmeVf(config)
    assert open_fds() == before


def test_vf_doorbells_up_to_the_end_of_bar0_report_missing_queues(workdir: str) -> None:
    """BAR0 is 16 KiB: its last 8 KiB are doorbells of queue ids 512 and up."""
    from mdevcore.vfio_user.backend import DmaMapping

    mem = GuestMemory(size=1 << 20)
    vf = PdsNvmeVf(VfConfig(backing=os.path.join(workdir, "d.img"), size=NS_BYTES, io_queues=2))
    try:
        rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
        vf.dma_map(DmaMapping(address=mem.base, size=mem.size, flags=rw, fd=mem.fd, offset=0))
        host = VfHost(vf, mem)
        host.enable()
        aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
        host.run()
        vf.region_write(0, 0x3FFC, struct.pack("<I", 7))  # CQ 1535's head doorbell
        host.run()
        done = host.reap(0)
        assert [(c.cid, c.dw0) for c in done] == [(aer.cid, 0x010000)]  # invalid register
        assert vf.region_read(0, 0x3FFC, 4) == bytes(4)  # doorbells are write-only
    finally:
        vf.close()
        mem.close()
