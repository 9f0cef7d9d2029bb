"""The host side of an NVMe controller over vfio-user: registers, queues, entries.

Written from the NVMe base specification (1.4), not from the emulation in
mdevcore.nvme, so that a layout mistake on either side shows up as a
failure instead of being shared.  BAR0 is reached with REGION_READ/WRITE;
queues live in a GuestMemory; submission entries are vCPU writes (so their
pages are tracked as the VMM's own dirty pages).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import time

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.vfio_user.client import Client

BAR0 = 0
REG_CAP, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x14, 0x1C, 0x24, 0x28, 0x30
DOORBELL_BASE = 0x1000
CC_EN = 1
CC_IOSQES_64 = 6 << 16
CC_IOCQES_16 = 4 << 20
CSTS_RDY, CSTS_CFS = 1, 2

ADMIN_CREATE_SQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY, ADMIN_SET_FEATURES = 0x01, 0x05, 0x06, 0x09
ADMIN_DOORBELL_BUFFER_CONFIG = 0x7C
OACS_DOORBELL_BUFFER_CONFIG = 1 << 8
IO_WRITE, IO_READ = 0x01, 0x02
FEATURE_NUMBER_OF_QUEUES = 0x07
SQE_SIZE, CQE_SIZE = 64, 16
PAGE = 4096

# opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
_SQE = struct.Struct("<BBHIIIQQQ6I")
# dw0, dw1, sq head, sq id, cid, status (bit 0: phase)
_CQE = struct.Struct("<IIHHHH")


def sqe(opcode: int, cid: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
        cdw10: int = 0, cdw11: int = 0, cdw12: int = 0) -> bytes:  # fmt: skip
    return _SQE.pack(opcode, 0, cid, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, 0, 0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Cqe:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # 15-bit status field (0: success)


class DeviceError(RuntimeError):
    """The controller did something a driver cannot continue from."""


@dataclasses.dataclass(slots=True)
class HostQueue:
    """One SQ/CQ pair as the driver tracks it (qid 0 is the admin pair)."""

    qid: int
    sq_addr: int
    cq_addr: int
    size: int
    vector: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1  # the phase value a new completion carries

    def to_list(self) -> list[int]:
        return [self.qid, self.sq_addr, self.cq_addr, self.size, self.vector,
                self.sq_tail, self.cq_head, self.phase]  # fmt: skip

    @classmethod
    def from_list(cls, raw: object, mem: GuestMemory, max_size: int) -> HostQueue:
        if not isinstance(raw, list) or len(raw) != 8 or not all(type(v) is int for v in raw):
            raise ValueError(f"bad queue record {raw!r}")
        q = cls(*raw)
        if not 2 <= q.size <= max_size or not 0 <= q.qid <= 0xFFFF or not 0 <= q.vector < 2048:
            raise ValueError(f"queue {q.qid}: size {q.size} / vector {q.vector} out of range")
        if not (0 <= q.sq_tail < q.size and 0 <= q.cq_head < q.size and q.phase in (0, 1)):
            raise ValueError(f"queue {q.qid}: positions out of range")
        for addr, length in ((q.sq_addr, q.size * SQE_SIZE), (q.cq_addr, q.size * CQE_SIZE)):
            if addr % PAGE or addr < mem.base or addr + length > mem.end:
                raise ValueError(f"queue {q.qid}: memory {addr:#x} outside guest memory")
        return q

    def submit(self, mem: GuestMemory, entry: bytes) -> None:
        """Write the entry at the tail (a vCPU store); the caller rings the doorbell."""
        mem.write(self.sq_addr + self.sq_tail * SQE_SIZE, entry)
        self.sq_tail = (self.sq_tail + 1) % self.size

    def next_cqe_addr(self) -> int:
        return self.cq_addr + self.cq_head * CQE_SIZE

    def pop(self, mem: GuestMemory) -> Cqe | None:
        """The completion at the head if the device has posted it (phase bit)."""
        addr = self.next_cqe_addr()
        # The device writes the status dword last: check it, then read the rest.
        (status,) = struct.unpack("<H", mem.read(addr + 14, 2))
        if status & 1 != self.phase:
            return None
        dw0, _dw1, sqhd, sqid, cid, status = _CQE.unpack(mem.read(addr, CQE_SIZE))
        self.cq_head += 1
        if self.cq_head == self.size:
            self.cq_head = 0
            self.phase ^= 1
        return Cqe(dw0, sqhd, sqid, cid, status >> 1)


class MappedDoorbells:
    """Doorbells in a mapped window of BAR0: each ring is one 32-bit store.

    The controller polls this memory while we write it, so a doorbell must
    change in a single store, as a guest's ``writel`` does.  struct.pack_into
    is not that: it clears the field and then writes it byte by byte, and a
    controller looking in between reads 0 - an SQ tail that re-runs stale
    entries, a CQ head that frees unread completions.  Under CPU load the
    writer is preempted in that window often enough to corrupt data (issue
    12's soak).  Item assignment on a memoryview cast to ``I`` is one
    aligned 4-byte store.
    """

    def __init__(self, fd: int, size: int, offset: int, start: int) -> None:
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
        self._words = memoryview(self._map).cast("I")
        self.start, self.end = start, start + size

    def covers(self, offset: int) -> bool:
        return self.start <= offset < self.end and offset % 4 == 0

    def store(self, offset: int, value: int) -> None:
        self._words[(offset - self.start) // 4] = value

    def close(self) -> None:
        self._words.release()
        self._map.close()


class Registers:
    """BAR0 of one controller, through a vfio-user client."""

    def __init__(self, dev: Client, *, mmap_doorbells: bool = True) -> None:
        self.dev = dev
        self.cap = self.read64(REG_CAP)
        self.stride = 4 << (self.cap >> 32 & 0xF)  # CAP.DSTRD
        self.mqes = (self.cap & 0xFFFF) + 1
        self.timeout = max(1, self.cap >> 24 & 0xFF) * 0.5  # CAP.TO, 500 ms units
        # Doorbells the server lets us mmap (a sparse area of BAR0), as QEMU
        # maps them: a store there reaches the device without a message.
        self._db_map: MappedDoorbells | None = None
        if mmap_doorbells:
            self._map_doorbells()

    def _map_doorbells(self) -> None:
        info = self.dev.region_info(BAR0).as_region_info()
        if info.fd is None:
            return
        try:
            for area in info.sparse_areas:
                if area.offset <= DOORBELL_BASE < area.offset + area.size:
                    self._db_map = MappedDoorbells(
                        info.fd, area.size, info.fd_offset + area.offset, area.offset
                    )
                    break
        finally:
            os.close(info.fd)

    @property
    def doorbells_mapped(self) -> bool:
        return self._db_map is not None

    def close(self) -> None:
        if self._db_map is not None:
            self._db_map.close()
            self._db_map = None

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.dev.region_read(BAR0, offset, 4), "little")

    def read64(self, offset: int) -> int:
        return int.from_bytes(self.dev.region_read(BAR0, offset, 8), "little")

    def write32(self, offset: int, value: int) -> None:
        self.dev.region_write(BAR0, offset, value.to_bytes(4, "little"))

    def write64(self, offset: int, value: int) -> None:
        self.dev.region_write(BAR0, offset, value.to_bytes(8, "little"))

    def doorbell(self, qid: int, is_cq: bool) -> int:
        return DOORBELL_BASE + (2 * qid + int(is_cq)) * self.stride

    def ring(self, qid: int, is_cq: bool, value: int) -> None:
        offset = self.doorbell(qid, is_cq)
        if self._db_map is not None and self._db_map.covers(offset):
            self._db_map.store(offset, value)
            return
        # Posted, as an MMIO write is: no reply to wait for.  The socket
        # keeps it ordered before whatever the client sends next.
        self.dev.region_write(BAR0, offset, value.to_bytes(4, "little"), no_reply=True)

    def wait_ready(self, ready: bool) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            csts = self.read32(REG_CSTS)
            if csts & CSTS_CFS:
                raise DeviceError(f"controller fatal status (CSTS {csts:#x})")
            if bool(csts & CSTS_RDY) == ready:
                return
            if time.monotonic() > deadline:
                raise DeviceError(f"CSTS.RDY did not become {int(ready)} within CAP.TO")
            time.sleep(0.001)

    def enable(self, admin: HostQueue) -> None:
        """Controller reset, admin queues, CC.EN=1 (NVMe 1.4, 7.6.1)."""
        self.write32(REG_CC, 0)
        self.wait_ready(False)
        self.write32(REG_AQA, (admin.size - 1) << 16 | (admin.size - 1))
        self.write64(REG_ASQ, admin.sq_addr)
        self.write64(REG_ACQ, admin.cq_addr)
        self.write32(REG_CC, CC_EN | CC_IOSQES_64 | CC_IOCQES_16)  # MPS 0: 4 KiB pages
        self.wait_ready(True)


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Shadow doorbells: did the move old -> new pass the controller's EventIdx?

    16-bit wrap-around arithmetic, as the NVMe 1.3 Doorbell Buffer Config
    convention (and Linux's nvme_dbbuf_need_event) has it.
    """
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF
