"""Where the virtio structures live: vendor capabilities pointing into one BAR.

A modern virtio PCI function describes each structure (common config,
notify, ISR, device config) with a vendor-specific capability (cap_vndr
0x09) holding the BAR, offset and length (4.1.4).  This module fixes the
BAR layout and writes those capabilities into config space with
ConfigSpace.set, linked at the end of the standard capability list, so a
device can add MSI-X (or anything else) before or after.
"""

from __future__ import annotations

import dataclasses
import struct

from mdevcore.pci import caps
from mdevcore.pci import config as cfg
from mdevcore.pci.config import ConfigSpace
from mdevcore.virtio import spec


@dataclasses.dataclass(frozen=True, slots=True)
class VirtioBarLayout:
    """Offsets of the structures inside ``bar`` (each in its own 4 KiB page)."""

    bar: int = 0
    common: int = 0x0000
    isr: int = 0x1000
    device: int = 0x2000
    notify: int = 0x3000
    page: int = 0x1000
    notify_off_multiplier: int = 4  # one 32-bit doorbell per queue
    size: int = 0x4000

    def region(self, offset: int) -> tuple[str, int] | None:
        """(structure, offset inside it) for a BAR offset, None outside all four."""
        for name, start in (
            ("common", self.common),
            ("isr", self.isr),
            ("device", self.device),
            ("notify", self.notify),
        ):
            if start <= offset < start + self.page:
                return name, offset - start
        return None


def _append_cap(config: ConfigSpace, length: int) -> int:
    """A free dword-aligned window for a capability, linked at the end of the list."""
    for offset in range(cfg.HEADER_SIZE, cfg.CONFIG_SPACE_SIZE - length + 1, 4):
        if config.is_free(offset, length):
            break
    else:
        raise ValueError(f"no room for a {length}-byte capability")
    chain = caps.capability_offsets(config)
    if chain:
        config.set(chain[-1][0] + 1, bytes([offset]))
    else:
        config.set(cfg.CAPABILITY_LIST, bytes([offset]))
        status = config.get_u16(cfg.STATUS) | cfg.STATUS_CAP_LIST
        config.set(cfg.STATUS, status.to_bytes(2, "little"), w1c_mask=cfg.STATUS_W1C)
    return offset


def add_virtio_caps(config: ConfigSpace, layout: VirtioBarLayout, device_cfg_len: int) -> list[int]:
    """The four vendor capabilities; returns their config offsets."""
    entries = (
        (spec.PCI_CAP_COMMON_CFG, layout.common, spec.COMMON_CFG_SIZE),
        (spec.PCI_CAP_NOTIFY_CFG, layout.notify, layout.page),
        (spec.PCI_CAP_ISR_CFG, layout.isr, 1),
        (spec.PCI_CAP_DEVICE_CFG, layout.device, device_cfg_len),
    )
    offsets = []
    for cfg_type, start, length in entries:
        notify = cfg_type == spec.PCI_CAP_NOTIFY_CFG
        cap_len = spec.PCI_NOTIFY_CAP_LEN if notify else spec.PCI_CAP_LEN
        offset = _append_cap(config, cap_len)
        body = struct.pack(
            "<BBBBBBHII",
            caps.CAP_ID_VENDOR,
            0,
            cap_len,
            cfg_type,
            layout.bar,
            0,
            0,
            start,
            length,
        )
        if notify:
            body += struct.pack("<I", layout.notify_off_multiplier)
        config.set(offset, body)
        offsets.append(offset)
    return offsets
