"""Capability lists: PM, MSI, MSI-X, PCI Express, SR-IOV (extended)."""

from __future__ import annotations

import errno

import pytest
from pcitest_helpers import CFG, PlainDevice, cfg_read, cfg_write

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.pci.device import BarKind, PciDevice, PciIdentity


def walk(dev: PciDevice) -> list[tuple[int, int]]:
    """Follow the list through region reads, as a guest would."""
    found = []
    ptr = cfg_read(dev, cfg.CAPABILITY_LIST, 1)
    while ptr:
        found.append((ptr, cfg_read(dev, ptr, 1)))
        ptr = cfg_read(dev, ptr + 1, 1)
    return found


def test_capability_list_walk() -> None:
    dev = PlainDevice(express=True)
    chain = walk(dev)
    assert [cap_id for _, cap_id in chain] == [
        caps.CAP_ID_PM, caps.CAP_ID_MSI, caps.CAP_ID_MSIX, caps.CAP_ID_EXP
    ]  # fmt: skip
    offsets = [off for off, _ in chain]
    assert offsets == sorted(offsets) and all(off % 4 == 0 and off >= 0x40 for off in offsets)
    assert offsets == [dev.pm, dev.msi_off, dev.msix_off, dev.exp]


def test_no_capabilities() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    assert cfg_read(dev, cfg.CAPABILITY_LIST, 1) == 0
    assert not cfg_read(dev, cfg.STATUS, 2) & cfg.STATUS_CAP_LIST


def test_pm_registers() -> None:
    dev = PlainDevice()
    ctrl = dev.pm + caps.PM_CTRL
    assert cfg_read(dev, dev.pm + caps.PM_PMC, 2) & 0x7 == 3
    cfg_write(dev, ctrl, 0x3, 2)  # D3hot
    assert cfg_read(dev, ctrl, 2) & 0x3 == 3
    cfg_write(dev, ctrl, 0x0, 2)
    assert cfg_read(dev, ctrl, 2) & 0x3 == 0
    assert cfg_read(dev, ctrl, 2) & caps.PM_CTRL_NO_SOFT_RESET


def test_msi_layout_64bit_masking() -> None:
    dev = PlainDevice()
    off = dev.msi_off
    flags = cfg_read(dev, off + caps.MSI_FLAGS, 2)
    assert (flags >> 1) & 7 == 2  # 4 vectors
    assert flags & caps.MSI_FLAGS_64BIT and flags & caps.MSI_FLAGS_MASKBIT
    cfg_write(dev, off + caps.MSI_FLAGS, 0xFFFF, 2)
    assert cfg_read(dev, off + caps.MSI_FLAGS, 2) == flags | 0x71  # enable + MME
    cfg_write(dev, off + 4, 0xFEE00003, 4)
    assert cfg_read(dev, off + 4, 4) == 0xFEE00000  # dword aligned address
    cfg_write(dev, off + 8, 0x1, 4)
    assert cfg_read(dev, off + 8, 4) == 1
    cfg_write(dev, off + 12, 0xABCD, 2)
    assert cfg_read(dev, off + 12, 2) == 0xABCD
    cfg_write(dev, off + 16, 0xFFFFFFFF, 4)
    assert cfg_read(dev, off + 16, 4) == 0xF  # only 4 vectors' mask bits
    assert dev.irq_info(1).count == 4


def test_msi_32bit_without_mask() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    off = dev.add_msi(1, addr64=False)
    flags = cfg_read(dev, off + caps.MSI_FLAGS, 2)
    assert not flags & (caps.MSI_FLAGS_64BIT | caps.MSI_FLAGS_MASKBIT)
    cfg_write(dev, off + 8, 0x4321, 2)  # data right after the 32-bit address
    assert cfg_read(dev, off + 8, 2) == 0x4321
    with pytest.raises(ValueError):
        dev.add_msi(1)
    with pytest.raises(ValueError):
        PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0)).add_msi(3)


def test_msix_layout() -> None:
    dev = PlainDevice()
    off = dev.msix_off
    ctrl = cfg_read(dev, off + caps.MSIX_FLAGS, 2)
    assert ctrl & 0x7FF == 7  # table size - 1
    assert cfg_read(dev, off + caps.MSIX_TABLE, 4) == 0x0 | 4  # offset 0, BIR 4
    assert cfg_read(dev, off + caps.MSIX_PBA, 4) == 0x1000 | 4
    cfg_write(dev, off + caps.MSIX_FLAGS, 0xFFFF, 2)
    assert cfg_read(dev, off + caps.MSIX_FLAGS, 2) == 0xC007  # enable + mask-all writable
    assert dev.irq_info(2).count == 8
    # Table entries start masked; address/data read back through the BAR.
    assert dev.region_read(4, 12, 4) == (1).to_bytes(4, "little")
    dev.region_write(4, 16, (0xFEE00000).to_bytes(4, "little"))
    assert dev.region_read(4, 16, 4) == (0xFEE00000).to_bytes(4, "little")
    assert dev.region_read(4, 0x1000, 8) == bytes(8)  # PBA


@pytest.mark.parametrize(
    "kwargs",
    [dict(table_bar=1, table_offset=0, pba_bar=4, pba_offset=0x1000),  # I/O BAR
     dict(table_bar=3, table_offset=0, pba_bar=4, pba_offset=0x1000),  # absent BAR
     dict(table_bar=4, table_offset=0x1F90, pba_bar=4, pba_offset=0),  # beyond the BAR
     dict(table_bar=4, table_offset=0, pba_bar=4, pba_offset=0x40),  # overlap
     dict(table_bar=4, table_offset=4, pba_bar=4, pba_offset=0x1000)],  # unaligned
)  # fmt: skip
def test_msix_bad_layouts(kwargs: dict[str, int]) -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    dev.add_bar(1, 8, BarKind.IO)
    dev.add_bar(4, 0x2000)
    with pytest.raises(ValueError):
        dev.add_msix(8, **kwargs)


def test_express_makes_config_4k_and_endpoint() -> None:
    dev = PlainDevice(express=True)
    assert dev.region_info(CFG).size == 4096
    flags = cfg_read(dev, dev.exp + caps.EXP_FLAGS, 2)
    assert flags & 0xF == 2 and (flags >> 4) & 0xF == 0  # v2, endpoint
    assert cfg_read(dev, dev.exp + caps.EXP_DEVCAP, 4) & caps.EXP_DEVCAP_FLR
    assert cfg_read(dev, dev.exp + caps.EXP_LNKSTA, 2) == 0x11  # 2.5 GT/s x1
    assert cfg_read(dev, 0x100, 4) == 0  # no extended capabilities
    assert dev.region_read(CFG, 4095, 1) == b"\0"


def test_flr_through_device_control() -> None:
    dev = PlainDevice(express=True)
    cfg_write(dev, cfg.BAR0, 0xFEB00000, 4)
    cfg_write(dev, dev.pm + caps.PM_CTRL, 3, 2)
    devctl = dev.exp + caps.EXP_DEVCTL
    cfg_write(dev, devctl, cfg_read(dev, devctl, 2) | caps.EXP_DEVCTL_BCR_FLR, 2)
    assert dev.resets == 1
    assert not cfg_read(dev, devctl, 2) & caps.EXP_DEVCTL_BCR_FLR
    assert cfg_read(dev, cfg.BAR0, 4) == 0  # FLR resets the whole function
    assert cfg_read(dev, dev.pm + caps.PM_CTRL, 2) & 3 == 0


class SriovDevice(PciDevice):
    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1DD8, device_id=0x1002, class_code=0x010802))
        self.add_express()
        self.sriov_off = self.add_sriov(total_vfs=4, vf_offset=1, vf_stride=1, vf_device_id=0x1003)
        self.changes: list[tuple[int, bool]] = []

    def on_sriov_change(self, num_vfs: int, vf_enable: bool) -> None:
        self.changes.append((num_vfs, vf_enable))


def test_sriov_extended_capability() -> None:
    dev = SriovDevice()
    off = dev.sriov_off
    assert off == 0x100
    header = cfg_read(dev, off, 4)
    assert header & 0xFFFF == caps.EXT_CAP_ID_SRIOV and (header >> 16) & 0xF == 1
    assert header >> 20 == 0  # last in the list
    assert cfg_read(dev, off + caps.SRIOV_TOTAL_VF, 2) == 4
    assert cfg_read(dev, off + caps.SRIOV_INITIAL_VF, 2) == 4
    assert cfg_read(dev, off + caps.SRIOV_VF_OFFSET, 2) == 1
    assert cfg_read(dev, off + caps.SRIOV_VF_STRIDE, 2) == 1
    assert cfg_read(dev, off + caps.SRIOV_VF_DID, 2) == 0x1003
    cfg_write(dev, off + caps.SRIOV_TOTAL_VF, 9, 2)
    assert cfg_read(dev, off + caps.SRIOV_TOTAL_VF, 2) == 4


def test_sriov_numvfs_and_enable_reach_the_parent() -> None:
    dev = SriovDevice()
    off = dev.sriov_off
    cfg_write(dev, off + caps.SRIOV_NUM_VF, 5, 2)  # beyond TotalVFs: refused
    assert cfg_read(dev, off + caps.SRIOV_NUM_VF, 2) == 0 and dev.changes == []
    cfg_write(dev, off + caps.SRIOV_NUM_VF, 2, 2)
    cfg_write(dev, off + caps.SRIOV_CTRL, caps.SRIOV_CTRL_VFE | caps.SRIOV_CTRL_MSE, 2)
    assert dev.changes == [(2, False), (2, True)]
    assert dev.sriov_state == (2, True)
    cfg_write(dev, off + caps.SRIOV_NUM_VF, 3, 2)  # while enabled: refused
    assert cfg_read(dev, off + caps.SRIOV_NUM_VF, 2) == 2
    cfg_write(dev, off + caps.SRIOV_CTRL, 0, 2)
    assert dev.changes[-1] == (2, False)


def test_extended_list_walk_with_two_caps() -> None:
    dev = SriovDevice()
    second = caps.add_ext_cap(dev.config, 0x000B, 1, 0x10)  # a vendor-specific one
    found = caps.extended_capability_offsets(dev.config)
    assert found == [(0x100, caps.EXT_CAP_ID_SRIOV), (second, 0x000B)]
    assert cfg_read(dev, 0x100, 4) >> 20 == second


def test_sriov_needs_express() -> None:
    dev = PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0))
    with pytest.raises(ValueError):
        dev.add_sriov(total_vfs=1, vf_offset=1, vf_stride=1, vf_device_id=3)


def test_host_side_sriov_configure() -> None:
    dev = SriovDevice()
    off = dev.sriov_off
    for bad, err in ((5, errno.ERANGE), (-1, errno.ERANGE)):
        with pytest.raises(OSError) as info:
            dev.sriov_configure(bad)
        assert info.value.errno == err
    dev.sriov_configure(3)
    assert dev.changes == [(3, True)] and dev.sriov_state == (3, True)
    assert cfg_read(dev, off + caps.SRIOV_NUM_VF, 2) == 3
    assert cfg_read(dev, off + caps.SRIOV_CTRL, 2) & caps.SRIOV_CTRL_VFE
    dev.sriov_configure(3)  # same count: nothing happens
    with pytest.raises(OSError) as info:
        dev.sriov_configure(2)
    assert info.value.errno == errno.EBUSY
    dev.sriov_configure(0)
    assert dev.changes[-1] == (3, False)
    assert not cfg_read(dev, off + caps.SRIOV_CTRL, 2) & caps.SRIOV_CTRL_VFE
    dev.sriov_configure(1)
    assert dev.changes[-1] == (1, True)
    with pytest.raises(OSError) as info:
        PciDevice(PciIdentity(vendor_id=1, device_id=2, class_code=0)).sriov_configure(1)
    assert info.value.errno == errno.ENOENT
