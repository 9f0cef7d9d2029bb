"""The NVMe controller: registers, queues, command dispatch.

No PCI and no sockets: the owner feeds register accesses in
(:meth:`mmio_read` / :meth:`mmio_write`), calls :meth:`process` when
doorbells may have moved, calls :meth:`tick` at :meth:`next_deadline`, and
receives interrupts through the ``raise_irq`` callback.  Guest memory is
reached only through a :class:`~mdevcore.nvme.prp.DmaSpace`.

Doorbells live in one array of 32-bit values (``doorbells``), index 2*qid
for SQ tails and 2*qid+1 for CQ heads (CAP.DSTRD = 0).  The owner may pass
memory shared with the guest (doorbells mmapped by the client, polled), or
let the controller keep a private array that :meth:`mmio_write` fills
(trapped doorbells).  Either way :meth:`process` compares each doorbell with
the state it last acted on.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence

from mdevcore.nvme import admin, fastio, nvm, state
from mdevcore.nvme.fastio import FastIo
from mdevcore.nvme.features import Features
from mdevcore.nvme.identify import ControllerConfig
from mdevcore.nvme.interrupts import InterruptLogic
from mdevcore.nvme.logpages import AsyncEvent, AsyncEvents, ErrorLog, SmartCounters
from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.prp import DmaSpace
from mdevcore.nvme.queues import HELD, CompletionQueue, SubmissionQueue
from mdevcore.nvme.shadow import ShadowDoorbells, fence
from mdevcore.nvme.spec import (
    AER_INFO_INVALID_DOORBELL_REGISTER,
    AER_INFO_INVALID_DOORBELL_VALUE,
    CC_AMS_MASK,
    CC_AMS_SHIFT,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CC_WRITABLE,
    CSTS_CFS,
    CSTS_NSSRO,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    NSSR_RESET_VALUE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CAP,
    REG_CC,
    REG_CSTS,
    REG_INTMC,
    REG_INTMS,
    REG_NSSR,
    REGISTERS_SIZE,
    SHST_COMPLETE,
    VERSION_1_4,
    AsyncEventType,
    Generic,
    LogId,
    NvmeError,
    StatusType,
    generic,
    status_field,
)
from mdevcore.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

MPS_MIN = 0  # 4 KiB
MPS_MAX = 4  # 64 KiB
DOORBELL_PAGE = 4096
_ZERO_PAGE = bytes(DOORBELL_PAGE)

# CAP, VS, INTMS, INTMC, CC, reserved, CSTS, NSSR, AQA, ASQ, ACQ
_REGS = struct.Struct("<QIIIIIIIIQQ")
_QWORD_REGISTERS = frozenset({REG_CAP, REG_ASQ, REG_ACQ})
_RDY_CFS = CSTS_RDY | CSTS_CFS
_FUSE_PSDT = 0xC3  # SQE flags: FUSE (bits 1:0) and PSDT (bits 7:6)


def _qid(queue: SubmissionQueue) -> int:
    return queue.qid


def _ahead(start: int, value: int, limit: int, size: int) -> bool:
    """Whether ``value`` lies in the circular range from ``start`` forward to ``limit``."""
    return (value - start) % size <= (limit - start) % size


def _native_access(offset: int, size: int) -> bool:
    """A dword access to a dword, or a qword access to a 64-bit register."""
    if size == 4:
        return offset % 4 == 0
    return size == 8 and offset in _QWORD_REGISTERS


class NvmeController:
    """One NVMe controller with its namespaces (NSIDs 1..n, in list order)."""

    def __init__(
        self,
        dma: DmaSpace,
        namespaces: Sequence[FileNamespace],
        raise_irq: Callable[[int], None],
        *,
        config: ControllerConfig | None = None,
        doorbells: memoryview | None = None,
        irq_vectors: Callable[[], int] | None = None,
        level_irq: Callable[[], bool] | None = None,
        may_dma: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "nvme",
        fast_io: bool = True,
    ) -> None:
        self.config = config or ControllerConfig()
        if not 2 <= self.config.max_queue_entries <= 65536:
            raise ValueError("max_queue_entries must be 2..65536")
        if (self.config.max_io_queues + 1) * 8 > DOORBELL_PAGE:
            raise ValueError("too many queues for one doorbell page")
        self.dma = dma
        self.namespaces = list(namespaces)
        self.name = name
        self.clock = clock
        # What a guest can make us log, throttled per kind (it can write a register in a loop).
        self.limited_log = RateLimitedLog(log, clock=clock)
        self._irq_vectors = irq_vectors or (lambda: self.config.max_io_queues + 1)
        # True while interrupts are pin-based (INTx): CQ head updates then matter.
        self.level_irq = level_irq or (lambda: False)
        # False while the owner forbids device DMA (migration RUNNING_P2P and
        # STOP states): doorbells and register writes are still accepted and
        # latched, but nothing is fetched, completed or published until the
        # owner allows DMA again and calls process().
        self.may_dma = may_dma or (lambda: True)
        if doorbells is None:
            self._doorbell_mem: memoryview = memoryview(bytearray(DOORBELL_PAGE))
        else:
            if len(doorbells) < DOORBELL_PAGE:
                raise ValueError("doorbell memory must be one page")
            self._doorbell_mem = doorbells[:DOORBELL_PAGE]
        self.doorbells = self._doorbell_mem.cast("B").cast("I")
        # Shared doorbells are written without a trap: a ring of a missing
        # queue shows only as a non-zero value, found by polling.
        self._polled = doorbells is not None
        self.irq = InterruptLogic(raise_irq, clock)
        self.features = Features(self.config.max_io_queues)
        self.events = AsyncEvents()
        self.error_log = ErrorLog(self.config.error_log_entries)
        self.smart = SmartCounters()
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.cap = self._capabilities()
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.page_size = 4096
        self.last_keep_alive = clock()
        self._rr_next = 0  # round-robin position among I/O SQs
        self.commands_done = 0  # lifetime count, lets a poller see activity
        self.doorbell_traps = 0  # doorbell writes that came as MMIO (benchmarks: traps/command)
        self.shadow: ShadowDoorbells | None = None  # set by Doorbell Buffer Config
        # Reads and writes of I/O queues in C when the extension is built
        # (mdevcore.nvme.fastio); None: every command in Python.
        self._fast: FastIo | None = None
        if fast_io:
            self._fast = fastio.attach(dma, self.namespaces, self.smart, self.config.max_transfer)

    def _capabilities(self) -> int:
        cfg = self.config
        return (
            (cfg.max_queue_entries - 1)
            | 1 << 16  # CQR: queues must be physically contiguous
            | cfg.timeout_500ms << 24
            | 1 << 36  # NSSRS: NVM subsystem reset supported
            | 1 << 37  # CSS: NVM command set
            | MPS_MIN << 48
            | MPS_MAX << 52
        )

    @property
    def fast_io(self) -> FastIo | None:
        """The C path for reads and writes of I/O queues, if it serves this controller."""
        return self._fast

    def close(self) -> None:
        """Drop the views of doorbell memory (so a shared mapping can be unmapped)."""
        if self._fast is not None:
            self._fast.close()
        self.doorbells.release()
        self._doorbell_mem.release()

    # --- migration ------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Everything needed to resume elsewhere (see mdevcore.nvme.state)."""
        return state.snapshot(self)

    def load_state(self, saved: object) -> None:
        """Become the controller ``saved`` describes; OSError(EINVAL) if it does not fit."""
        state.restore(self, saved)

    def kick_interrupts(self) -> None:
        """Interrupt every CQ holding entries the host has not consumed.

        Spurious interrupts are harmless to an NVMe host; a lost one after
        migration would stall a queue.
        """
        for cq in self.cqs.values():
            if cq.irq_enabled and cq.head != cq.tail:
                self.irq.completions_posted(cq.vector, 0, coalescible=False)

    # --- state queries ----------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY)

    def irq_vectors(self) -> int:
        return self._irq_vectors()

    def namespace(self, nsid: int) -> FileNamespace | None:
        if 1 <= nsid <= len(self.namespaces):
            return self.namespaces[nsid - 1]
        return None

    def require_namespace(self, nsid: int) -> FileNamespace:
        """The namespace a command names, or its Invalid Namespace status."""
        ns = self.namespace(nsid)
        if ns is None:
            raise generic(Generic.INVALID_NAMESPACE, f"namespace {nsid:#x}")
        return ns

    # --- registers ----------------------------------------------------------

    def _register_image(self) -> bytes:
        return _REGS.pack(
            self.cap,
            VERSION_1_4,
            self.irq.mask,
            self.irq.mask,
            self.cc,
            0,
            self.csts,
            0,
            self.aqa,
            self.asq,
            self.acq,
        )

    def mmio_read(self, offset: int, size: int) -> bytes:
        """Read BAR0 bytes.

        The NVMe base specification has registers accessed in their native
        width, naturally aligned, and leaves any other access undefined; here
        such accesses read as zero, as do reserved and unsupported optional
        registers (0x38-0xFFF: CMB, boot partitions, PMR, command set
        specific) and the doorbells (write-only; what a read returns is
        vendor specific).
        """
        if offset >= REGISTERS_SIZE or not _native_access(offset, size):
            return bytes(size)
        image = self._register_image()
        return image[offset : offset + size].ljust(size, b"\0")

    def mmio_write(self, offset: int, data: bytes) -> bool:
        """Apply a BAR0 write; True when the write was a doorbell (process() has work).

        Writes that are not a native-width access (see :meth:`mmio_read`),
        and writes to read-only or reserved registers, change nothing.  A
        64-bit register written as one qword takes its low dword first, as
        if written as two dwords.
        """
        if offset >= DOORBELL_BASE:
            return self._doorbell_write(offset - DOORBELL_BASE, data)
        if not _native_access(offset, len(data)):
            self.limited_log.log(
                logging.DEBUG, self.name, "bad register write",
                "%s: ignored register write of %d bytes at %#x", self.name, len(data), offset,
            )  # fmt: skip
            return False
        for dword in range(0, len(data), 4):
            value = int.from_bytes(data[dword : dword + 4], "little")
            if self._write_dword(offset + dword, value):
                break  # NVM subsystem reset: the rest of the access is gone with it
        return False

    def _write_dword(self, reg: int, value: int) -> bool:
        """Write one dword of the register file; True after an NVM subsystem reset."""
        if reg == REG_INTMS:  # write-1-to-set
            self.irq.set_mask(value)
        elif reg == REG_INTMC:  # write-1-to-clear
            self.irq.clear_mask(value)
        elif reg == REG_CC:
            self._write_cc(value & CC_WRITABLE)
        elif reg == REG_CSTS:
            # Only NSSRO is writable (RW1C); RDY, CFS, SHST and PP are the
            # controller's to change.
            if value & CSTS_NSSRO:
                self.csts &= ~CSTS_NSSRO
        elif reg == REG_NSSR:
            if value == NSSR_RESET_VALUE:
                self.limited_log.log(
                    logging.INFO, self.name, "reset", "%s: NVM subsystem reset", self.name
                )
                self.reset()
                self.csts |= CSTS_NSSRO
                return True
        elif reg == REG_AQA:
            self.aqa = value & 0x0FFF0FFF
        elif reg == REG_ASQ:
            self.asq = self.asq & ~0xFFFFFFFF | value & ~0xFFF
        elif reg == REG_ASQ + 4:
            self.asq = self.asq & 0xFFFFFFFF | value << 32
        elif reg == REG_ACQ:
            self.acq = self.acq & ~0xFFFFFFFF | value & ~0xFFF
        elif reg == REG_ACQ + 4:
            self.acq = self.acq & 0xFFFFFFFF | value << 32
        # CAP, VS and everything from 0x18 (reserved) and 0x38 up: read-only
        # or reserved, the write is dropped.
        return False

    def _write_cc(self, new: int) -> None:
        old, self.cc = self.cc, new
        if not old & CC_EN and new & CC_EN:
            self._enable()
        elif old & CC_EN and not new & CC_EN:
            self.limited_log.log(
                logging.INFO, self.name, "reset", "%s: controller reset (CC.EN 1->0)", self.name
            )
            self._controller_reset()
        old_shn = old >> CC_SHN_SHIFT & CC_SHN_MASK
        new_shn = new >> CC_SHN_SHIFT & CC_SHN_MASK
        if new_shn and not old_shn:
            self._shutdown()
        elif old_shn and not new_shn:
            self.csts &= ~(0x3 << CSTS_SHST_SHIFT)

    def _enable(self) -> None:
        mps = self.cc >> CC_MPS_SHIFT & CC_MPS_MASK
        css = self.cc >> CC_CSS_SHIFT & CC_CSS_MASK
        ams = self.cc >> CC_AMS_SHIFT & CC_AMS_MASK
        asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16 & 0xFFF) + 1
        problem = None
        if not MPS_MIN <= mps <= MPS_MAX:
            problem = f"CC.MPS {mps} unsupported"
        elif css != 0 or ams != 0:
            problem = f"CC.CSS {css} / CC.AMS {ams} unsupported"
        elif asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs} too small"
        elif not self.asq or not self.acq:
            problem = "admin queue addresses not set"
        if problem:
            self.limited_log.log(
                logging.WARNING, self.name, "enable", "%s: enable failed: %s", self.name, problem
            )
            self.csts |= CSTS_CFS
            return
        self.page_size = 4096 << mps
        self.csts &= ~(0x3 << CSTS_SHST_SHIFT)
        self.cqs[0] = CompletionQueue(0, self.acq, acqs, vector=0, irq_enabled=True)
        self.sqs[0] = SubmissionQueue(0, self.asq, asqs, cqid=0)
        self.cqs[0].sqids.add(0)
        self.last_keep_alive = self.clock()
        self.csts |= CSTS_RDY
        self.limited_log.log(
            logging.INFO,
            self.name,
            "enable",
            "%s: enabled, admin SQ %d / CQ %d entries, page %d",
            self.name,
            asqs,
            acqs,
            self.page_size,
        )

    def _controller_reset(self) -> None:
        """Controller Level Reset: queues, features and events go; AQA/ASQ/ACQ stay."""
        self.sqs.clear()
        self.cqs.clear()
        self.shadow = None
        self.features.reset()
        self.events.reset()
        self.irq.reset()
        self.doorbells[:] = memoryview(bytes(DOORBELL_PAGE)).cast("I")
        self.csts &= ~(CSTS_RDY | CSTS_CFS)
        self._rr_next = 0

    def _shutdown(self) -> None:
        for ns in self.namespaces:
            ns.flush()
        self.csts = self.csts & ~(0x3 << CSTS_SHST_SHIFT) | SHST_COMPLETE << CSTS_SHST_SHIFT
        self.limited_log.log(
            logging.INFO, self.name, "shutdown", "%s: shutdown complete", self.name
        )

    def reset(self) -> None:
        """Conventional reset (PCI function reset): every register to its power-on value."""
        self._controller_reset()
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0
        self.page_size = 4096

    # --- doorbells --------------------------------------------------------

    def _doorbell_write(self, offset: int, data: bytes) -> bool:
        """A write at ``offset`` into the doorbells (BAR0 0x1000 up, to the BAR's end).

        Every dword there is the doorbell of some queue id (CAP.DSTRD = 0:
        0x2000-0x3FFF belong to ids 512-1023, which never exist here).  A
        write to the doorbell of a queue that does not exist raises the
        Invalid Doorbell Register event (NVMe base spec, Asynchronous Event
        Information - Error Status); one that is not a dword access is
        undefined and ignored.
        """
        if offset % 4 or len(data) != 4:
            self.limited_log.log(
                logging.WARNING, self.name, "bad doorbell write",
                "%s: ignored doorbell write of %d bytes at %#x", self.name, len(data), offset,
            )  # fmt: skip
            return False
        index = offset // 4
        qid, is_cq = divmod(index, 2)
        # Queues exist only while ready (a reset deletes them), and never
        # beyond the doorbell page: such a qid is not in the dicts.
        if qid not in (self.cqs if is_cq else self.sqs):
            self.limited_log.log(
                logging.WARNING, self.name, "doorbell for missing queue",
                "%s: doorbell for missing %s %d", self.name, "CQ" if is_cq else "SQ", qid,
            )  # fmt: skip
            if self.ready:
                self.post_event(
                    AsyncEventType.ERROR, AER_INFO_INVALID_DOORBELL_REGISTER, LogId.ERROR_INFO
                )
                return True
            return False
        self.doorbells[index] = int.from_bytes(data, "little")
        self.doorbell_traps += 1
        return True

    def _find_rings_of_missing_queues(self) -> None:
        """Polled doorbells: report (once) each non-zero doorbell of a queue that does not exist.

        Doorbells of missing queues are zero (reset, queue creation and
        deletion clear them), so one compare of the page beyond the highest
        queue finds a ring there; gaps below it are looked at only when
        there are any.  The value is cleared once reported.
        """
        db = self.doorbells
        top = 2 * (max(self.sqs.keys() | self.cqs.keys(), default=-1) + 1)
        found = []
        if self._doorbell_mem[4 * top :].tobytes() != _ZERO_PAGE[4 * top :]:
            found = [i for i in range(top, len(db)) if db[i]]
        if top != len(self.sqs) + len(self.cqs):
            found += [
                i for i in range(top) if db[i] and i >> 1 not in (self.cqs if i & 1 else self.sqs)
            ]
        for index in found:
            db[index] = 0
            qid, is_cq = divmod(index, 2)
            self.limited_log.log(
                logging.WARNING, self.name, "doorbell for missing queue",
                "%s: doorbell for missing %s %d", self.name, "CQ" if is_cq else "SQ", qid,
            )  # fmt: skip
        if found:
            self.post_event(
                AsyncEventType.ERROR, AER_INFO_INVALID_DOORBELL_REGISTER, LogId.ERROR_INFO
            )

    def _read_doorbells(self) -> None:
        db = self.doorbells
        shadow = self.shadow
        cqs, sqs = self.cqs, self.sqs
        try:
            # The I/O queues' values come from the shadow page when there is
            # one (indexes up to 2*top+1, read at once); the admin queue's
            # from the registers.
            io: memoryview | tuple[int, ...] = db
            if shadow is not None:
                top = max(max(cqs, default=0), max(sqs, default=0))
                if top:
                    io = shadow.read_span(self.dma, 0, 2 * top + 2)
            for qid, cq in cqs.items():
                index = 2 * qid + 1
                head = io[index] if qid else db[index]
                if head == cq.head:
                    continue
                # The head may only move forward over posted entries: past
                # the tail it would free slots the host never read.
                if head >= cq.size or not _ahead(cq.head, head, cq.tail, cq.size):
                    if cq.bad_head != head:
                        cq.bad_head = head
                        self._invalid_doorbell_value("CQ", qid, head)
                    continue
                cq.head = head
            for qid, sq in sqs.items():
                index = 2 * qid
                tail = io[index] if qid else db[index]
                if tail == sq.tail:
                    continue
                # The tail may only move forward into free slots: back
                # over pending entries (or round past the head) would make
                # the queue more than full.
                if tail >= sq.size or not _ahead(sq.tail, tail, sq.head - 1, sq.size):
                    if sq.bad_tail != tail:
                        sq.bad_tail = tail
                        self._invalid_doorbell_value("SQ", qid, tail)
                    continue
                sq.tail = tail
        except NvmeError as exc:
            self.limited_log.log(
                logging.ERROR,
                self.name,
                "shadow doorbells",
                "%s: shadow doorbell page unreadable: %s",
                self.name,
                exc,
            )
            self.csts |= CSTS_CFS

    def _publish_event_indexes(self) -> bool:
        """Tell the host (shadow doorbells) which doorbell moves need an MMIO write.

        Returns whether an EventIdx changed.
        """
        shadow = self.shadow
        if shadow is None:
            return False
        level = self.level_irq()
        wanted = [shadow.sq_event(sq) for qid, sq in self.sqs.items() if qid]
        wanted += [shadow.cq_event(cq, level) for qid, cq in self.cqs.items() if qid]
        wanted.sort()
        try:
            return shadow.publish_all(self.dma, wanted)
        except NvmeError as exc:
            self.limited_log.log(
                logging.ERROR,
                self.name,
                "shadow doorbells",
                "%s: EventIdx page unwritable: %s",
                self.name,
                exc,
            )
            self.csts |= CSTS_CFS
            return False

    def _invalid_doorbell_value(self, kind: str, qid: int, value: int) -> None:
        self.limited_log.log(
            logging.WARNING,
            self.name,
            "invalid doorbell value",
            "%s: invalid %s %d doorbell value %d",
            self.name,
            kind,
            qid,
            value,
        )
        self.post_event(AsyncEventType.ERROR, AER_INFO_INVALID_DOORBELL_VALUE, LogId.ERROR_INFO)

    # --- processing -------------------------------------------------------

    def process(self, budget: int = 256) -> bool:
        """Execute up to ``budget`` commands; True if more work is waiting.

        The admin queue goes first, then the I/O queues round-robin, each
        taking up to the arbitration burst (2**AB commands) per turn.  A
        queue whose CQ is full waits for the host to move the CQ head.

        This is the hot path of every doorbell: the checks of
        :meth:`_runnable` are spelled out inline in the I/O loop.
        """
        if self.csts & _RDY_CFS != CSTS_RDY or not self.may_dma():
            # Not enabled, or fatal status: nothing runs until the host resets the controller.
            return False
        if self._polled:
            self._find_rings_of_missing_queues()
        self._read_doorbells()
        cqs = self.cqs
        for cq in cqs.values():
            if cq.overflow:
                self._guarded(cq, cq.flush_overflow)
        events = self.events
        if events.queued:
            self._deliver_events()
        done = 0
        admin_sq = self.sqs.get(0)
        if admin_sq is not None and admin_sq.head != admin_sq.tail:
            while admin_sq is not None and done < budget and self._runnable(admin_sq):
                self._execute_one(admin_sq)
                done += 1
                admin_sq = self.sqs.get(0)
            cqs = self.cqs  # admin commands create and delete queues
            # An AER just fetched, or a log page read that unmasked an event
            # type, may pair with an event already queued: deliver it now,
            # not on some later doorbell.
            if events.queued:
                self._deliver_events()
        io_sqs = [sq for qid, sq in self.sqs.items() if qid]
        if len(io_sqs) > 1:
            io_sqs.sort(key=_qid)
            # Rotate so the queue after the last one served goes first.
            start = next((i for i, sq in enumerate(io_sqs) if sq.qid >= self._rr_next), 0)
            io_sqs = io_sqs[start:] + io_sqs[:start]
        burst = 1 << (self.features.arbitration & 0x7)
        fast, page = self._fast, self.page_size
        progress = True
        while progress and done < budget:
            progress = False
            for sq in io_sqs:
                target = cqs.get(sq.cqid)
                if target is None:
                    continue
                taken = 0
                # Runnable: entries pending, CQ not full and nothing held
                # back in its overflow, controller still healthy.
                while (
                    sq.head != sq.tail
                    and taken < burst
                    and done < budget
                    and (target.tail + 1) % target.size != target.head
                    and not target.overflow
                    and self.csts & _RDY_CFS == CSTS_RDY
                ):
                    # C takes the run of reads and writes it can finish;
                    # the command it stopped at (if any) runs here.
                    if fast is not None:
                        ran = fast.run(sq, target, min(burst - taken, budget - done), page)
                        if ran:
                            self.commands_done += ran
                            taken += ran
                            done += ran
                            continue
                    self._execute_one(sq)
                    taken += 1
                    done += 1
                if taken:
                    progress = True
                    self._rr_next = sq.qid + 1
        self._signal_completions()
        if self._any_runnable():
            return True
        if self.shadow is None:
            return False
        # Idle: ask for an MMIO ring on the next submission, then look
        # again - the host may have written a shadow doorbell meanwhile.
        # Unless no EventIdx moved: the host has decided against these same
        # values since the last look, and rings if it must.
        if not self._publish_event_indexes():
            return False
        fence()
        self._read_doorbells()
        return self._any_runnable()

    def _any_runnable(self) -> bool:
        return any(sq.head != sq.tail and self._runnable(sq) for sq in self.sqs.values())

    def _runnable(self, sq: SubmissionQueue) -> bool:
        cq = self.cqs.get(sq.cqid)
        return (
            sq.pending
            and cq is not None
            and not cq.full
            and not cq.overflow
            and self.csts & _RDY_CFS == CSTS_RDY
        )

    def _execute_one(self, sq: SubmissionQueue) -> None:
        self.commands_done += 1
        try:
            cmd = sq.fetch(self.dma)
        except NvmeError as exc:
            # The SQ itself is unreadable: a fatal condition for this controller.
            self.limited_log.log(
                logging.ERROR,
                self.name,
                "queue DMA",
                "%s: cannot fetch from SQ %d: %s",
                self.name,
                sq.qid,
                exc,
            )
            self.csts |= CSTS_CFS
            return
        status, dw0 = 0, 0
        try:
            if cmd.flags & _FUSE_PSDT:
                if cmd.fuse:
                    raise NvmeError(
                        StatusType.GENERIC, Generic.INVALID_FIELD, "fused operations unsupported"
                    )
                raise NvmeError(StatusType.GENERIC, Generic.INVALID_FIELD, "SGLs unsupported")
            result = admin.execute(self, cmd) if sq.qid == 0 else nvm.execute(self, sq.qid, cmd)
            if result is HELD:
                return
            dw0 = int(result)  # type: ignore[call-overload]
        except NvmeError as exc:
            status = exc.status
            # debug: failing commands are ordinary (drivers probe optional
            # features) and a guest must not be able to flood the log.
            log.debug(
                "%s: SQ %d cid %d opcode %#x failed: %s",
                self.name,
                sq.qid,
                cmd.cid,
                cmd.opcode,
                exc,
            )
            self.error_log.record(sq.qid, cmd.cid, status, nsid=cmd.nsid)
        except Exception as exc:
            self.limited_log.log(
                logging.ERROR,
                self.name,
                "command crashed",
                "%s: SQ %d cid %d opcode %#x crashed",
                self.name,
                sq.qid,
                cmd.cid,
                cmd.opcode,
                exc_info=exc,
            )
            status = status_field(StatusType.GENERIC, Generic.INTERNAL_ERROR)
            self.error_log.record(sq.qid, cmd.cid, status, nsid=cmd.nsid)
        self.complete(sq, cmd.cid, status, dw0)

    def complete(self, sq: SubmissionQueue, cid: int, status: int, dw0: int = 0) -> None:
        """Post a completion for a command of ``sq``, held in the CQ's overflow if it is full."""
        cq = self.cqs.get(sq.cqid)
        if cq is None:
            return
        if cq.overflow or cq.full:
            cq.overflow.append((dw0, sq.head, sq.qid, cid, status))
            return
        try:
            cq.post(self.dma, dw0, sq.head, sq.qid, cid, status)
        except NvmeError as exc:
            self._cq_unwritable(cq, exc)

    def _guarded(self, cq: CompletionQueue, post: Callable[[DmaSpace], None]) -> None:
        try:
            post(self.dma)
        except NvmeError as exc:
            self._cq_unwritable(cq, exc)

    def _cq_unwritable(self, cq: CompletionQueue, exc: NvmeError) -> None:
        # The CQ itself is outside guest memory: nothing sensible remains.
        self.limited_log.log(
            logging.ERROR,
            self.name,
            "queue DMA",
            "%s: cannot post to CQ %d: %s",
            self.name,
            cq.qid,
            exc,
        )
        self.csts |= CSTS_CFS

    def _signal_completions(self) -> None:
        for cq in self.cqs.values():
            if cq.posted:
                count, cq.posted = cq.posted, 0
                if cq.irq_enabled:
                    self.irq.completions_posted(cq.vector, count, coalescible=cq.qid != 0)

    # --- asynchronous events ----------------------------------------------

    def post_event(self, event_type: AsyncEventType, info: int, log_id: int) -> None:
        """Report an asynchronous event (completes a held AER when one is outstanding)."""
        self.events.post(AsyncEvent(event_type, info, log_id))
        if self.ready and self.may_dma():
            self._deliver_events()
            self._signal_completions()

    def _deliver_events(self) -> None:
        admin_sq, admin_cq = self.sqs.get(0), self.cqs.get(0)
        if admin_sq is None or admin_cq is None or admin_cq.full:
            return
        # ready() has already paired and dequeued these: every pair must be
        # completed (complete() holds what does not fit until the host frees room).
        for cid, event in self.events.ready():
            self.complete(admin_sq, cid, 0, event.dw0)

    # --- timers -------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Clock time at which :meth:`tick` has work (interrupt aggregation, keep-alive)."""
        deadlines = [d for d in (self.irq.next_deadline(), self._keep_alive_deadline()) if d]
        return min(deadlines) if deadlines else None

    def _keep_alive_deadline(self) -> float | None:
        # Once fatal (CFS), an expired timer has nothing left to do: a deadline
        # left in the past would make the owner's loop tick without end.
        if not self.ready or self.csts & CSTS_CFS or not self.features.keep_alive_ms:
            return None
        return self.last_keep_alive + self.features.keep_alive_ms / 1000

    def tick(self) -> None:
        self.irq.tick()
        deadline = self._keep_alive_deadline()
        if deadline is not None and self.clock() >= deadline and not self.csts & CSTS_CFS:
            self.limited_log.log(
                logging.ERROR, self.name, "keep-alive", "%s: keep-alive timeout expired", self.name
            )
            self.csts |= CSTS_CFS
