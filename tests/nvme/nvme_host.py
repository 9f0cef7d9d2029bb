"""Test-side pieces: guest memory (a real memfd mapping) and a tiny NVMe host driver.

The host driver writes SQEs into guest memory, rings doorbells through
``mmio_write`` (or directly into shared doorbell memory), runs the
controller and reads CQEs back with the phase bit, as a real driver would.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from mdevcore.nvme import NvmeController
from mdevcore.nvme.queues import Command, Completion, make_command
from mdevcore.nvme.spec import (
    CC_EN,
    DOORBELL_BASE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    AdminOpcode,
)

if TYPE_CHECKING:
    from mdevcore.parents.pds.vf import PdsNvmeVf

PAGE = 4096
NS_SIZE = 1 << 20  # the fixture namespace: 2048 blocks of 512 bytes


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class GuestMemory:
    """``size`` bytes of memfd mapped at IOVA ``base``; everything else faults.

    ``hole`` (offset, length) inside the range is treated as unmapped too, so
    tests can aim PRPs at the gap between two DMA mappings.
    """

    def __init__(self, size: int = 8 << 20, base: int = 0x100000) -> None:
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.base = base
        self.size = size
        self.holes: list[tuple[int, int]] = []
        self._next = base
        self.write_attempts_outside = 0

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        if length < 0 or iova < self.base or iova + length > self.base + self.size:
            raise OSError(errno.EFAULT, f"{iova:#x}+{length:#x} not mapped")
        for start, hole_len in self.holes:
            if iova < start + hole_len and iova + length > start:
                raise OSError(errno.EFAULT, f"{iova:#x}+{length:#x} hits an unmapped gap")
        offset = iova - self.base
        if write:
            self.mark_dirty(iova, length)  # as the DmaTable does (the DmaSpace contract)
        return memoryview(self.mm)[offset : offset + length]

    def mark_dirty(self, iova: int, length: int) -> None:
        """Tests replace this to see what the controller wrote."""

    def alloc(self, size: int, align: int = PAGE) -> int:
        addr = -(-self._next // align) * align
        self._next = addr + size
        assert self._next <= self.base + self.size, "test guest memory exhausted"
        return addr

    def read(self, iova: int, length: int) -> bytes:
        off = iova - self.base
        return self.mm[off : off + length]

    def write(self, iova: int, data: bytes) -> None:
        off = iova - self.base
        self.mm[off : off + len(data)] = data

    def close(self) -> None:
        # mmap.close raises BufferError if the controller leaked a view.
        self.mm.close()
        os.close(self.fd)


class HostQueue:
    def __init__(self, mem: GuestMemory, qid: int, size: int) -> None:
        self.qid = qid
        self.size = size
        self.sq = mem.alloc(size * 64)
        self.cq = mem.alloc(size * 16)
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1


class Host:
    """Drives a controller the way an NVMe driver would."""

    def __init__(
        self,
        ctrl: NvmeController,
        mem: GuestMemory,
        shared_doorbells: memoryview | None = None,
    ) -> None:
        self.ctrl = ctrl
        self.mem = mem
        self.queues: dict[int, HostQueue] = {}
        self.shared = shared_doorbells.cast("B").cast("I") if shared_doorbells is not None else None
        self._cid = 0
        self.wait_rounds = 1  # run()/reap() rounds before giving up on a completion

    # registers
    def write32(self, offset: int, value: int) -> None:
        self.ctrl.mmio_write(offset, struct.pack("<I", value))

    def write64(self, offset: int, value: int) -> None:
        self.ctrl.mmio_write(offset, struct.pack("<Q", value))

    def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.ctrl.mmio_read(offset, 4))[0])

    def read64(self, offset: int) -> int:
        return int(struct.unpack("<Q", self.ctrl.mmio_read(offset, 8))[0])

    def enable(self, size: int = 16, cc_extra: int = 6 << 16 | 4 << 20) -> None:
        q = self.queues[0] = HostQueue(self.mem, 0, size)
        self.write32(REG_AQA, (size - 1) << 16 | (size - 1))
        self.write64(REG_ASQ, q.sq)
        self.write64(REG_ACQ, q.cq)
        self.write32(REG_CC, CC_EN | cc_extra)

    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    def ring(self, index: int, value: int) -> None:
        if self.shared is not None:
            self.shared[index] = value
        else:
            self.ctrl.mmio_write(DOORBELL_BASE + 4 * index, struct.pack("<I", value))

    def submit(self, qid: int, cmd: Command, ring: bool = True) -> Command:
        q = self.queues[qid]
        if cmd.cid == 0:
            cmd = cmd._replace(cid=self.next_cid())
        self.mem.write(q.sq + q.sq_tail * 64, cmd.encode())
        q.sq_tail = (q.sq_tail + 1) % q.size
        if ring:
            self.ring(2 * qid, q.sq_tail)
        return cmd

    def reap(self, qid: int, ring: bool = True) -> list[Completion]:
        q = self.queues[qid]
        out = []
        while True:
            cqe = Completion.decode(self.mem.read(q.cq + q.cq_head * 16, 16))
            if cqe.phase != q.phase:
                break
            out.append(cqe)
            q.cq_head += 1
            if q.cq_head == q.size:
                q.cq_head = 0
                q.phase ^= 1
        if out and ring:
            self.ring(2 * qid + 1, q.cq_head)
        return out

    def run(self) -> None:
        while self.ctrl.process():
            pass

    def command(self, qid: int, cmd: Command) -> Completion:
        sent = self.submit(qid, cmd)
        done: list[Completion] = []
        for _ in range(self.wait_rounds):
            self.run()
            done = self.reap(qid)
            if done:
                break
        assert len(done) == 1, done
        assert done[0].cid == sent.cid
        return done[0]

    def admin(self, opcode: int, **fields: int) -> Completion:
        return self.command(0, make_command(opcode, **fields))

    def create_io_queue_pair(
        self, qid: int, size: int = 16, vector: int | None = None, ien: bool = True
    ) -> None:
        q = HostQueue(self.mem, qid, size)
        iv = qid if vector is None else vector
        cqe = self.admin(
            AdminOpcode.CREATE_IO_CQ,
            prp1=q.cq,
            cdw10=(size - 1) << 16 | qid,
            cdw11=iv << 16 | (2 if ien else 0) | 1,
        )
        assert cqe.status == 0, hex(cqe.status)
        cqe = self.admin(
            AdminOpcode.CREATE_IO_SQ, prp1=q.sq, cdw10=(size - 1) << 16 | qid, cdw11=qid << 16 | 1
        )
        assert cqe.status == 0, hex(cqe.status)
        self.queues[qid] = q


def status(sct: int, sc: int, dnr: bool = True) -> int:
    return sc | sct << 8 | (0x4000 if dnr else 0)


IrqLog = list[int]
Clock = Callable[[], float]


class VfHost(Host):
    """A Host that reaches the controller through a PdsNvmeVf's BAR0 handlers,
    as the vfio-user server would for trapped accesses."""

    def __init__(self, vf: PdsNvmeVf, mem: GuestMemory) -> None:
        super().__init__(vf.controller, mem)
        self.vf = vf

    def write32(self, offset: int, value: int) -> None:
        self.vf.region_write(0, offset, struct.pack("<I", value))

    def write64(self, offset: int, value: int) -> None:
        self.vf.region_write(0, offset, struct.pack("<Q", value))

    def read32(self, offset: int) -> int:
        return int(struct.unpack("<I", self.vf.region_read(0, offset, 4))[0])

    def ring(self, index: int, value: int) -> None:
        self.vf.region_write(0, DOORBELL_BASE + 4 * index, struct.pack("<I", value))
