"""The IFCVF PF's netdev: what ``ip link ... vf N`` reaches (mdevcore.daemon.iplink.VfNetdev)."""

from __future__ import annotations

import errno

from mdevcore.daemon.iplink import VfInfo
from mdevcore.parents.ifcvf.pf import IfcvfPf, LinkState
from mdevcore.pci.bus import PciFunction


class PfNetdev:
    def __init__(self, fn: PciFunction, name: str) -> None:
        assert isinstance(fn.device, IfcvfPf)
        self.fn = fn
        self.pf = fn.device
        self._name = name
        bdf = fn.bdf
        self._mac = bytes([0x02, 0x1F, 0xC0, bdf.bus, bdf.devfn, 0])

    @property
    def name(self) -> str:
        return self._name

    @property
    def address(self) -> str:
        return self.fn.name

    @property
    def mac(self) -> bytes:
        return self._mac

    @property
    def mtu(self) -> int:
        return self.pf.cfg.mtu

    def vfs(self) -> list[VfInfo]:
        # The MAC the VF has now: a migrated-in VF brings its own.
        settings, vfs = self.pf.settings, self.pf.vfs
        return [VfInfo(vfs[i].net.mac, settings[i].state.value) for i in sorted(vfs)]

    def set_vf_mac(self, vf: int, mac: bytes) -> None:
        self.pf.set_vf_mac(vf, mac)

    def set_vf_link_state(self, vf: int, state: str) -> None:
        try:
            wanted = LinkState(state)
        except ValueError:
            raise OSError(errno.EINVAL, f"link state {state!r}") from None
        self.pf.set_vf_link_state(vf, wanted)
