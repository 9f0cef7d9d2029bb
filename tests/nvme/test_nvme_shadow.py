"""Shadow doorbells: the host rings MMIO only when the controller's EventIdx asks."""

from __future__ import annotations

import struct

from nvme_host import PAGE, GuestMemory, Host, status

from mdevcore.nvme import NvmeController
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import DOORBELL_BASE, AdminOpcode, Generic, IoOpcode, StatusType


def need_event(event_idx: int, new: int, old: int) -> bool:
    """The host's rule (as in Linux): ring if EventIdx lies in [old, new)."""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


class ShadowHost(Host):
    """Writes I/O doorbells to the shadow page; MMIO only when EventIdx says so."""

    def __init__(self, ctrl: NvmeController, mem: GuestMemory) -> None:
        super().__init__(ctrl, mem)
        self.dbs = mem.alloc(PAGE)
        self.eventidx = mem.alloc(PAGE)
        self.mmio_rings = 0

    def configure(self) -> int:
        return self.admin(
            AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=self.dbs, prp2=self.eventidx
        ).status

    def ring(self, index: int, value: int) -> None:
        if index < 2:  # the admin queue keeps MMIO doorbells
            super().ring(index, value)
            return
        old = struct.unpack("<I", self.mem.read(self.dbs + 4 * index, 4))[0]
        self.mem.write(self.dbs + 4 * index, struct.pack("<I", value))
        event = struct.unpack("<I", self.mem.read(self.eventidx + 4 * index, 4))[0]
        if need_event(event, value, old):
            self.mmio_rings += 1
            self.ctrl.mmio_write(DOORBELL_BASE + 4 * index, struct.pack("<I", value))

    def event_index(self, index: int) -> int:
        return int(struct.unpack("<I", self.mem.read(self.eventidx + 4 * index, 4))[0])


def test_identify_offers_doorbell_buffer_config(host: Host) -> None:
    buf = host.mem.alloc(PAGE)
    assert host.admin(AdminOpcode.IDENTIFY, prp1=buf, cdw10=1).status == 0
    assert struct.unpack("<H", host.mem.read(buf + 256, 2))[0] & 1 << 8


def test_doorbell_buffer_config_checks_its_pages(host: Host, mem: GuestMemory) -> None:
    page = mem.alloc(PAGE)
    bad = status(StatusType.GENERIC, Generic.INVALID_FIELD)
    assert host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=0, prp2=page).status == bad
    assert host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=page + 8, prp2=page).status == bad
    outside = mem.base + mem.size
    cqe = host.admin(AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=page, prp2=outside)
    assert cqe.status == status(StatusType.GENERIC, Generic.DATA_TRANSFER_ERROR)
    assert host.ctrl.shadow is None


def test_submissions_ring_only_when_the_controller_is_idle(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    host.create_io_queue_pair(1, size=16)
    assert host.event_index(2) == 0  # SQ 1: ring on the first submission
    # one at a time, controller idle in between: every submission rings
    for _ in range(3):
        assert host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
    assert host.mmio_rings == 3
    assert host.event_index(2) == 3  # consumed up to tail 3
    # a burst while the controller is busy: only the first rings
    host.mmio_rings = 0
    sent = [host.submit(1, make_command(IoOpcode.FLUSH, nsid=1)).cid for _ in range(5)]
    assert host.mmio_rings == 1
    host.run()
    assert [c.cid for c in host.reap(1)] == sent
    # CQ head updates needed no MMIO at all while the CQ had room
    assert host.mmio_rings == 1


def test_controller_reads_shadow_tail_it_was_not_told_about(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    host.create_io_queue_pair(1, size=16)
    first = host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))  # rings
    # the host writes a second tail before the controller ran: no ring, yet it is served
    second = host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
    assert host.mmio_rings == 1
    host.run()
    assert [c.cid for c in host.reap(1)] == [first.cid, second.cid]


def test_full_cq_asks_for_a_head_ring(ctrl: NvmeController, mem: GuestMemory) -> None:
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    host.create_io_queue_pair(1, size=4)
    for _ in range(3):
        host.submit(1, make_command(IoOpcode.FLUSH, nsid=1), ring=False)
    host.ring(2, host.queues[1].sq_tail)
    host.run()
    assert ctrl.cqs[1].full
    assert host.event_index(3) == ctrl.cqs[1].head  # CQ 1 head: ring me on the next move
    rings = host.mmio_rings
    assert len(host.reap(1)) == 3
    assert host.mmio_rings == rings + 1


def test_reset_forgets_the_shadow_buffers(ctrl: NvmeController, mem: GuestMemory) -> None:
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    host.write32(0x14, 0)
    assert ctrl.shadow is None


def test_pin_based_interrupts_want_every_head_update(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    ctrl.level_irq = lambda: True  # INTx: the head update re-evaluates the line
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    host.create_io_queue_pair(1, size=16)
    for _ in range(3):
        assert host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
    assert host.mmio_rings == 6  # tail and head, each time


def test_queue_creation_failing_on_eventidx_creates_nothing(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    host = ShadowHost(ctrl, mem)
    host.enable()
    assert host.configure() == 0
    mem.holes.append((host.eventidx, PAGE))  # the guest unmapped its EventIdx page
    cq, sq = mem.alloc(PAGE), mem.alloc(PAGE)
    failed = status(StatusType.GENERIC, Generic.DATA_TRANSFER_ERROR)
    cqe = host.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=15 << 16 | 1, cdw11=1 << 16 | 3)
    assert cqe.status == failed
    assert 1 not in ctrl.cqs  # a failed create leaves no queue behind
    mem.holes.clear()
    cqe = host.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=15 << 16 | 1, cdw11=1 << 16 | 3)
    assert cqe.status == 0
    mem.holes.append((host.eventidx, PAGE))
    cqe = host.admin(AdminOpcode.CREATE_IO_SQ, prp1=sq, cdw10=15 << 16 | 1, cdw11=1 << 16 | 1)
    assert cqe.status == failed
    assert 1 not in ctrl.sqs and not ctrl.cqs[1].sqids


def test_an_idle_controller_leaves_eventidx_clean(host: Host, mem: GuestMemory) -> None:
    """EventIdx is written only when it changes: no dirty page per idle pass (migration)."""
    marks: list[tuple[int, int]] = []
    mem.mark_dirty = lambda iova, length: marks.append((iova, length))  # type: ignore[method-assign]
    shadow = ShadowHost(host.ctrl, mem)
    shadow.queues = host.queues
    assert shadow.configure() == 0
    shadow.create_io_queue_pair(1, size=8)
    buf = mem.alloc(PAGE)
    assert shadow.command(1, make_command(IoOpcode.READ, nsid=1, prp1=buf, cdw12=7)).status == 0
    passes = []
    for _ in range(3):
        marks.clear()
        host.ctrl.mmio_write(DOORBELL_BASE, struct.pack("<I", shadow.queues[0].sq_tail))
        host.run()
        passes.append(list(marks))
    # The first idle pass takes in the CQ head the host wrote after reaping;
    # the next ones find nothing changed and write nothing.
    assert passes[0] == [(shadow.eventidx + 4 * 3, 4)]
    assert passes[1:] == [[], []]
    assert shadow.command(1, make_command(IoOpcode.READ, nsid=1, prp1=buf, cdw12=7)).status == 0
    assert any(shadow.eventidx <= iova < shadow.eventidx + PAGE for iova, _ in marks)
    assert any(buf <= iova < buf + PAGE for iova, _ in marks)  # the read data
