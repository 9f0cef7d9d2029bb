"""Controller registers: CAP/VS, enable/disable, shutdown, resets, INTMS/INTMC."""

from __future__ import annotations

import struct

import pytest
from nvme_host import GuestMemory, Host

from mdevcore.nvme import NvmeController
from mdevcore.nvme.controller import MPS_MAX
from mdevcore.nvme.queues import Command, make_command
from mdevcore.nvme.spec import (
    CC_EN,
    CSTS_CFS,
    CSTS_NSSRO,
    CSTS_RDY,
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
    REG_VS,
    AdminOpcode,
    IoOpcode,
)


def test_cap_and_version(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    cap = h.read64(REG_CAP)
    assert cap & 0xFFFF == 255  # MQES, 0-based
    assert cap >> 16 & 1 == 1  # CQR
    assert cap >> 24 & 0xFF > 0  # TO
    assert cap >> 32 & 0xF == 0  # DSTRD
    assert cap >> 37 & 1 == 1  # CSS: NVM
    assert cap >> 48 & 0xF == 0  # MPSMIN 4 KiB
    assert cap >> 52 & 0xF == MPS_MAX  # MPSMAX: up to 2 ** (12 + MPS_MAX) bytes
    # the same value read as two dwords
    assert h.read32(REG_CAP) | h.read32(REG_CAP + 4) << 32 == cap
    assert h.read32(REG_VS) == 0x00010400
    assert ctrl.mmio_read(0x3F0, 4) == bytes(4)


def test_enable_sets_ready_and_disable_resets(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    assert h.read32(REG_CSTS) & CSTS_RDY == 0
    h.enable()
    assert h.read32(REG_CSTS) & CSTS_RDY
    assert h.admin(AdminOpcode.KEEP_ALIVE).status == 0
    h.create_io_queue_pair(1)
    assert set(ctrl.sqs) == {0, 1}
    aqa = h.read32(REG_AQA)
    h.write32(REG_CC, h.read32(REG_CC) & ~CC_EN)
    assert h.read32(REG_CSTS) & CSTS_RDY == 0
    assert not ctrl.sqs and not ctrl.cqs
    # AQA/ASQ/ACQ survive a controller reset; the host can enable again
    assert h.read32(REG_AQA) == aqa
    h.enable()
    assert ctrl.ready and set(ctrl.sqs) == {0}
    assert h.admin(AdminOpcode.KEEP_ALIVE).status == 0


def test_split_64bit_admin_queue_writes(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    h.write32(REG_ASQ, 0x12345000)
    h.write32(REG_ASQ + 4, 0x1)
    h.write64(REG_ACQ, 0xABC123)  # reserved low 12 bits are dropped
    assert h.read64(REG_ASQ) == 0x1_12345000
    assert h.read64(REG_ACQ) == 0xABC000


def test_enable_without_admin_queue_fails(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    h.write32(REG_CC, CC_EN)
    csts = h.read32(REG_CSTS)
    assert csts & CSTS_CFS and not csts & CSTS_RDY


def test_enable_with_bad_page_size_fails(ctrl: NvmeController, mem: GuestMemory) -> None:
    h = Host(ctrl, mem)
    h.enable(cc_extra=0xF << 7)
    assert h.read32(REG_CSTS) & CSTS_CFS
    assert not ctrl.ready


def test_shutdown_notification(host: Host) -> None:
    host.write32(REG_CC, host.read32(REG_CC) | 1 << 14)
    assert host.read32(REG_CSTS) >> 2 & 3 == 2  # SHST: complete
    host.write32(REG_CC, host.read32(REG_CC) & ~(3 << 14) & ~CC_EN)
    assert host.read32(REG_CSTS) >> 2 & 3 == 0


def test_conventional_reset_clears_everything(host: Host, ctrl: NvmeController) -> None:
    ctrl.reset()
    assert host.read32(REG_CC) == 0 and host.read32(REG_AQA) == 0 and host.read64(REG_ASQ) == 0
    assert host.read32(REG_CSTS) == 0


def test_subsystem_reset(host: Host, ctrl: NvmeController) -> None:
    host.write32(REG_NSSR, 0x1234)  # wrong value: nothing happens
    assert ctrl.ready
    host.write32(REG_NSSR, NSSR_RESET_VALUE)
    assert not ctrl.ready
    assert host.read32(REG_CSTS) & CSTS_NSSRO


def test_intms_masks_and_intmc_releases(host: Host, irqs: list[int]) -> None:
    host.write32(REG_INTMS, 0b1)
    assert host.read32(REG_INTMS) == 1 and host.read32(REG_INTMC) == 1
    irqs.clear()
    host.submit(0, make_command(AdminOpcode.KEEP_ALIVE))
    host.run()
    assert irqs == []  # masked: held pending
    host.write32(REG_INTMC, 0b1)
    assert irqs == [0]
    assert host.read32(REG_INTMS) == 0
    assert len(host.reap(0)) == 1


def test_doorbell_write_of_wrong_width_is_ignored(host: Host, ctrl: NvmeController) -> None:
    host.submit(0, make_command(AdminOpcode.KEEP_ALIVE), ring=False)
    assert ctrl.mmio_write(0x1000, struct.pack("<H", 1)) is False
    host.run()
    assert host.reap(0) == []


# --- BAR0 against the NVMe base specification ---------------------------------

INVALID_DOORBELL_REGISTER_EVENT = 0x01_00_00  # log page 01h, info 00h, type error
INVALID_DOORBELL_VALUE_EVENT = 0x01_01_00  # log page 01h, info 01h, type error


def outstanding_aer(host: Host) -> Command:
    aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    assert host.reap(0) == []  # held until an event comes
    return aer


def event_dw0(host: Host, aer: Command) -> int:
    host.run()
    done = host.reap(0)
    assert [c.cid for c in done] == [aer.cid]
    return done[0].dw0


@pytest.mark.parametrize(
    "bar_offset",
    [
        0x1000 + 8 * 9,  # SQ 9: within the first page, not created
        0x2000,  # SQ 512: the first doorbell of the second page
        0x2004,  # CQ 512
        0x3FFC,  # CQ 1535: the last dword of the 16 KiB BAR
    ],
)
def test_doorbell_of_missing_queue_raises_invalid_doorbell_register(
    io_host: Host, ctrl: NvmeController, bar_offset: int
) -> None:
    aer = outstanding_aer(io_host)
    assert ctrl.mmio_write(bar_offset, struct.pack("<I", 1)) is True
    assert event_dw0(io_host, aer) == INVALID_DOORBELL_REGISTER_EVENT
    # the controller carries on: the existing queues still work
    assert io_host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0


def test_doorbells_beyond_the_first_page_while_disabled_do_nothing(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    # No controller, no queues, no event to report to: the write is dropped.
    assert ctrl.mmio_write(0x2000, struct.pack("<I", 1)) is False
    assert not ctrl.events.queued
    h = Host(ctrl, mem)
    h.enable()
    assert not ctrl.events.queued


def test_sq_tail_beyond_queue_size_raises_invalid_doorbell_value(io_host: Host) -> None:
    aer = outstanding_aer(io_host)
    io_host.ring(2, 16)  # SQ 1 has 16 entries: tails are 0..15
    assert event_dw0(io_host, aer) == INVALID_DOORBELL_VALUE_EVENT
    assert io_host.ctrl.sqs[1].tail == 0  # ignored


def test_cq_head_beyond_the_posted_entries_raises_invalid_doorbell_value(io_host: Host) -> None:
    ctrl = io_host.ctrl
    io_host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
    io_host.run()
    assert ctrl.cqs[1].tail == 1
    aer = outstanding_aer(io_host)
    # one entry posted: head 1 is fine, head 3 would free slots never filled
    io_host.ring(3, 3)
    assert event_dw0(io_host, aer) == INVALID_DOORBELL_VALUE_EVENT
    assert ctrl.cqs[1].head == 0
    io_host.ring(3, 1)
    io_host.run()
    assert ctrl.cqs[1].head == 1


def test_sq_tail_moved_back_over_pending_entries_raises_invalid_doorbell_value(
    io_host: Host,
) -> None:
    ctrl = io_host.ctrl
    aer = outstanding_aer(io_host)
    sent = [io_host.submit(1, make_command(IoOpcode.FLUSH, nsid=1), ring=False) for _ in range(5)]
    io_host.ring(2, 5)
    ctrl.process(budget=0)  # tail latched, nothing fetched yet
    assert (ctrl.sqs[1].head, ctrl.sqs[1].tail) == (0, 5)
    io_host.ring(2, 2)  # takes three submitted commands back
    ctrl.process(budget=0)
    assert event_dw0(io_host, aer) == INVALID_DOORBELL_VALUE_EVENT
    assert ctrl.sqs[1].tail == 5
    io_host.ring(2, 5)  # the host puts it right: the five run
    io_host.run()
    assert [c.cid for c in io_host.reap(1)] == [c.cid for c in sent]


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        (0x1000, b"\x01\x00"),  # doorbell, 16 bits
        (0x1002, b"\x01\x00\x00\x00"),  # doorbell, not dword-aligned
        (0x1000, struct.pack("<Q", 1)),  # doorbell, 64 bits
    ],
)
def test_doorbell_access_that_is_not_a_dword_is_ignored(
    host: Host, ctrl: NvmeController, offset: int, data: bytes
) -> None:
    host.submit(0, make_command(AdminOpcode.KEEP_ALIVE), ring=False)
    assert ctrl.mmio_write(offset, data) is False
    host.run()
    assert host.reap(0) == [] and not ctrl.events.queued


def register_file(ctrl: NvmeController) -> bytes:
    return b"".join(ctrl.mmio_read(offset, 4) for offset in range(0, 0x38, 4))


def test_reserved_and_optional_registers_read_zero_and_ignore_writes(
    host: Host, ctrl: NvmeController
) -> None:
    # 0x18 (reserved), 0x38-0xFFF: CMBLOC/CMBSZ (no CMB), BPINFO/BPRSEL/BPMBL
    # (no boot partitions), CMBMSC/CMBSTS, PMR registers (no PMR), reserved,
    # command set specific.  All zero, none of them writable.
    before = register_file(ctrl)
    for offset in [0x18, *range(0x38, 0x1000, 4)]:
        host.write32(offset, 0xFFFFFFFF)
        assert host.read32(offset) == 0, hex(offset)
    for offset in (0x48, 0x50):  # BPMBL, CMBMSC: 64-bit when implemented
        host.write64(offset, 2**64 - 1)
        assert ctrl.mmio_read(offset, 8) == bytes(8)
    assert register_file(ctrl) == before
    assert ctrl.ready and host.admin(AdminOpcode.KEEP_ALIVE).status == 0


def test_read_only_registers_ignore_writes(host: Host, ctrl: NvmeController) -> None:
    cap, vs, csts = host.read64(REG_CAP), host.read32(REG_VS), host.read32(REG_CSTS)
    host.write64(REG_CAP, 0)
    host.write32(REG_CAP + 4, 0)
    host.write32(REG_VS, 0)
    host.write32(REG_CSTS, 0)  # RDY, CFS, SHST are the controller's
    host.write32(REG_CSTS, 0xFFFFFFEF)  # every bit but NSSRO
    assert (host.read64(REG_CAP), host.read32(REG_VS), host.read32(REG_CSTS)) == (cap, vs, csts)
    assert ctrl.ready


def test_nssro_is_write_one_to_clear(host: Host, ctrl: NvmeController) -> None:
    host.write32(REG_NSSR, NSSR_RESET_VALUE)
    assert host.read32(REG_CSTS) & CSTS_NSSRO
    host.write32(REG_CSTS, 0)  # writing 0 leaves it
    assert host.read32(REG_CSTS) & CSTS_NSSRO
    host.write32(REG_CSTS, CSTS_NSSRO)
    assert host.read32(REG_CSTS) == 0


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (REG_CAP, 2),  # narrower than the register
        (REG_CAP, 1),
        (REG_VS + 1, 4),  # not aligned
        (REG_CC, 8),  # a qword over two dword registers
        (REG_ASQ + 4, 8),  # a qword not on a 64-bit register
    ],
)
def test_register_reads_of_the_wrong_width_return_zero(
    host: Host, ctrl: NvmeController, offset: int, size: int
) -> None:
    assert host.read64(REG_CAP) and host.read32(REG_CC)
    assert ctrl.mmio_read(offset, size) == bytes(size)


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        (REG_CC, b"\x00"),  # one byte of CC: would clear EN
        (REG_CC, b"\x00\x00"),
        (REG_CC + 1, b"\x00\x00\x00\x00"),  # not aligned
        (REG_INTMC - 4, struct.pack("<Q", 0)),  # a qword over INTMS/INTMC... not 64-bit
        (REG_CC, struct.pack("<Q", 0)),  # a qword over CC and the reserved dword
        (REG_NSSR, struct.pack("<Q", NSSR_RESET_VALUE)),  # NSSR + AQA as one qword
    ],
)
def test_register_writes_of_the_wrong_width_change_nothing(
    host: Host, ctrl: NvmeController, offset: int, data: bytes
) -> None:
    before = register_file(ctrl)
    assert ctrl.mmio_write(offset, data) is False
    assert register_file(ctrl) == before
    assert ctrl.ready


def test_64bit_register_written_as_one_qword_or_two_dwords(
    ctrl: NvmeController, mem: GuestMemory
) -> None:
    h = Host(ctrl, mem)
    h.write64(REG_ASQ, 0x0000_0002_3456_7000)
    h.write32(REG_ACQ + 4, 0x3)
    h.write32(REG_ACQ, 0x9000)
    assert h.read64(REG_ASQ) == 0x2_3456_7000
    assert h.read32(REG_ASQ) == 0x3456_7000 and h.read32(REG_ASQ + 4) == 2
    assert h.read64(REG_ACQ) == 0x3_0000_9000
