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
        # What we last stored at each EventIdx index.  Only we write that
        # page (the host reads it), so a value equal to it is not stored
        # again: an idle controller leaves no dirty page for migration to
        # resend, and a busy one translates the page once per publish.
        self._published: dict[int, int] = {}

    def snapshot(self) -> list[int]:
        return [self.doorbells, self.eventidx]

    @classmethod
    def from_snapshot(cls, raw: Any) -> ShadowDoorbells:
        dbs, eventidx = list_of(raw, 2, "shadow")
        return cls(int_in(dbs, 1, U64, "shadow"), int_in(eventidx, 1, U64, "eventidx"))

    def read_span(self, dma: DmaSpace, first: int, count: int) -> tuple[int, ...]:
        """The shadow values of doorbell indexes first..first+count-1: one translation."""
        view = translate(dma, self.doorbells + 4 * first, 4 * count, False)
        try:
            return struct.unpack_from(f"<{count}I", view)
        finally:
            view.release()

    def publish_all(self, dma: DmaSpace, wanted: list[tuple[int, int]]) -> bool:
        """Set each EventIdx ``index`` to ``value``; ``wanted`` is sorted by index.

        Values stored before are not stored again (see ``_published``); the
        rest go in one writable translation (which logs the page dirty),
        each value one 32-bit store, so the host never reads a half-written
        index.  Returns whether anything was stored.
        """
        published = self._published
        changed = [(i, v & 0xFFFFFFFF) for i, v in wanted if published.get(i) != v & 0xFFFFFFFF]
        if not changed:
            return False
        first = changed[0][0]
        view = translate(dma, self.eventidx + 4 * first, 4 * (changed[-1][0] - first + 1), True)
        try:
            words = view.cast("I")
            try:
                for index, value in changed:
                    words[index - first] = value
                    published[index] = value
            finally:
                words.release()
        finally:
            view.release()
        return True

    @staticmethod
    def sq_event(sq: SubmissionQueue) -> tuple[int, int]:
        """(index, EventIdx) for an SQ: the next submission rings."""
        return 2 * sq.qid, sq.tail

    @staticmethod
    def cq_event(cq: CompletionQueue, level_irq: bool) -> tuple[int, int]:
        """(index, EventIdx) for a CQ.

        Ring me on the next head move only when I am waiting for room - or
        always with pin-based interrupts: the host's head update is what
        lets the interrupt line be re-evaluated (and what makes a VMM
        unmask a fired INTx).
        """
        value = cq.head if cq.full or level_irq else (cq.head - 1) & 0xFFFF
        return 2 * cq.qid + 1, value

    def publish_sq(self, dma: DmaSpace, sq: SubmissionQueue) -> None:
        self.publish_all(dma, [self.sq_event(sq)])

    def publish_cq(self, dma: DmaSpace, cq: CompletionQueue, *, level_irq: bool = False) -> None:
        self.publish_all(dma, [self.cq_event(cq, level_irq)])
