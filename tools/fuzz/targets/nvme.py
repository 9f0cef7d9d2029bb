"""NVMe admin and I/O commands against an enabled controller with guest memory.

State before the input: a controller (mdevcore.nvme) enabled by a host the
way a driver does (admin queue, one I/O queue pair, qid 1), over a real
DmaTable holding two mappings of one memfd with an unmapped page between
them and unmapped guard pages around them.

Input: records, each one opcode byte then its operands:
- kind 0 (admin) / 1 (I/O queue 1): a 64-byte SQE.  Bit 2 moves PRP1 and
  bit 3 PRP2 into guest memory (base + value % size); bit 4 submits
  without ringing (batched); the cid is the host's own unless bit 5.
- kind 2: u16 offset (8-byte units), u8 length, data: the host writes guest
  memory (PRP lists, data buffers).
- kind 3: u8 doorbell index (0-3), u32 value: a raw doorbell write.

Invariants:
- the controller touches nothing outside the DMA table: every view it gets
  lies inside a mapping (checked on translate), the gap and guard pages of
  the memfd stay zero;
- nothing escapes ``process``; every CQE the host reaps (phase protocol) is
  well-formed: its sqid is the CQ's SQ, sqhd inside the queue, the cid one
  the host submitted there and not completed yet (unless the host itself
  broke the protocol with a raw doorbell or re-created the queue);
- at the end the controller is usable: an Identify Controller completes
  with success and the right vendor id, directly or after the controller
  reset a driver does on a timeout; or CSTS.CFS is set, as the spec allows.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.queues import Command, Completion, make_command
from mdevcore.nvme.spec import (
    CC_EN,
    CSTS_CFS,
    CSTS_RDY,
    DOORBELL_BASE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    REG_CSTS,
    AdminOpcode,
    IoOpcode,
)
from mdevcore.pci.dma import DmaTable
from mdevcore.tools.fuzz import Finding, check
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping

PAGE = 4096
HALF = 128 << 10  # each of the two mappings
BASE = 0x10_0000  # IOVA of the first mapping
FILE_SIZE = PAGE + HALF + PAGE + HALF + PAGE  # guard, A, gap, B, guard
GAP_IOVA = BASE + HALF
MEM_SIZE = 2 * HALF + PAGE  # the IOVA span, gap included
QSIZE = 16
VENDOR_ID = 0x1DD8
CONFIG = ControllerConfig(max_io_queues=4, max_queue_entries=64, mdts=4)
NS_BYTES = 256 << 10
# Where the host keeps its queues and buffers (inside mapping A).
ASQ, ACQ, SQ1, CQ1, IDENT = BASE, BASE + PAGE, BASE + 2 * PAGE, BASE + 3 * PAGE, BASE + 4 * PAGE
QUEUE_OPS = {AdminOpcode.CREATE_IO_SQ, AdminOpcode.CREATE_IO_CQ}
QUEUE_OPS |= {AdminOpcode.DELETE_IO_SQ, AdminOpcode.DELETE_IO_CQ}


class CheckedDma:
    """The real DmaTable, with each translation checked against the mappings."""

    def __init__(self, table: DmaTable, on_write: Callable[[int, int], None]) -> None:
        self.table = table
        self.on_write = on_write

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        inside = length >= 0 and (
            BASE <= iova
            and iova + length <= GAP_IOVA
            or GAP_IOVA + PAGE <= iova
            and iova + length <= BASE + MEM_SIZE
        )
        try:
            view = self.table.translate(iova, length, write)
        except OSError as exc:
            check(exc.errno == errno.EFAULT, f"translate failed with {exc.errno}")
            check(not inside, f"translate refused {iova:#x}+{length:#x} inside a mapping")
            raise
        check(inside, f"translate gave {iova:#x}+{length:#x} outside the DMA table")
        check(len(view) == length, f"view of {len(view)} bytes for {length}")
        if write:
            self.on_write(iova, length)
        return view

    def mark_dirty(self, iova: int, length: int) -> None:
        self.table.mark_dirty(iova, length)


class Queue:
    def __init__(self, sqid: int, sq: int, cq: int) -> None:
        self.sqid, self.sq, self.cq = sqid, sq, cq
        self.tail = self.head = 0
        self.phase = 1
        self.outstanding: set[int] = set()
        self.trusted = True  # False once the host broke the protocol itself


class Harness:
    def __init__(self, memfd: int, mm: mmap.mmap, namespace: FileNamespace) -> None:
        self.mm = mm
        self.table = DmaTable()
        rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
        self.table.map(DmaMapping(BASE, HALF, rw, memfd, PAGE))
        self.table.map(DmaMapping(GAP_IOVA + PAGE, HALF, rw, memfd, 2 * PAGE + HALF))
        self.ctrl = NvmeController(
            CheckedDma(self.table, self.controller_wrote),  # type: ignore[arg-type]
            [namespace],
            lambda vector: None,
            config=CONFIG,
            irq_vectors=lambda: 4,
            clock=lambda: 1000.0,
            name="fuzz",
        )
        self.queues = {0: Queue(0, ASQ, ACQ)}
        self.cid = 0
        self.cqes_checked = 0

    def close(self) -> None:
        self.ctrl.close()
        self.table.clear()

    # What the host cannot check: its own queue memory overwritten, by the
    # controller doing what a command asked (data into a queue page) or by
    # the host itself.  That queue's completions are then no longer checked.
    def _clobbered(self, iova: int, length: int, cqe_post: bool) -> None:
        for q in self.queues.values():
            if iova < q.sq + 64 * QSIZE and iova + length > q.sq:
                q.trusted = False
            if iova < q.cq + 16 * QSIZE and iova + length > q.cq:
                if not (cqe_post and length == 16 and (iova - q.cq) % 16 == 0):
                    q.trusted = False

    def controller_wrote(self, iova: int, length: int) -> None:
        self._clobbered(iova, length, cqe_post=True)

    def _queue_command(self, cmd: Command) -> None:
        """A create/delete: which queues change is the command's business."""
        self.queues.pop(1, None)
        entries = (cmd.cdw10 >> 16) + 1
        entry = 64 if cmd.opcode == AdminOpcode.CREATE_IO_SQ else 16
        if cmd.opcode in (AdminOpcode.CREATE_IO_SQ, AdminOpcode.CREATE_IO_CQ):
            if not cmd.cdw11 & 1:  # not contiguous: a PRP list we do not follow
                for q in self.queues.values():
                    q.trusted = False
            else:
                self._clobbered(cmd.prp1, entries * entry, cqe_post=False)

    # guest memory, by IOVA (the host's own writes: no DMA table involved)
    def _off(self, iova: int) -> int:
        return iova - BASE + PAGE

    def write_mem(self, iova: int, data: bytes) -> None:
        off = self._off(iova)
        self.mm[off : off + len(data)] = data

    def read_mem(self, iova: int, length: int) -> bytes:
        off = self._off(iova)
        return self.mm[off : off + length]

    def reg32(self, offset: int, value: int | None = None) -> int:
        if value is not None:
            self.ctrl.mmio_write(offset, struct.pack("<I", value))
            return value
        return int.from_bytes(self.ctrl.mmio_read(offset, 4), "little")

    def enable(self) -> None:
        self.queues = {0: Queue(0, ASQ, ACQ)}
        self.write_mem(ACQ, bytes(16 * QSIZE))  # a driver's fresh, zeroed CQ
        self.reg32(REG_AQA, (QSIZE - 1) << 16 | (QSIZE - 1))
        self.ctrl.mmio_write(REG_ASQ, struct.pack("<Q", ASQ))
        self.ctrl.mmio_write(REG_ACQ, struct.pack("<Q", ACQ))
        self.reg32(REG_CC, CC_EN | 6 << 16 | 4 << 20)
        self.run()
        check(self.reg32(REG_CSTS) & CSTS_RDY, "controller not ready after enable")

    def create_io_queues(self) -> None:
        self.write_mem(CQ1, bytes(16 * QSIZE))
        cqe = self.command(
            0, make_command(AdminOpcode.CREATE_IO_CQ, prp1=CQ1, cdw10=(QSIZE - 1) << 16 | 1,
                            cdw11=1 << 16 | 3)
        )  # fmt: skip
        check(cqe is not None and cqe.status == 0, f"CREATE_IO_CQ: {cqe}")
        cqe = self.command(
            0, make_command(AdminOpcode.CREATE_IO_SQ, prp1=SQ1, cdw10=(QSIZE - 1) << 16 | 1,
                            cdw11=1 << 16 | 1)
        )  # fmt: skip
        check(cqe is not None and cqe.status == 0, f"CREATE_IO_SQ: {cqe}")
        self.queues[1] = Queue(1, SQ1, CQ1)

    def reset(self) -> None:
        """What a driver does when a command times out: CC.EN=0, wait, enable."""
        self.reg32(REG_CC, 0)
        self.run()
        check(not self.reg32(REG_CSTS) & CSTS_RDY, "RDY still set after CC.EN=0")
        self.enable()

    def run(self) -> None:
        for _ in range(64):
            if not self.ctrl.process():
                return
        raise Finding("process() still busy after 64 rounds")

    def submit(self, qid: int, cmd: Command, ring: bool = True, own_cid: bool = True) -> Command:
        q = self.queues[qid]
        if own_cid:
            # A driver never reuses a cid still in flight (the input's own may be).
            self.cid = (self.cid + 1) & 0xFFFF
            while self.cid in q.outstanding:
                self.cid = (self.cid + 1) & 0xFFFF
            cmd = cmd._replace(cid=self.cid)
        elif cmd.cid in q.outstanding:
            q.trusted = False  # two commands with one cid: completions cannot be matched
        self.write_mem(q.sq + 64 * q.tail, cmd.encode())
        q.tail = (q.tail + 1) % QSIZE
        q.outstanding.add(cmd.cid)
        if ring:
            self.ring(2 * qid, q.tail)
        return cmd

    def ring(self, index: int, value: int) -> None:
        self.ctrl.mmio_write(DOORBELL_BASE + 4 * index, struct.pack("<I", value))

    def reap(self, qid: int) -> Iterator[Completion]:
        q = self.queues[qid]
        seen = 0
        while seen < QSIZE:
            cqe = Completion.decode(self.read_mem(q.cq + 16 * q.head, 16))
            if cqe.phase != q.phase:
                break
            seen += 1
            q.head += 1
            if q.head == QSIZE:
                q.head, q.phase = 0, q.phase ^ 1
            if q.trusted:
                check(cqe.sqhd < QSIZE, f"CQE sqhd {cqe.sqhd} outside a queue of {QSIZE}")
                check(cqe.sqid == q.sqid, f"CQE sqid {cqe.sqid} on the CQ of SQ {q.sqid}")
                check(cqe.cid in q.outstanding, f"CQE for cid {cqe.cid} never submitted on {qid}")
                q.outstanding.discard(cqe.cid)
                self.cqes_checked += 1
            yield cqe
        if seen:
            self.ring(2 * qid + 1, q.head)

    def command(self, qid: int, cmd: Command) -> Completion | None:
        sent = self.submit(qid, cmd)
        self.run()
        found = None
        for cqe in self.reap(qid):
            if cqe.cid == sent.cid:
                found = cqe
        return found

    def failed(self) -> bool:
        return bool(self.reg32(REG_CSTS) & CSTS_CFS)

    # --- one input -------------------------------------------------------

    def step(self, data: bytes, pos: int) -> int:
        op = data[pos]
        kind = op & 3
        pos += 1
        if kind in (0, 1):
            raw = data[pos : pos + 64].ljust(64, b"\0")
            pos += 64
            qid = kind
            if qid not in self.queues:
                return pos
            cmd = Command.decode(raw)
            if op & 4:
                cmd = cmd._replace(prp1=BASE + cmd.prp1 % MEM_SIZE)
            if op & 8:
                cmd = cmd._replace(prp2=BASE + cmd.prp2 % MEM_SIZE)
            if qid == 0 and cmd.opcode in QUEUE_OPS:
                self._queue_command(cmd)
            if qid == 0 and cmd.opcode == AdminOpcode.DOORBELL_BUFFER_CONFIG:
                for q in self.queues.values():
                    q.trusted = False  # shadow doorbells: MMIO ones may be ignored
            self.submit(qid, cmd, ring=not op & 16, own_cid=not op & 32)
        elif kind == 2:
            head = data[pos : pos + 3].ljust(3, b"\0")
            pos += 3
            offset = int.from_bytes(head[:2], "little") * 8 % MEM_SIZE
            chunk = data[pos : pos + head[2]]
            pos += head[2]
            iova = BASE + offset
            chunk = chunk[: max(0, BASE + MEM_SIZE - iova)]
            if iova + len(chunk) > GAP_IOVA and iova < GAP_IOVA + PAGE:
                return pos  # the host has no memory there either
            self._clobbered(iova, len(chunk), cqe_post=False)
            self.write_mem(iova, chunk)
        else:
            raw = data[pos : pos + 5].ljust(5, b"\0")
            pos += 5
            index = raw[0] & 3
            self.ring(index, int.from_bytes(raw[1:], "little"))
            rung = self.queues.get(index // 2)
            if rung is not None:
                rung.trusted = False
        self.run()
        for qid in list(self.queues):
            if qid in self.queues:
                for _ in self.reap(qid):
                    pass
        return pos

    def usable(self) -> None:
        if self.failed():
            return  # CFS: the spec lets the controller give up; a reset is the host's move
        admin = self.queues[0]
        if admin.trusted:
            cqe = self.command(0, make_command(AdminOpcode.IDENTIFY, prp1=IDENT, cdw10=1))
            if cqe is not None and cqe.status == 0:
                self._check_identify()
                return
        self.reset()
        cqe = self.command(0, make_command(AdminOpcode.IDENTIFY, prp1=IDENT, cdw10=1))
        check(cqe is not None, "Identify after a reset: no completion")
        assert cqe is not None
        check(cqe.status == 0, f"Identify after a reset: status {cqe.status:#x}")
        self._check_identify()

    def _check_identify(self) -> None:
        vid = int.from_bytes(self.read_mem(IDENT, 2), "little")
        check(vid == VENDOR_ID, f"Identify Controller VID {vid:#x}")


class NvmeTarget:
    def __init__(self) -> None:
        logging.getLogger("mdevcore").setLevel(logging.CRITICAL)
        self.dir = tempfile.TemporaryDirectory(prefix="fuzz-nvme-")
        self.namespace = FileNamespace(os.path.join(self.dir.name, "ns.img"), NS_BYTES)
        self.memfd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, FILE_SIZE)
        self.mm = mmap.mmap(self.memfd, FILE_SIZE)
        self.zero = bytes(FILE_SIZE)
        self.cqes_checked = 0  # so a test can tell the checks are not vacuous

    def run(self, data: bytes) -> None:
        self.mm[:] = self.zero
        host = Harness(self.memfd, self.mm, self.namespace)
        try:
            host.enable()
            host.create_io_queues()
            pos = 0
            while pos < len(data) and not host.failed():
                pos = host.step(data, pos)
            host.usable()
        finally:
            self.cqes_checked += host.cqes_checked
            host.close()
        for start, what in ((0, "guard"), (PAGE + HALF, "gap"), (FILE_SIZE - PAGE, "guard")):
            check(self.mm[start : start + PAGE] == self.zero[:PAGE], f"{what} page written")

    def close(self) -> None:
        self.mm.close()
        os.close(self.memfd)
        self.namespace.close()
        self.dir.cleanup()


def make() -> NvmeTarget:
    return NvmeTarget()


# --- seeds: the host harness's own commands -------------------------------


def sqe(kind: int, cmd: Command, move_prp1: bool = False, move_prp2: bool = False) -> bytes:
    op = kind | (4 if move_prp1 else 0) | (8 if move_prp2 else 0)
    if move_prp1:
        cmd = cmd._replace(prp1=cmd.prp1 - BASE)
    if move_prp2:
        cmd = cmd._replace(prp2=cmd.prp2 - BASE)
    return bytes([op]) + cmd.encode()


def mem(iova: int, data: bytes) -> bytes:
    return bytes([2]) + struct.pack("<HB", (iova - BASE) // 8, len(data)) + data


DATA = BASE + 8 * PAGE  # data buffers the seeds use
LIST = BASE + 6 * PAGE  # a PRP list page


def seeds() -> dict[str, bytes]:
    """Commands as tests/nvme's Host sends them (Identify, features, logs, I/O)."""
    a = AdminOpcode
    io = IoOpcode
    return {
        "identify": b"".join(
            sqe(0, make_command(a.IDENTIFY, prp1=DATA, cdw10=cns, nsid=1), True)
            for cns in (0, 1, 2, 3)
        ),
        "features": sqe(0, make_command(a.SET_FEATURES, cdw10=0x07, cdw11=3 << 16 | 3))
        + sqe(0, make_command(a.GET_FEATURES, cdw10=0x07))
        + sqe(0, make_command(a.SET_FEATURES, cdw10=0x08, cdw11=50 << 8 | 7))
        + sqe(0, make_command(a.GET_FEATURES, cdw10=0x06)),
        "logs": b"".join(
            sqe(
                0,
                make_command(a.GET_LOG_PAGE, prp1=DATA, cdw10=lid | 127 << 16, nsid=0xFFFFFFFF),
                True,
            )
            for lid in (1, 2, 3)
        ),  # fmt: skip
        "aer-abort-keepalive": sqe(0, make_command(a.ASYNC_EVENT_REQUEST))
        + sqe(0, make_command(a.ABORT, cdw10=1 << 16))
        + sqe(0, make_command(a.KEEP_ALIVE)),
        "write-read": sqe(1, make_command(io.WRITE, nsid=1, prp1=DATA, cdw12=7), True)
        + sqe(1, make_command(io.READ, nsid=1, prp1=DATA + PAGE, cdw12=7), True)
        + sqe(1, make_command(io.FLUSH, nsid=1)),
        "prp-list": mem(LIST, struct.pack("<4Q", *(DATA + n * PAGE for n in range(1, 5))))
        + sqe(1, make_command(io.WRITE, nsid=1, prp1=DATA + 512, prp2=LIST, cdw12=31), True, True)
        + sqe(1, make_command(io.READ, nsid=1, prp1=DATA, prp2=LIST, cdw12=31), True, True),
        "prp-into-gap": sqe(
            1,
            make_command(io.WRITE, nsid=1, prp1=GAP_IOVA - PAGE, prp2=GAP_IOVA, cdw12=15),
            True,
            True,
        ),  # fmt: skip
        "dsm-zeroes": mem(DATA, struct.pack("<IIQ", 0, 8, 16))
        + sqe(1, make_command(io.DATASET_MANAGEMENT, nsid=1, prp1=DATA, cdw11=4), True)
        + sqe(1, make_command(io.WRITE_ZEROES, nsid=1, cdw10=64, cdw12=15)),
        "queues": sqe(0, make_command(a.DELETE_IO_SQ, cdw10=1))
        + sqe(0, make_command(a.DELETE_IO_CQ, cdw10=1))
        + sqe(
            0, make_command(a.CREATE_IO_CQ, prp1=CQ1, cdw10=15 << 16 | 2, cdw11=2 << 16 | 3), True
        )
        + sqe(
            0, make_command(a.CREATE_IO_SQ, prp1=SQ1, cdw10=15 << 16 | 2, cdw11=2 << 16 | 1), True
        ),  # fmt: skip
        "doorbells": bytes([3, 1]) + struct.pack("<I", 99) + bytes([3, 2]) + struct.pack("<I", 3),
        "shadow": sqe(
            0, make_command(a.DOORBELL_BUFFER_CONFIG, prp1=DATA, prp2=DATA + PAGE), True, True
        ),
    }
