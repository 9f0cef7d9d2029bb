"""PCI capabilities and PCI Express extended capabilities in config space.

Each ``add_*`` function writes one capability's registers with their write
masks into a :class:`ConfigSpace`, links it at the end of the list and
returns its offset.  Layouts follow the PCI Local Bus / PCI Express specs;
offsets are relative to the capability start.
"""

from __future__ import annotations

import dataclasses

from mdevcore.pci import config as cfg
from mdevcore.pci.config import ConfigSpace

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

EXT_CAP_ID_SRIOV = 0x0010
EXT_CAP_START = 0x100

# PM: capabilities (u16 @2), control/status (u16 @4).
PM_PMC = 2
PM_CTRL = 4
PM_SIZE = 8
PM_CTRL_STATE_MASK = 0x0003
PM_CTRL_NO_SOFT_RESET = 1 << 3
PM_CTRL_PME_ENABLE = 1 << 8
PM_CTRL_PME_STATUS = 1 << 15

# MSI: control (u16 @2), address (u32 @4), [address hi (u32 @8)], data,
# [mask bits, pending bits].
MSI_FLAGS = 2
MSI_ADDRESS_LO = 4
MSI_FLAGS_ENABLE = 1 << 0
MSI_FLAGS_64BIT = 1 << 7
MSI_FLAGS_MASKBIT = 1 << 8

# MSI-X: control (u16 @2), table offset|BIR (u32 @4), PBA offset|BIR (u32 @8).
MSIX_FLAGS = 2
MSIX_TABLE = 4
MSIX_PBA = 8
MSIX_SIZE = 12
MSIX_FLAGS_MASKALL = 1 << 14
MSIX_FLAGS_ENABLE = 1 << 15
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_CTRL_MASKBIT = 1

# PCI Express capability, version 2 layout (0x3c bytes).
EXP_FLAGS = 2
EXP_DEVCAP = 4
EXP_DEVCTL = 8
EXP_DEVSTA = 10
EXP_LNKCAP = 12
EXP_LNKCTL = 16
EXP_LNKSTA = 18
EXP_DEVCAP2 = 0x24
EXP_DEVCTL2 = 0x28
EXP_LNKCAP2 = 0x2C
EXP_LNKCTL2 = 0x30
EXP_SIZE = 0x3C
EXP_DEVCAP_FLR = 1 << 28
EXP_DEVCTL_BCR_FLR = 1 << 15
EXP_TYPE_ENDPOINT = 0

# SR-IOV extended capability (0x40 bytes).
SRIOV_CAP = 0x04
SRIOV_CTRL = 0x08
SRIOV_STATUS = 0x0A
SRIOV_INITIAL_VF = 0x0C
SRIOV_TOTAL_VF = 0x0E
SRIOV_NUM_VF = 0x10
SRIOV_FUNC_LINK = 0x12
SRIOV_VF_OFFSET = 0x14
SRIOV_VF_STRIDE = 0x16
SRIOV_VF_DID = 0x1A
SRIOV_SUP_PGSIZE = 0x1C
SRIOV_SYS_PGSIZE = 0x20
SRIOV_BAR = 0x24
SRIOV_SIZE = 0x40
SRIOV_CTRL_VFE = 1 << 0
SRIOV_CTRL_MSE = 1 << 3
SRIOV_CTRL_ARI = 1 << 4


@dataclasses.dataclass(frozen=True, slots=True)
class MsiLayout:
    offset: int
    vectors: int
    addr64: bool
    per_vector_mask: bool

    @property
    def data_offset(self) -> int:
        return self.offset + (12 if self.addr64 else 8)

    @property
    def mask_offset(self) -> int | None:
        if not self.per_vector_mask:
            return None
        return self.offset + (16 if self.addr64 else 12)

    @property
    def size(self) -> int:
        base = 14 if self.addr64 else 10
        return base + (10 if self.per_vector_mask else 0)


@dataclasses.dataclass(frozen=True, slots=True)
class MsixLayout:
    offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        # One bit per vector, in whole qwords.
        return ((self.vectors + 63) // 64) * 8


def _allocate(space: ConfigSpace, size: int, offset: int | None) -> int:
    """Find (or check) a dword-aligned free window for a capability."""
    if offset is not None:
        if offset % 4 or not space.is_free(offset, size) or offset + size > cfg.CONFIG_SPACE_SIZE:
            raise ValueError(f"capability of {size} bytes does not fit at {offset:#x}")
        return offset
    for candidate in range(cfg.HEADER_SIZE, cfg.CONFIG_SPACE_SIZE - size + 1, 4):
        if space.is_free(candidate, size):
            return candidate
    raise ValueError(f"no room for a {size}-byte capability in config space")


def capability_offsets(space: ConfigSpace) -> list[tuple[int, int]]:
    """Walk the standard list: [(offset, cap id), ...] (loop-safe)."""
    found: list[tuple[int, int]] = []
    ptr = space.get_u8(cfg.CAPABILITY_LIST) & ~3
    seen: set[int] = set()
    while ptr and ptr not in seen and ptr + 2 <= cfg.CONFIG_SPACE_SIZE:
        seen.add(ptr)
        found.append((ptr, space.get_u8(ptr)))
        ptr = space.get_u8(ptr + 1) & ~3
    return found


def extended_capability_offsets(space: ConfigSpace) -> list[tuple[int, int]]:
    """Walk the extended list from 0x100: [(offset, ext cap id), ...]."""
    found: list[tuple[int, int]] = []
    if space.size <= EXT_CAP_START:
        return found
    ptr = EXT_CAP_START
    seen: set[int] = set()
    while ptr and ptr not in seen and ptr + 4 <= space.size:
        header = space.get_u32(ptr)
        if header == 0:
            break
        seen.add(ptr)
        found.append((ptr, header & 0xFFFF))
        ptr = (header >> 20) & 0xFFC
    return found


def _link(space: ConfigSpace, offset: int, cap_id: int) -> None:
    chain = capability_offsets(space)
    if chain:
        last = chain[-1][0]
        space.set(last + 1, bytes([offset]))
    else:
        space.set(cfg.CAPABILITY_LIST, bytes([offset]))
        status = space.get_u16(cfg.STATUS) | cfg.STATUS_CAP_LIST
        space.set(cfg.STATUS, status.to_bytes(2, "little"), w1c_mask=cfg.STATUS_W1C)
    space.set(offset, bytes([cap_id, 0]))


def add_pm(space: ConfigSpace, *, offset: int | None = None) -> int:
    off = _allocate(space, PM_SIZE, offset)
    _link(space, off, CAP_ID_PM)
    pmc = 3  # version 3 (PCI PM 1.2), no PME, D1/D2 unsupported
    space.set(off + PM_PMC, pmc.to_bytes(2, "little"))
    # NoSoftReset=1: going D3hot -> D0 keeps device state (no reset needed).
    ctrl = PM_CTRL_NO_SOFT_RESET
    space.set(
        off + PM_CTRL,
        ctrl.to_bytes(2, "little"),
        writable_mask=PM_CTRL_STATE_MASK | PM_CTRL_PME_ENABLE,
        w1c_mask=PM_CTRL_PME_STATUS,
    )
    space.set(off + 6, bytes(2))
    return off


def add_msi(
    space: ConfigSpace,
    vectors: int,
    *,
    addr64: bool,
    per_vector_mask: bool,
    offset: int | None = None,
) -> MsiLayout:
    if vectors not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"MSI vectors must be a power of two <= 32, not {vectors}")
    layout = MsiLayout(0, vectors, addr64, per_vector_mask)
    off = _allocate(space, layout.size, offset)
    layout = dataclasses.replace(layout, offset=off)
    _link(space, off, CAP_ID_MSI)
    mmc = vectors.bit_length() - 1
    flags = mmc << 1
    if addr64:
        flags |= MSI_FLAGS_64BIT
    if per_vector_mask:
        flags |= MSI_FLAGS_MASKBIT
    # Enable and Multiple Message Enable (bits 4-6) are written by software.
    space.set(off + MSI_FLAGS, flags.to_bytes(2, "little"), writable_mask=0x0071)
    space.set(off + MSI_ADDRESS_LO, bytes(4), writable_mask=0xFFFFFFFC)
    if addr64:
        space.set(off + 8, bytes(4), writable_mask=0xFFFFFFFF)
    space.set(layout.data_offset, bytes(4), writable_mask=0x0000FFFF)
    if layout.mask_offset is not None:
        space.set(layout.mask_offset, bytes(4), writable_mask=(1 << vectors) - 1)
        space.set(layout.mask_offset + 4, bytes(4))  # pending: read-only
    return layout


def add_msix(space: ConfigSpace, layout: MsixLayout, *, offset: int | None = None) -> MsixLayout:
    if not 1 <= layout.vectors <= 2048:
        raise ValueError(f"MSI-X vectors must be 1..2048, not {layout.vectors}")
    if layout.table_offset % 8 or layout.pba_offset % 8:
        raise ValueError("MSI-X table and PBA offsets must be qword aligned")
    off = _allocate(space, MSIX_SIZE, offset)
    layout = dataclasses.replace(layout, offset=off)
    _link(space, off, CAP_ID_MSIX)
    flags = layout.vectors - 1
    space.set(
        off + MSIX_FLAGS,
        flags.to_bytes(2, "little"),
        writable_mask=MSIX_FLAGS_MASKALL | MSIX_FLAGS_ENABLE,
    )
    space.set(off + MSIX_TABLE, (layout.table_offset | layout.table_bar).to_bytes(4, "little"))
    space.set(off + MSIX_PBA, (layout.pba_offset | layout.pba_bar).to_bytes(4, "little"))
    return layout


def add_express(space: ConfigSpace, *, device_type: int, offset: int | None = None) -> int:
    if space.size < cfg.CONFIG_SPACE_EXP_SIZE:
        space.grow(cfg.CONFIG_SPACE_EXP_SIZE)
    off = _allocate(space, EXP_SIZE, offset)
    _link(space, off, CAP_ID_EXP)
    flags = 2 | ((device_type & 0xF) << 4)  # capability version 2
    space.set(off + EXP_FLAGS, flags.to_bytes(2, "little"))
    # Max payload 128 bytes, function-level reset supported.
    space.set(off + EXP_DEVCAP, EXP_DEVCAP_FLR.to_bytes(4, "little"))
    # Error reporting enables, relaxed ordering, max payload/read request,
    # no-snoop and Initiate FLR (which always reads back 0).
    devctl_default = (1 << 4) | (2 << 12) | (1 << 11)  # relaxed ordering, 512B MRRS, no-snoop
    space.set(off + EXP_DEVCTL, devctl_default.to_bytes(2, "little"), writable_mask=0xFFFF)
    space.set(off + EXP_DEVSTA, bytes(2), w1c_mask=0x000F)
    # Link: 2.5 GT/s, x1; link status reports the same.
    space.set(off + EXP_LNKCAP, ((1 << 4) | 1).to_bytes(4, "little"))
    space.set(off + EXP_LNKCTL, bytes(2), writable_mask=0x01C3)
    space.set(off + EXP_LNKSTA, ((1 << 4) | 1).to_bytes(2, "little"))
    space.set(off + 0x14, bytes(EXP_DEVCAP2 - 0x14))  # slot/root registers: none
    space.set(off + EXP_DEVCAP2, bytes(4))
    space.set(off + EXP_DEVCTL2, bytes(2), writable_mask=0x001F)
    space.set(off + EXP_DEVCTL2 + 2, bytes(2))
    space.set(off + EXP_LNKCAP2, (1 << 1).to_bytes(4, "little"))  # 2.5 GT/s supported
    space.set(off + EXP_LNKCTL2, (1).to_bytes(2, "little"), writable_mask=0x000F)
    space.set(off + EXP_LNKCTL2 + 2, bytes(EXP_SIZE - EXP_LNKCTL2 - 2))
    return off


def _ext_allocate(space: ConfigSpace, size: int) -> int:
    """Place an extended capability after the last claimed byte above 0x100."""
    claimed = [i for i in range(EXT_CAP_START, space.size) if space.claimed[i]]
    off = EXT_CAP_START if not claimed else (claimed[-1] + 4) & ~3
    if off + size > space.size:
        raise ValueError("no room for an extended capability")
    return off


def add_ext_cap(space: ConfigSpace, cap_id: int, version: int, size: int) -> int:
    """Reserve and link an extended capability; returns its offset."""
    if space.size < cfg.CONFIG_SPACE_EXP_SIZE:
        raise ValueError("extended capabilities need PCI Express (add_express first)")
    off = _ext_allocate(space, size)
    chain = extended_capability_offsets(space)
    if chain:
        prev = chain[-1][0]
        header = space.get_u32(prev) & 0x000FFFFF
        space.set(prev, (header | (off << 20)).to_bytes(4, "little"))
    header = (cap_id & 0xFFFF) | ((version & 0xF) << 16)
    space.set(off, header.to_bytes(4, "little"))
    space.set(off + 4, bytes(size - 4))
    return off


@dataclasses.dataclass(frozen=True, slots=True)
class SriovLayout:
    offset: int
    total_vfs: int


def add_sriov(
    space: ConfigSpace, *, total_vfs: int, vf_offset: int, vf_stride: int, vf_device_id: int
) -> SriovLayout:
    if not 0 < total_vfs <= 0xFFFF:
        raise ValueError(f"TotalVFs {total_vfs} out of range")
    off = add_ext_cap(space, EXT_CAP_ID_SRIOV, 1, SRIOV_SIZE)
    space.set(
        off + SRIOV_CTRL,
        bytes(2),
        writable_mask=SRIOV_CTRL_VFE | SRIOV_CTRL_MSE | SRIOV_CTRL_ARI,
    )
    space.set(off + SRIOV_INITIAL_VF, total_vfs.to_bytes(2, "little"))
    space.set(off + SRIOV_TOTAL_VF, total_vfs.to_bytes(2, "little"))
    space.set(off + SRIOV_NUM_VF, bytes(2), writable_mask=0xFFFF)
    space.set(off + SRIOV_VF_OFFSET, vf_offset.to_bytes(2, "little"))
    space.set(off + SRIOV_VF_STRIDE, vf_stride.to_bytes(2, "little"))
    space.set(off + SRIOV_VF_DID, vf_device_id.to_bytes(2, "little"))
    space.set(off + SRIOV_SUP_PGSIZE, (0x553).to_bytes(4, "little"))  # 4K..4M pages
    space.set(off + SRIOV_SYS_PGSIZE, (1).to_bytes(4, "little"), writable_mask=0x553)
    return SriovLayout(off, total_vfs)
