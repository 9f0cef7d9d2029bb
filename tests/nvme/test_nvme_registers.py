"""Controller registers: CAP/VS, enable/disable, shutdown, resets, INTMS/INTMC."""

from __future__ import annotations

import struct

from nvme_host import GuestMemory, Host

from mdevcore.nvme import NvmeController
from mdevcore.nvme.controller import MPS_MAX
from mdevcore.nvme.queues import make_command
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
