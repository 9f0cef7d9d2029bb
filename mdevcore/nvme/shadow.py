"""Shadow doorbells (Doorbell Buffer Config, admin opcode 7Ch).

For emulated controllers every MMIO doorbell write is expensive (a trapped
write, here a vfio-user message).  With a shadow doorbell buffer the host
writes each new I/O queue doorbell value into a page of its own memory and
rings the real doorbell only when the controller asked to be told: when the
new value passes the queue's EventIdx, a value the controller publishes in a
second page.  The controller therefore

  * reads I/O queue doorbells from the shadow page, never trusting them
    beyond the queue size (same checks as MMIO values);
  * publishes, once it has consumed an SQ up to its tail, EventIdx = tail
    (the next submission rings), then re-reads the shadow value, since the
    host may have moved it in between (the fence between the two makes this
    race-free);
  * keeps CQ head EventIdx just behind the head (no rings) unless the CQ is
    full or interrupts are pin-based, when it sets EventIdx = head so the
    next consumption rings.

Both pages use the doorbell register layout (CAP.DSTRD = 0): 2*qid for SQ
tails, 2*qid+1 for CQ heads.  The admin queue keeps its MMIO doorbells.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from mdevcore.nvme.checks import U64, int_in, list_of
from mdevcore.nvme.prp import DmaSpace, translate
from mdevcore.nvme.queues import CompletionQueue, SubmissionQueue

PAGE = 4096
_U32 = struct.Struct("<I")
# Acquiring a lock is a full memory barrier: the EventIdx store must be
# visible before the shadow doorbell is read again (x86 may reorder a store
# with a later load from another address).
_FENCE = threading.Lock()


def fence() -> None:
    _FENCE.acquire()
    _FENCE.release()


class ShadowDoorbells:
    def __init__(self, doorbells: int, eventidx: int) -> None:
        self.doorbells = doorbells  # guest address of the shadow doorbell page
        self.eventidx = eventidx  # guest address of the EventIdx page

    def snapshot(self) -> list[int]:
        return [self.doorbells, self.eventidx]

    @classmethod
    def from_snapshot(cls, raw: Any) -> ShadowDoorbells:
        dbs, eventidx = list_of(raw, 2, "shadow")
        return cls(int_in(dbs, 1, U64, "shadow"), int_in(eventidx, 1, U64, "eventidx"))

    def read(self, dma: DmaSpace, index: int) -> int:
        view = translate(dma, self.doorbells + 4 * index, 4, False)
        try:
            return int(_U32.unpack(view)[0])
        finally:
            view.release()

    def publish(self, dma: DmaSpace, index: int, value: int) -> None:
        addr = self.eventidx + 4 * index
        new = _U32.pack(value & 0xFFFFFFFF)
        # Only the host reads this page: an unchanged value is not written,
        # so an idle controller leaves no dirty page for migration to resend.
        view = translate(dma, addr, 4, False)
        try:
            if bytes(view) == new:
                return
        finally:
            view.release()
        view = translate(dma, addr, 4, True)
        try:
            view[:] = new
        finally:
            view.release()

    def publish_sq(self, dma: DmaSpace, sq: SubmissionQueue) -> None:
        self.publish(dma, 2 * sq.qid, sq.tail)

    def publish_cq(self, dma: DmaSpace, cq: CompletionQueue, *, level_irq: bool = False) -> None:
        # Ring me on the next head move only when I am waiting for room - or
        # always with pin-based interrupts: the host's head update is what
        # lets the interrupt line be re-evaluated (and what makes a VMM
        # unmask a fired INTx).
        value = cq.head if cq.full or level_irq else (cq.head - 1) & 0xFFFF
        self.publish(dma, 2 * cq.qid + 1, value)
