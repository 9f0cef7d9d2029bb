"""The pds_core PF: a Pensando DSC management function whose SR-IOV VFs are NVMe VFs.

Only the host sees the PF (it is never served over vfio-user): its config
space carries the PCI Express and SR-IOV capabilities, which the SR-IOV
core programs (NumVFs, VF Enable) and sysfs reads back (TotalVFs, VF
offset and stride, VF device id).  As :class:`~mdevcore.pci.bus.SriovProvider`
it builds the VFs' hardware: one :class:`~mdevcore.parents.pds.vf.PdsNvmeVf` per VF,
its namespace backed by ``<backing_dir>/<VF BDF>.img`` (sparse; kept when
the VF goes, like a real device's storage).

Live migration is the PF's to grant (``enable_lm``): a VF reports the
migration flags its class offers only while it is on, and none otherwise,
so VFIO's DEVICE_FEATURE MIGRATION answers ENOTTY.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mdevcore.parents.pds.vf import (
    PDS_NVME_VF_DEVICE_ID,
    PENSANDO_VENDOR_ID,
    DoorbellMode,
    PdsNvmeVf,
    VfConfig,
)
from mdevcore.pci.bars import BarKind
from mdevcore.pci.bus import Bdf
from mdevcore.pci.device import PciDevice, PciIdentity

log = logging.getLogger(__name__)

PDS_CORE_PF_DEVICE_ID = 0x100C  # PCI_DEVICE_ID_PENSANDO_CORE_PF
PDS_CORE_CLASS = 0x120000  # processing accelerator
PF_BAR0_SIZE = 0x8000

DEFAULT_PF = "0000:60:00.0"
DEFAULT_TOTAL_VFS = 8
DEFAULT_NS_SIZE = 1 << 30  # 1 GiB per VF, sparse


@dataclasses.dataclass(frozen=True, slots=True)
class PdsConfig:
    """How the pds card is built; ``backing_dir`` holds one namespace file per VF."""

    backing_dir: Path
    pf: str = DEFAULT_PF
    total_vfs: int = DEFAULT_TOTAL_VFS
    ns_size: int = DEFAULT_NS_SIZE
    vf_offset: int = 1
    vf_stride: int = 1
    doorbells: str = "trapped"

    @property
    def pf_bdf(self) -> Bdf:
        return Bdf.parse(self.pf)

    def __post_init__(self) -> None:
        bdf = Bdf.parse(self.pf)
        if not 1 <= self.total_vfs <= 255:
            raise ValueError(f"total VFs {self.total_vfs} is not within 1..255")
        if self.vf_offset < 1 or self.vf_stride < 1:
            raise ValueError("VF offset and stride must be at least 1")
        last = bdf.devfn + self.vf_offset + (self.total_vfs - 1) * self.vf_stride
        if last > 0xFF:
            # VFs beyond the PF's bus would need a virtual bus; keep them on one.
            raise ValueError(f"{self.total_vfs} VFs do not fit on bus {bdf.bus_name}")
        if self.ns_size < 4096 or self.ns_size % 4096:
            raise ValueError(f"namespace size {self.ns_size} is not a positive multiple of 4096")
        # Checked now, not when the first VF is built inside a sysfs write.
        DoorbellMode(self.doorbells)


class PdsCorePf(PciDevice):
    def __init__(self, config: PdsConfig) -> None:
        super().__init__(
            PciIdentity(
                vendor_id=PENSANDO_VENDOR_ID,
                device_id=PDS_CORE_PF_DEVICE_ID,
                class_code=PDS_CORE_CLASS,
                subsystem_vendor_id=PENSANDO_VENDOR_ID,
                subsystem_id=PDS_CORE_PF_DEVICE_ID,
            )
        )
        self.name = f"pds_core {config.pf}"
        self.cfg = config
        self.add_bar(0, PF_BAR0_SIZE, BarKind.MEM64)
        self.add_express()
        self.add_sriov(
            total_vfs=config.total_vfs,
            vf_offset=config.vf_offset,
            vf_stride=config.vf_stride,
            vf_device_id=PDS_NVME_VF_DEVICE_ID,
        )
        self.enable_lm = False
        self.vfs: dict[int, PdsNvmeVf] = {}

    # --- SriovProvider -----------------------------------------------------------

    def vf_device(self, index: int, bdf: Bdf) -> PciDevice:
        self.cfg.backing_dir.mkdir(parents=True, exist_ok=True)
        vf = PdsNvmeVf(
            VfConfig(
                backing=self.cfg.backing_dir / f"{bdf}.img",
                size=self.cfg.ns_size,
                doorbells=DoorbellMode(self.cfg.doorbells),
                serial=f"PDSVF{index + 1:04d}",
            ),
            name=f"pds VF {bdf}",
        )
        self.vfs[index] = vf
        self._apply_lm(index)
        return vf

    def vf_gone(self, index: int, device: PciDevice) -> None:
        self.vfs.pop(index, None)
        device.close()  # the bus removed the function: nothing serves it any more

    # --- live migration -------------------------------------------------------------

    def set_enable_lm(self, on: bool) -> None:
        self.enable_lm = on
        for index in self.vfs:
            self._apply_lm(index)

    def _apply_lm(self, index: int) -> None:
        self.vfs[index].set_migratable(self.enable_lm)
