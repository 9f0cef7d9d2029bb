"""The NVMe workload: a guest's nvme driver, write/verify, migratable.

It drives an NVMe controller (the pds VF, or any vfio-user NVMe device with
trapped doorbells) through a blocking vfio-user client, with every queue,
PRP list and data buffer in a GuestMemory:

* probe: controller reset and enable with the admin queues, Identify
  controller and namespace 1, Set Features Number of Queues, MSI-X on in
  config space and one eventfd per vector (SET_IRQS, MSI-X index), then
  ``queues`` I/O CQ/SQ pairs (one vector each) of ``queue_size`` entries;
* load: up to ``depth`` commands in flight per queue, random Writes and
  Reads of 1..32 LBAs inside one 32-LBA chunk, data buffers at random
  dword offsets so that PRP1 alone, PRP1+PRP2 and PRP lists all occur;
  completions found by eventfd wake-ups and the CQ phase bits;
* doorbells: MMIO (REGION_WRITE, posted) or, when the device offers a
  sparse mmap area over them, stores into the mapped page as QEMU makes
  them; optionally shadow doorbells (Doorbell Buffer Config) with the
  EventIdx rule, as Linux uses them on emulated controllers;
* checking: a chunk with a command in flight takes no other, so every Read
  has one right answer, the journal's (mdevcore.migration.workloads.
  nvme_journal); ``verify`` drains and reads every written LBA back.

Preconditions: the caller has negotiated the client and mapped ``mem``
into the device (GuestMemory.map_into), as the migration tool does before
starting DMA logging.

Migration: ``save`` is a JSON header (queue positions, commands in flight,
counters, the random generator) followed by the zlib-compressed journal.
On the destination ``restore`` takes the device as the migrated state left
it (registers, queues and MSI-X enable all came along; the queues' memory
arrived as guest pages), wires new eventfds with SET_IRQS and carries on:
each in-flight command completes exactly once, either from a completion
the source posted before it stopped or one the destination posts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import struct
import time
import zlib
from typing import Any

from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory
from mdevcore.migration.workloads import nvme_journal
from mdevcore.migration.workloads.nvme_driver import (
    ADMIN_CREATE_CQ,
    ADMIN_CREATE_SQ,
    ADMIN_DOORBELL_BUFFER_CONFIG,
    ADMIN_IDENTIFY,
    ADMIN_SET_FEATURES,
    CSTS_CFS,
    CSTS_RDY,
    FEATURE_NUMBER_OF_QUEUES,
    IO_READ,
    IO_WRITE,
    OACS_DOORBELL_BUFFER_CONFIG,
    REG_CSTS,
    SQE_SIZE,
    Cqe,
    DeviceError,
    HostQueue,
    Registers,
    need_event,
    sqe,
)
from mdevcore.pci import caps
from mdevcore.vfio_user.backend import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PCI_CONFIG_REGION_INDEX,
    PCI_MSIX_IRQ_INDEX,
)
from mdevcore.vfio_user.client import Client

try:
    from mdevcore.migration.workload import WorkloadMismatch
except ImportError:  # the contract module lands separately; keep this importable alone

    class WorkloadMismatch(AssertionError):  # type: ignore[no-redef]
        """A byte read back differs from what was written."""


SAVE_MAGIC = b"MDEV-NVME-WL/1\n"
ADMIN_SIZE = 32
CHUNK_LBAS = 32  # one command never crosses a chunk; a busy chunk takes no other
SLOT_PAGES = 5  # 32 LBAs of 512 bytes at a page offset span 5 pages
MAX_ERRORS = 100  # mismatch details kept (all are counted)
MAX_MSG_FDS = 16  # what our client announces (QEMU_LIKE_CAPS)


@dataclasses.dataclass(slots=True)
class Op:
    """One command in flight: what it does, so its completion can be checked."""

    write: bool
    slba: int
    nlb: int
    generation: int  # write: the pattern written; read: unused (the journal decides)
    offset: int  # data starts this far into the slot's buffer

    def to_list(self) -> list[int]:
        return [int(self.write), self.slba, self.nlb, self.generation, self.offset]


class NvmeWorkload:
    """A write/verify NVMe driver over vfio-user (see the module docstring)."""

    name = "nvme"

    def __init__(
        self,
        *,
        queues: int = 16,
        depth: int = 32,
        queue_size: int = 64,
        seed: int = 1,
        span_bytes: int = 16 << 20,
        write_ratio: float = 0.6,
        shadow_doorbells: bool = False,
        mmap_doorbells: bool = True,
    ) -> None:
        if not 1 <= depth < queue_size or queue_size * SQE_SIZE > PAGE_SIZE:
            raise ValueError("depth must be below queue_size, and an SQ fits one page")
        self.want_queues = queues
        self.depth = depth
        self.queue_size = queue_size
        self.seed = seed
        self.span_bytes = span_bytes
        self.write_ratio = write_ratio
        # Doorbell Buffer Config, as Linux uses it on emulated controllers:
        # I/O doorbells go to a shadow page, MMIO only past the EventIdx.
        self.shadow = shadow_doorbells
        self.mmap_doorbells = mmap_doorbells  # when the device offers them
        self.shadow_page = 0
        self.eventidx_page = 0
        self.rng = random.Random(seed)
        self.generation = 0
        self.quiesced = False
        self.counters = dict.fromkeys(
            ("writes", "reads", "written_bytes", "verified_bytes", "completions",
             "mismatches", "interrupts", "in_flight_at_quiesce", "restores"), 0)  # fmt: skip
        self.errors: list[str] = []
        self.device_pages: set[int] = set()  # pages the device wrote, by our commands
        self.efds: list[int] = []
        self._dev: Client | None = None
        self._mem: GuestMemory | None = None
        self._regs: Registers | None = None
        self.admin: HostQueue | None = None
        self.ioqs: list[HostQueue] = []
        self.inflight: dict[tuple[int, int], Op] = {}  # (qid, cid) -> op
        self.busy: set[int] = set()  # chunks with a command in flight
        self.admin_cid = 0
        # Filled by probe/restore: namespace geometry and guest addresses.
        self.lba_size = 512
        self.first_lba = 0
        self.chunks = 0
        self.slot_base = 0
        self.prp_base = 0
        self.journal = nvme_journal.Journal(0, 0)

    # --- accessors (set once started) ---------------------------------------

    @property
    def dev(self) -> Client:
        assert self._dev is not None, "workload not started"
        return self._dev

    @property
    def mem(self) -> GuestMemory:
        assert self._mem is not None, "workload not started"
        return self._mem

    @property
    def regs(self) -> Registers:
        assert self._regs is not None, "workload not started"
        return self._regs

    # --- bring-up -------------------------------------------------------------

    def start(self, dev: Client, mem: GuestMemory) -> None:
        self._dev, self._mem = dev, mem
        self._regs = regs = Registers(dev, mmap_doorbells=self.mmap_doorbells)
        if self.queue_size > regs.mqes:
            raise DeviceError(f"queue size {self.queue_size} beyond CAP.MQES+1 {regs.mqes}")
        first = mem.alloc(PAGE_SIZE)
        if first == 0:
            # IOVA 0 is legal, but controllers (ours too) take ASQ/ACQ = 0 as
            # "not programmed": leave page 0 unused, as guests do.
            first = mem.alloc(PAGE_SIZE)
        admin = HostQueue(0, first, mem.alloc(PAGE_SIZE), ADMIN_SIZE, vector=0)
        self.admin = admin
        vectors = self._enable_msix(self.want_queues + 1)
        regs.enable(admin)
        ident = mem.alloc(PAGE_SIZE)
        self._admin(ADMIN_IDENTIFY, prp1=ident, cdw10=1)  # controller
        mdts = mem.read(ident + 77, 1)[0]
        oacs = int.from_bytes(mem.read(ident + 256, 2), "little")
        if self.shadow and not oacs & OACS_DOORBELL_BUFFER_CONFIG:
            raise DeviceError("shadow doorbells wanted, the controller does not offer them")
        if mdts and (PAGE_SIZE << mdts) < CHUNK_LBAS * 4096:
            raise DeviceError(f"MDTS {mdts} too small for {CHUNK_LBAS}-LBA transfers")
        self._admin(ADMIN_IDENTIFY, nsid=1, prp1=ident, cdw10=0)  # namespace 1
        nsze = int.from_bytes(mem.read(ident, 8), "little")
        flbas = mem.read(ident + 26, 1)[0] & 0xF
        lbads = mem.read(ident + 128 + 4 * flbas + 2, 1)[0]
        self.lba_size = 1 << lbads
        if self.lba_size * CHUNK_LBAS > (SLOT_PAGES - 1) * PAGE_SIZE:
            raise DeviceError(f"LBA size {self.lba_size} unsupported by this workload")
        span = min(nsze, self.span_bytes // self.lba_size) // CHUNK_LBAS * CHUNK_LBAS
        if span < CHUNK_LBAS:
            raise DeviceError(f"namespace of {nsze} LBAs too small")
        self.first_lba, self.chunks = 0, span // CHUNK_LBAS
        self.journal = nvme_journal.Journal(0, span)
        want = self.want_queues - 1
        dw0 = self._admin(ADMIN_SET_FEATURES, cdw10=FEATURE_NUMBER_OF_QUEUES,
                          cdw11=want << 16 | want)  # fmt: skip
        # One vector per I/O queue (vector 0 is the admin queue's).
        count = min(self.want_queues, (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1, vectors - 1)
        if count < 1:
            raise DeviceError("no MSI-X vector left for an I/O queue")
        for qid in range(1, count + 1):
            q = HostQueue(qid, mem.alloc(PAGE_SIZE), mem.alloc(PAGE_SIZE), self.queue_size, qid)
            # CQ first: physically contiguous (PC), interrupts enabled, vector qid.
            self._admin(ADMIN_CREATE_CQ, prp1=q.cq_addr,
                        cdw10=(q.size - 1) << 16 | qid, cdw11=qid << 16 | 0x3)  # fmt: skip
            self._admin(ADMIN_CREATE_SQ, prp1=q.sq_addr,
                        cdw10=(q.size - 1) << 16 | qid, cdw11=qid << 16 | 0x1)  # fmt: skip
            self.ioqs.append(q)
        if self.shadow:
            self.shadow_page, self.eventidx_page = mem.alloc(PAGE_SIZE), mem.alloc(PAGE_SIZE)
            self._admin(ADMIN_DOORBELL_BUFFER_CONFIG, prp1=self.shadow_page,
                        prp2=self.eventidx_page)  # fmt: skip
        slots = count * self.depth
        self.slot_base = mem.alloc(slots * SLOT_PAGES * PAGE_SIZE)
        self.prp_base = mem.alloc(slots * PAGE_SIZE)

    def _enable_msix(self, wanted: int) -> int:
        """MSI-X on in config space, one eventfd per vector (a VMM's irqfds); returns the count."""
        dev = self.dev
        ptr = dev.region_read(PCI_CONFIG_REGION_INDEX, 0x34, 1)[0]
        while ptr:
            cap_id, nxt = dev.region_read(PCI_CONFIG_REGION_INDEX, ptr, 2)
            if cap_id == caps.CAP_ID_MSIX:
                break
            ptr = nxt
        else:
            raise DeviceError("no MSI-X capability")
        flags_at = ptr + caps.MSIX_FLAGS
        table_size = (int.from_bytes(dev.region_read(PCI_CONFIG_REGION_INDEX, flags_at, 2),
                                     "little") & 0x7FF) + 1  # fmt: skip
        vectors = min(wanted, table_size)
        flags = int.from_bytes(dev.region_read(PCI_CONFIG_REGION_INDEX, flags_at, 2), "little")
        dev.region_write(PCI_CONFIG_REGION_INDEX, flags_at,
                         (flags | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little"))  # fmt: skip
        self._wire_eventfds(vectors)
        return vectors

    def _wire_eventfds(self, vectors: int) -> None:
        for fd in self.efds:
            os.close(fd)
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
        # One message carries at most max_msg_fds fds (both ends' limit, 16
        # as QEMU sends): wire the vectors in batches, as QEMU does.
        batch = max(1, min(MAX_MSG_FDS, int(self.dev.server_caps.get("max_msg_fds", 1))))
        for start in range(0, vectors, batch):
            fds = self.efds[start : start + batch]
            self.dev.set_irqs(PCI_MSIX_IRQ_INDEX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                              start, len(fds), fds=fds)  # fmt: skip

    def _admin(self, opcode: int, **fields: int) -> int:
        """One admin command, waited for; returns dw0 (DeviceError on failure)."""
        admin = self.admin
        assert admin is not None
        cid = self.admin_cid = (self.admin_cid + 1) & 0xFFFF
        admin.submit(self.mem, sqe(opcode, cid, **fields))
        self.regs.ring(0, False, admin.sq_tail)
        deadline = time.monotonic() + 5
        while True:
            addr = admin.next_cqe_addr()
            cqe = admin.pop(self.mem)
            if cqe is not None:
                break
            if time.monotonic() > deadline:
                raise DeviceError(f"admin opcode {opcode:#x} never completed")
            self._wait(0.001)
        self.device_pages.add(addr // PAGE_SIZE)
        self.regs.ring(0, True, admin.cq_head)
        if cqe.cid != cid or cqe.status:
            raise DeviceError(f"admin opcode {opcode:#x}: cid {cqe.cid} status {cqe.status:#x}")
        return cqe.dw0

    # --- the I/O loop --------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            # Reap, then refill: the queues are full whenever this returns,
            # as a busy guest's are at any moment a migration may stop it.
            self._reap()
            if not self.quiesced:
                self._fill()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wait(min(left, 0.002))

    def quiesce(self) -> None:
        """Submit nothing more; what the device holds stays (a paused vCPU reaps nothing)."""
        self.quiesced = True
        self.counters["in_flight_at_quiesce"] = len(self.inflight)
        # A round trip: every posted (trapped) doorbell write has reached the
        # device.  Mapped doorbells are plain stores, seen when it next looks;
        # a migration captures them with the state at STOP_COPY.
        self.regs.read32(REG_CSTS)

    def resume(self) -> None:
        self.quiesced = False

    def drain(self, timeout: float = 10.0) -> None:
        """Reap until nothing is in flight (submitting nothing new)."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            self._reap()
            if not self.inflight:
                break
            if time.monotonic() > deadline:
                self._error(f"{len(self.inflight)} commands never completed: "
                            f"{sorted(self.inflight)[:8]}")  # fmt: skip
                self.inflight.clear()
                self.busy.clear()
                break
            self._wait(0.002)
        if self.shadow:
            # Shadow CQ heads written after the controller's last look are not
            # yet acted on; an MMIO write (the admin SQ tail, unchanged) makes
            # it read them now, so its EventIdx updates happen before we return.
            assert self.admin is not None
            self.regs.write32(self.regs.doorbell(0, False), self.admin.sq_tail)

    def _ring(self, q: HostQueue, is_cq: bool, new: int, old: int) -> None:
        """Tell the controller an I/O queue moved: MMIO, or the shadow page and MMIO if asked."""
        if not self.shadow:
            self.regs.ring(q.qid, is_cq, new)
            return
        index = self.regs.stride * (2 * q.qid + int(is_cq))  # the doorbell layout, CAP.DSTRD
        self.mem.store32(self.shadow_page + index, new)
        # The controller reads the shadow value after publishing EventIdx
        # (its fence); reading EventIdx only after our store closes the race.
        event_idx = int.from_bytes(self.mem.read(self.eventidx_page + index, 4), "little")
        if need_event(event_idx, new, old):
            self.regs.ring(q.qid, is_cq, new)

    def _fill(self) -> None:
        for q in self.ioqs:
            before = q.sq_tail
            for cid in range(self.depth):
                if (q.qid, cid) not in self.inflight and not self._issue_random(q, cid):
                    break
            if q.sq_tail != before:
                self._ring(q, False, q.sq_tail, before)

    def _issue_random(self, q: HostQueue, cid: int) -> bool:
        rng = self.rng
        for _ in range(4):  # a few tries for a free chunk; give up when crowded
            chunk = rng.randrange(self.chunks)
            if chunk not in self.busy:
                break
        else:
            return False
        start = rng.choice((0, 0, rng.randrange(CHUNK_LBAS)))
        nlb = rng.randint(1, CHUNK_LBAS - start)
        slba = self.first_lba + chunk * CHUNK_LBAS + start
        offset = rng.choice((0, rng.randrange(0, PAGE_SIZE, 4)))
        write = rng.random() < self.write_ratio
        self._issue(q, cid, Op(write, slba, nlb, 0, offset))
        return True

    def _slot(self, q: HostQueue, cid: int) -> tuple[int, int]:
        """Data buffer and PRP list page of one (queue, cid) slot."""
        index = (q.qid - 1) * self.depth + cid
        return self.slot_base + index * SLOT_PAGES * PAGE_SIZE, self.prp_base + index * PAGE_SIZE

    def _issue(self, q: HostQueue, cid: int, op: Op) -> None:
        buf, prp_list = self._slot(q, cid)
        length = op.nlb * self.lba_size
        data_at = buf + op.offset
        if op.write:
            self.generation = self.generation % nvme_journal.MAX_GENERATION + 1
            op.generation = self.generation
            self.mem.write(data_at, self._pattern(op.slba, op.nlb, op.generation))
        # PRP1 at the data start; the rest of the pages follow in the slot.
        pages = -(-(op.offset + length) // PAGE_SIZE)
        prp2 = 0
        if pages == 2:
            prp2 = buf + PAGE_SIZE
        elif pages > 2:
            entries = [buf + PAGE_SIZE * i for i in range(1, pages)]
            self.mem.write(prp_list, struct.pack(f"<{len(entries)}Q", *entries))
            prp2 = prp_list
        q.submit(self.mem, sqe(IO_WRITE if op.write else IO_READ, cid, nsid=1, prp1=data_at,
                               prp2=prp2, cdw10=op.slba & 0xFFFFFFFF, cdw11=op.slba >> 32,
                               cdw12=op.nlb - 1))  # fmt: skip
        self.inflight[(q.qid, cid)] = op
        self.busy.add((op.slba - self.first_lba) // CHUNK_LBAS)
        self.counters["writes" if op.write else "reads"] += 1

    def _pattern(self, slba: int, nlb: int, generation: int) -> bytes:
        return b"".join(
            nvme_journal.block(self.seed, generation, lba, self.lba_size)
            for lba in range(slba, slba + nlb)
        )

    def _wait(self, timeout: float) -> None:
        """Sleep until an interrupt (or the server asks for DMA), at most ``timeout``."""
        sock = self.dev.sock.fileno()
        ready, _, _ = select.select([*self.efds, sock], [], [], timeout)
        for fd in ready:
            if fd == sock:
                self.dev.poll(0)  # DMA_READ/WRITE for fd-less memory
                continue
            try:
                self.counters["interrupts"] += os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def _reap(self) -> None:
        for q in self.ioqs:
            moved = False
            before = q.cq_head
            while True:
                addr = q.next_cqe_addr()
                cqe = q.pop(self.mem)
                if cqe is None:
                    break
                moved = True
                self.device_pages.add(addr // PAGE_SIZE)
                self._complete(q, cqe)
            if moved:
                self._ring(q, True, q.cq_head, before)
                if self.shadow:
                    # The controller publishes EventIdx whenever it goes idle,
                    # which it did after posting these.
                    self.device_pages.add(self.eventidx_page // PAGE_SIZE)

    def _complete(self, q: HostQueue, cqe: Cqe) -> None:
        self.counters["completions"] += 1
        op = self.inflight.pop((q.qid, cqe.cid), None)
        if op is None or cqe.sqid != q.qid:
            self._error(f"SQ {q.qid}: completion for cid {cqe.cid} (sqid {cqe.sqid}) "
                        "not in flight (lost or duplicated)")  # fmt: skip
            return
        self.busy.discard((op.slba - self.first_lba) // CHUNK_LBAS)
        if cqe.status:
            self._error(f"SQ {q.qid} cid {cqe.cid} {op}: status {cqe.status:#x}")
            return
        length = op.nlb * self.lba_size
        buf, _ = self._slot(q, cqe.cid)
        if op.write:
            self.journal.record(op.slba, op.nlb, op.generation)
            self.counters["written_bytes"] += length
            return
        data_at = buf + op.offset
        first, last = data_at // PAGE_SIZE, (data_at + length - 1) // PAGE_SIZE
        self.device_pages.update(range(first, last + 1))
        self._check(op.slba, self.mem.read(data_at, length))

    def _check(self, slba: int, data: bytes) -> None:
        size = self.lba_size
        for i in range(len(data) // size):
            lba = slba + i
            generation = self.journal[lba]
            if not generation:
                continue  # never written by us: any content is right
            got = data[i * size : (i + 1) * size]
            if got != nvme_journal.block(self.seed, generation, lba, size):
                self._error(f"LBA {lba}: expected generation {generation}, "
                            f"found {nvme_journal.describe(got)}")  # fmt: skip
            else:
                self.counters["verified_bytes"] += size

    def _error(self, text: str) -> None:
        self.counters["mismatches"] += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def take_device_pages(self) -> set[int]:
        """Guest pages (IOVA // 4096) the device wrote for our reaped commands since last call.

        Read data buffers and CQ entries: what DMA_LOGGING_REPORT must show.
        """
        pages, self.device_pages = self.device_pages, set()
        return pages

    # --- checking ----------------------------------------------------------------

    def verify(self) -> None:
        """Drain, read back every LBA with a known pattern, and raise on any difference."""
        self.drain()
        quiesced, self.quiesced = self.quiesced, True
        try:
            gens = self.journal.generations
            pending = [
                c for c in range(self.chunks) if any(gens[c * CHUNK_LBAS : (c + 1) * CHUNK_LBAS])
            ]
            while pending or self.inflight:
                for q in self.ioqs:
                    before = q.sq_tail
                    for cid in range(self.depth):
                        if not pending or (q.qid, cid) in self.inflight:
                            continue
                        slba = self.first_lba + pending.pop() * CHUNK_LBAS
                        self._issue(q, cid, Op(False, slba, CHUNK_LBAS, 0, 0))
                    if q.sq_tail != before:
                        self._ring(q, False, q.sq_tail, before)
                self._wait(0.002)
                self._reap()
                if not pending:
                    self.drain()
        finally:
            self.quiesced = quiesced
        csts = self.regs.read32(REG_CSTS)
        if csts & CSTS_CFS or not csts & CSTS_RDY:
            self._error(f"controller not ready after the run (CSTS {csts:#x})")
        if self.counters["mismatches"]:
            raise WorkloadMismatch(
                f"nvme: {self.counters['mismatches']} mismatches; first: "
                + "; ".join(self.errors[:10])
            )

    def stats(self) -> dict[str, int]:
        return dict(
            self.counters, in_flight=len(self.inflight), lbas_written=self.journal.written()
        )

    # --- migration ------------------------------------------------------------------

    def save(self) -> bytes:
        assert self.admin is not None
        head: dict[str, Any] = {
            "seed": self.seed,
            "depth": self.depth,
            "queue_size": self.queue_size,
            "generation": self.generation,
            "lba_size": self.lba_size,
            "first_lba": self.first_lba,
            "chunks": self.chunks,
            "slot_base": self.slot_base,
            "prp_base": self.prp_base,
            "shadow": [self.shadow_page, self.eventidx_page] if self.shadow else None,
            "admin": self.admin.to_list() + [self.admin_cid],
            "queues": [q.to_list() for q in self.ioqs],
            "inflight": [[qid, cid, *op.to_list()] for (qid, cid), op in self.inflight.items()],
            "counters": self.counters,
            "errors": self.errors,
            "rng": _rng_state(self.rng),
        }
        raw = json.dumps(head, separators=(",", ":")).encode()
        return SAVE_MAGIC + struct.pack("<I", len(raw)) + raw + self.journal.to_bytes()

    def restore(self, data: bytes, dev: Client, mem: GuestMemory) -> None:
        try:
            self._restore(data, mem)
        except (ValueError, KeyError, TypeError, IndexError, RecursionError, struct.error,
                zlib.error) as exc:  # fmt: skip
            raise ValueError(f"nvme workload state unusable: {exc}") from None
        self._dev, self._mem = dev, mem
        if self._regs is not None:
            self._regs.close()  # restored onto the instance that ran on the source
        self._regs = Registers(dev, mmap_doorbells=self.mmap_doorbells)
        csts = self.regs.read32(REG_CSTS)
        if csts & CSTS_CFS or not csts & CSTS_RDY:
            raise DeviceError(f"destination controller not running (CSTS {csts:#x})")
        self._wire_eventfds(len(self.ioqs) + 1)
        self.counters["restores"] += 1
        self.quiesced = False

    def _restore(self, data: bytes, mem: GuestMemory) -> None:
        if not data.startswith(SAVE_MAGIC):
            raise ValueError("not an nvme workload state")
        (length,) = struct.unpack_from("<I", data, len(SAVE_MAGIC))
        start = len(SAVE_MAGIC) + 4
        head = json.loads(data[start : start + length])
        ints = ("seed", "depth", "queue_size", "generation", "lba_size", "first_lba", "chunks",
                "slot_base", "prp_base")  # fmt: skip
        if not isinstance(head, dict) or not all(type(head.get(k)) is int for k in ints):
            raise ValueError("header fields missing")
        if not 1 <= head["depth"] < head["queue_size"] <= PAGE_SIZE // SQE_SIZE:
            raise ValueError("depth / queue size out of range")
        if head["lba_size"] not in (512, 1024, 2048, 4096) or not 0 < head["chunks"] < 1 << 26:
            raise ValueError("namespace geometry out of range")
        admin = HostQueue.from_list(head["admin"][:8], mem, PAGE_SIZE // SQE_SIZE)
        queues = [HostQueue.from_list(r, mem, head["queue_size"]) for r in head["queues"]]
        if [q.qid for q in queues] != list(range(1, len(queues) + 1)) or len(queues) > 1024:
            raise ValueError("queue ids not 1..n")
        slots = len(queues) * head["depth"]
        for base, size in ((head["slot_base"], slots * SLOT_PAGES * PAGE_SIZE),
                           (head["prp_base"], slots * PAGE_SIZE)):  # fmt: skip
            if base < mem.base or base + size > mem.end:
                raise ValueError("buffers outside guest memory")
        span = head["chunks"] * CHUNK_LBAS
        journal = nvme_journal.Journal.from_bytes(head["first_lba"], span, data[start + length :])
        inflight: dict[tuple[int, int], Op] = {}
        for raw in head["inflight"]:
            if not isinstance(raw, list) or not all(type(v) is int for v in raw):
                raise ValueError(f"in-flight command {raw!r}")
            qid, cid, write, slba, nlb, generation, offset = raw
            op = Op(bool(write), slba, nlb, generation, offset)
            if not (1 <= qid <= len(queues) and 0 <= cid < head["depth"]
                    and head["first_lba"] <= slba and 1 <= nlb <= CHUNK_LBAS
                    and slba + nlb <= head["first_lba"] + span
                    and 0 <= offset < PAGE_SIZE):  # fmt: skip
                raise ValueError(f"in-flight command {raw!r} out of range")
            inflight[(qid, cid)] = op
        shadow = head["shadow"]
        if shadow is not None:
            if not isinstance(shadow, list) or len(shadow) != 2:
                raise ValueError("shadow doorbell pages")
            for addr in shadow:
                if type(addr) is not int or addr % PAGE_SIZE or not mem.base <= addr < mem.end:
                    raise ValueError("shadow doorbell page outside guest memory")
        counters = head["counters"]
        if set(counters) != set(self.counters) or not all(
            type(v) is int for v in counters.values()
        ):
            raise ValueError("counters")
        # Everything checked: take it.
        for key in ints:
            setattr(self, key, head[key])
        self.admin, self.admin_cid = admin, int(head["admin"][8]) & 0xFFFF
        self.ioqs = queues
        self.shadow = shadow is not None
        self.shadow_page, self.eventidx_page = shadow or (0, 0)
        self.journal = journal
        self.inflight = inflight
        self.busy = {(op.slba - self.first_lba) // CHUNK_LBAS for op in inflight.values()}
        self.counters = counters
        self.errors = [str(e) for e in head["errors"]][:MAX_ERRORS]
        self.rng.setstate(_rng_from(head["rng"]))

    def close(self) -> None:
        for fd in self.efds:
            os.close(fd)
        self.efds = []
        if self._regs is not None:
            self._regs.close()


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(raw: Any) -> tuple[Any, ...]:
    version, internal, gauss = raw
    if not isinstance(internal, list) or len(internal) != 625:
        raise ValueError("random generator state")
    return (version, tuple(int(v) for v in internal), gauss)


try:
    from mdevcore.migration import workload as _contract
except ImportError:
    pass
else:
    _contract.register("nvme", NvmeWorkload)
