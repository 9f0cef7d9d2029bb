"""Submission/completion queue state and the 64/16-byte entry layouts."""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import Any, NamedTuple

from mdevcore.nvme.checks import U16, U32, U64, int_in, list_of
from mdevcore.nvme.prp import DmaSpace, translate
from mdevcore.nvme.spec import CQ_ENTRY_SIZE, SQ_ENTRY_SIZE

HELD = object()  # a handler's "no completion now" (Asynchronous Event Request)

# opc, flags (FUSE 1:0, PSDT 7:6), cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
_SQE = struct.Struct("<BBHIIIQQQ6I")
# dw0, dw1, sqhd, sqid, cid, status|phase: written as 12 bytes, then the last 4
_CQE_HEAD = struct.Struct("<IIHH")
_CQE_TAIL = struct.Struct("<HH")


class Command(NamedTuple):
    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2: int
    cdw3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        return self.flags >> 6

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Command:
        return cls._make(_SQE.unpack(raw))

    def encode(self) -> bytes:
        return _SQE.pack(*self)


def make_command(opcode: int, cid: int = 0, nsid: int = 0, **fields: int) -> Command:
    """Build a command with every unnamed field zero (hosts in tests use this)."""
    values = dict.fromkeys(Command._fields, 0)
    values.update(opcode=opcode, cid=cid, nsid=nsid, **fields)
    return Command(**values)


class Completion(NamedTuple):
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # 15-bit status field, without the phase bit
    phase: int

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Completion:
        dw0, _dw1, sqhd, sqid = _CQE_HEAD.unpack(raw[:12])
        cid, sf = _CQE_TAIL.unpack(raw[12:16])
        return cls(dw0, sqhd, sqid, cid, sf >> 1, sf & 1)


@dataclasses.dataclass(slots=True)
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    bad_tail: int | None = None  # last invalid doorbell value reported, to report it once

    @property
    def pending(self) -> bool:
        return self.head != self.tail

    def snapshot(self) -> list[int]:
        return [self.qid, self.base, self.size, self.cqid, self.head, self.tail]

    @classmethod
    def from_snapshot(cls, raw: Any, *, max_qid: int, max_entries: int) -> SubmissionQueue:
        """A queue from a saved one; ``max_qid`` is 0 for the admin queue's slot."""
        qid, base, size, cqid, head, tail = list_of(raw, 6, "sq")
        qid = int_in(qid, 0, max_qid if qid else 0, "SQ id")
        size = int_in(size, 2, max_entries if qid else 4096, "SQ size")
        return cls(
            qid,
            int_in(base, 0, U64, "SQ base"),
            size,
            cqid=int_in(cqid, 0, U16, "SQ cqid"),
            head=int_in(head, 0, size - 1, "SQ head"),
            tail=int_in(tail, 0, size - 1, "SQ tail"),
        )

    def fetch(self, dma: DmaSpace) -> Command:
        """Read the entry at head and consume it (the caller checked ``pending``)."""
        view = translate(dma, self.base + self.head * SQ_ENTRY_SIZE, SQ_ENTRY_SIZE, False)
        try:
            cmd = Command.decode(view)
        finally:
            view.release()
        self.head = (self.head + 1) % self.size
        return cmd


@dataclasses.dataclass(slots=True)
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    irq_enabled: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    bad_head: int | None = None
    sqids: set[int] = dataclasses.field(default_factory=set)
    posted: int = 0  # entries posted since the last interrupt decision
    # Completions that found the queue full (an AER completed by an Abort
    # can need a second slot); posted as soon as the host frees room.
    overflow: collections.deque[tuple[int, int, int, int, int]] = dataclasses.field(
        default_factory=collections.deque
    )

    def snapshot(self) -> list[Any]:
        overflow = [list(entry) for entry in self.overflow]
        return [self.qid, self.base, self.size, self.vector, self.irq_enabled, self.head,
                self.tail, self.phase, overflow]  # fmt: skip

    @classmethod
    def from_snapshot(
        cls, raw: Any, *, max_qid: int, max_entries: int, vectors: int
    ) -> CompletionQueue:
        qid, base, size, vector, ien, head, tail, phase, overflow = list_of(raw, 9, "cq")
        qid = int_in(qid, 0, max_qid if qid else 0, "CQ id")
        size = int_in(size, 2, max_entries if qid else 4096, "CQ size")
        cq = cls(
            qid,
            int_in(base, 0, U64, "CQ base"),
            size,
            vector=int_in(vector, 0, max(vectors, 1) - 1, "CQ vector"),
            irq_enabled=bool(ien),
            head=int_in(head, 0, size - 1, "CQ head"),
            tail=int_in(tail, 0, size - 1, "CQ tail"),
            phase=int_in(phase, 0, 1, "CQ phase"),
        )
        for entry in list_of(overflow, None, "overflow")[:max_entries]:
            dw0, sqhd, sqid, cid, status = list_of(entry, 5, "overflow entry")
            cq.overflow.append(
                (
                    int_in(dw0, 0, U32, "dw0"),
                    int_in(sqhd, 0, U16, "sqhd"),
                    int_in(sqid, 0, U16, "sqid"),
                    int_in(cid, 0, U16, "cid"),
                    int_in(status, 0, 0x7FFF, "status"),
                )
            )
        return cq

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    def post(self, dma: DmaSpace, dw0: int, sqhd: int, sqid: int, cid: int, status: int) -> None:
        """Write one entry at tail; the phase-carrying dword goes last.

        A host polling the phase bit therefore never sees a half-written entry.
        """
        addr = self.base + self.tail * CQ_ENTRY_SIZE
        view = translate(dma, addr, CQ_ENTRY_SIZE, True)
        try:
            _CQE_HEAD.pack_into(view, 0, dw0, 0, sqhd, sqid)
            # One 4-byte copy (a single store): pack_into would zero the
            # dword first, and the phase bit is what the host polls.
            view[12:16] = _CQE_TAIL.pack(cid, (status << 1 | self.phase) & 0xFFFF)
        finally:
            view.release()
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1
        self.posted += 1

    def flush_overflow(self, dma: DmaSpace) -> None:
        while self.overflow and not self.full:
            self.post(dma, *self.overflow.popleft())
