"""SR-IOV control: NumVFs and VF Enable, from the guest or the host.

The capability's registers live in config space; this module keeps the
(NumVFs, VF Enable) pair the device last acted on, refuses NumVFs changes
the spec forbids, and tells the device when the pair changes.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from mdevcore.pci import caps
from mdevcore.pci.config import ConfigSpace


class SriovControl:
    """The SR-IOV state of one PF; ``on_change(num_vfs, vf_enable)`` hears of changes."""

    def __init__(
        self,
        config: ConfigSpace,
        layout: caps.SriovLayout,
        on_change: Callable[[int, bool], None],
        log: logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> None:
        self.config = config
        self.layout = layout
        self._on_change = on_change
        self._log = log
        self.state = (0, False)  # (NumVFs, VF Enable) as last programmed

    def reset(self) -> None:
        """Config space was reset: the VFs are gone without a notification."""
        self.state = (0, False)

    def written(self) -> None:
        """A config write touched NumVFs or the control register."""
        base = self.layout.offset
        num = self.config.get_u16(base + caps.SRIOV_NUM_VF)
        enabled = bool(self.config.get_u16(base + caps.SRIOV_CTRL) & caps.SRIOV_CTRL_VFE)
        old_num, old_enabled = self.state
        if num != old_num and (old_enabled or num > self.layout.total_vfs):
            # NumVFs may only change while VF Enable is clear, within TotalVFs.
            self._log.info("NumVFs write %d refused (enabled=%s)", num, old_enabled)
            self.config.update_u16(base + caps.SRIOV_NUM_VF, old_num)
            num = old_num
        if (num, enabled) != self.state:
            self.state = (num, enabled)
            self._on_change(num, enabled)

    def configure(self, num_vfs: int) -> None:
        """Host-side VF setup with sysfs ``sriov_numvfs`` semantics (see PciDevice)."""
        total = self.layout.total_vfs
        if not 0 <= num_vfs <= total:
            raise OSError(errno.ERANGE, f"{num_vfs} VFs, TotalVFs is {total}")
        current, enabled = self.state
        if enabled and num_vfs == current:
            return
        if enabled and num_vfs:
            raise OSError(errno.EBUSY, "VFs are enabled; disable them first")
        base = self.layout.offset
        ctrl = self.config.get_u16(base + caps.SRIOV_CTRL)
        if num_vfs:
            self.config.update_u16(base + caps.SRIOV_NUM_VF, num_vfs)
            ctrl |= caps.SRIOV_CTRL_VFE | caps.SRIOV_CTRL_MSE
        else:
            ctrl &= ~(caps.SRIOV_CTRL_VFE | caps.SRIOV_CTRL_MSE)
        self.config.update_u16(base + caps.SRIOV_CTRL, ctrl)
        self.written()
