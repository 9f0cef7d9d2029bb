"""Submission/completion queue state and the 64/16-byte entry layouts."""

from __future__ import annotations

import collections
import dataclasses
import struct
from typing import NamedTuple

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
            view[:12] = _CQE_HEAD.pack(dw0, 0, sqhd, sqid)
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
