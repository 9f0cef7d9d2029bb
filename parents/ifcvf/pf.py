"""The IFCVF PF: the management function whose SR-IOV VFs are IFCVF virtio-net VFs.

Only the host sees the PF (it is never served over vfio-user).  SR-IOV
requires a VF's vendor ID to be its PF's, so the PF is vendor 1af4 too;
its device ID (0x10ff, outside the virtio range 0x1000-0x107f so no
virtio driver claims it) is our pick.  Its config space carries PCI
Express and SR-IOV (VF device ID 0x1041).  As
:class:`~mdevcore.pci.bus.SriovProvider` it builds each VF with its
frame backend:

- ``loopback``: VFs cabled in pairs (VF 0 with VF 1, 2 with 3, ...) over
  a UNIX datagram socketpair; an unpaired last VF's frames go nowhere.
  Needs no privileges: the default.
- ``tap``: each VF has a TAP interface, ``tap`` with ``%d`` replaced by
  the VF number (0-based), opened by the daemon in network namespace
  ``netns`` if given.

The PF also keeps what the host administrator set per VF through the PF
netdev (``ip link set PF vf N mac ... / state ...``): a VF is built with
it, and a live VF takes a change at once.  Like a NIC driver's VF table
it lasts until SR-IOV is disabled.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import socket

from mdevcore.parents.ifcvf.vf import (
    IFCVF_SUBSYS_DEVICE_ID,
    IFCVF_SUBSYS_VENDOR_ID,
    NET_CLASS_CODE,
    VIRTIO_NET_MODERN_DEVICE_ID,
    IfcvfNetVf,
)
from mdevcore.pci.bars import BarKind
from mdevcore.pci.bus import Bdf
from mdevcore.pci.device import PciDevice, PciIdentity
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import DatagramBackend, FrameBackend
from mdevcore.virtio.net.device import NetConfig
from mdevcore.virtio.net.tap import TapBackend, check_ifname, netns_path

log = logging.getLogger(__name__)

IFCVF_PF_DEVICE_ID = 0x10FF
PF_BAR0_SIZE = 0x4000

DEFAULT_PF = "0000:61:00.0"  # its own bus: pds sits on 0000:60
DEFAULT_TOTAL_VFS = 4
DEFAULT_NETDEV = "ifcvf0"
DEFAULT_TAP = "ifctap%d"


class BackendKind(enum.Enum):
    LOOPBACK = "loopback"
    TAP = "tap"


class LinkState(enum.Enum):
    """IFLA_VF_LINK_STATE: follow the PF (auto), forced up (enable) or down (disable)."""

    AUTO = "auto"
    ENABLE = "enable"
    DISABLE = "disable"


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes; EINVAL for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise OSError(errno.EINVAL, f"{text!r} is not a MAC address")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise OSError(errno.EINVAL, f"{text!r} is not a MAC address") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def valid_vf_mac(mac: bytes) -> bool:
    """is_valid_ether_addr(): not multicast, not all zeros."""
    return not mac[0] & 1 and mac != bytes(6)


@dataclasses.dataclass(frozen=True, slots=True)
class IfcvfConfig:
    """How the card is built; see the module doc for the backends."""

    pf: str = DEFAULT_PF
    total_vfs: int = DEFAULT_TOTAL_VFS
    backend: str = BackendKind.LOOPBACK.value
    macs: tuple[bytes, ...] = ()  # VF 0 first; VFs beyond get default_mac()
    netdev: str = DEFAULT_NETDEV
    tap: str = DEFAULT_TAP
    netns: str | None = None
    mtu: int = 1500

    @property
    def pf_bdf(self) -> Bdf:
        return Bdf.parse(self.pf)

    def __post_init__(self) -> None:
        bdf = Bdf.parse(self.pf)
        if not 1 <= self.total_vfs <= 255:
            raise ValueError(f"total VFs {self.total_vfs} is not within 1..255")
        if bdf.devfn + self.total_vfs > 0xFF:
            raise ValueError(f"{self.total_vfs} VFs do not fit on bus {bdf.bus_name}")
        kind = BackendKind(self.backend)
        if len(self.macs) > self.total_vfs:
            raise ValueError(f"{len(self.macs)} MACs for {self.total_vfs} VFs")
        for mac in self.macs:
            if len(mac) != 6 or not valid_vf_mac(mac):
                raise ValueError(f"{format_mac(mac)} is not a unicast MAC")
        if not 68 <= self.mtu <= 65535:
            raise ValueError(f"MTU {self.mtu} is not within 68..65535")
        check_ifname(self.netdev)
        if kind is BackendKind.TAP:
            check_ifname(self.tap_name(self.total_vfs - 1))
            if self.netns is not None:
                netns_path(self.netns)

    def tap_name(self, index: int) -> str:
        return self.tap.replace("%d", str(index))

    def default_mac(self, index: int) -> bytes:
        """Locally administered, from the PF's bus and the VF number: 02:1f:c0:BB:DF:NN."""
        if index < len(self.macs):
            return self.macs[index]
        bdf = self.pf_bdf
        return bytes([0x02, 0x1F, 0xC0, bdf.bus, bdf.devfn, index + 1])


@dataclasses.dataclass(slots=True)
class VfSettings:
    """What the host set for one VF through the PF (ip link set PF vf N ...)."""

    mac: bytes
    state: LinkState = LinkState.AUTO

    @property
    def link_up(self) -> bool:
        # The PF's own link is always up (mdevd is its port), so auto is up.
        return self.state is not LinkState.DISABLE


class IfcvfPf(PciDevice):
    def __init__(self, config: IfcvfConfig) -> None:
        super().__init__(
            PciIdentity(
                vendor_id=spec.PCI_VENDOR_ID,
                device_id=IFCVF_PF_DEVICE_ID,
                class_code=NET_CLASS_CODE,
                subsystem_vendor_id=IFCVF_SUBSYS_VENDOR_ID,
                subsystem_id=IFCVF_SUBSYS_DEVICE_ID,
            )
        )
        self.name = f"ifcvf PF {config.pf}"
        self.cfg = config
        self.add_bar(0, PF_BAR0_SIZE, BarKind.MEM64)
        self.add_express()
        self.add_sriov(
            total_vfs=config.total_vfs,
            vf_offset=1,
            vf_stride=1,
            vf_device_id=VIRTIO_NET_MODERN_DEVICE_ID,
        )
        self.vfs: dict[int, IfcvfNetVf] = {}
        self.settings: dict[int, VfSettings] = {}
        self._peer_ends: dict[int, socket.socket] = {}  # loopback: the odd VF's end

    # --- SriovProvider -----------------------------------------------------------

    def vf_device(self, index: int, bdf: Bdf) -> PciDevice:
        settings = self.settings.setdefault(index, VfSettings(self.cfg.default_mac(index)))
        net = NetConfig(mac=settings.mac, mtu=self.cfg.mtu, link_up=settings.link_up)
        vf = IfcvfNetVf(net, self._backend(index), name=f"ifcvf VF {bdf}")
        self.vfs[index] = vf
        return vf

    def vf_gone(self, index: int, device: PciDevice) -> None:
        self.vfs.pop(index, None)
        peer = self._peer_ends.pop(index, None)
        if peer is not None:
            peer.close()
        if not self.vfs:
            self.settings.clear()  # SR-IOV is off: the VF table goes with it
            for end in self._peer_ends.values():
                end.close()
            self._peer_ends.clear()
        device.close()  # the bus removed the function: nothing serves it any more

    def _backend(self, index: int) -> FrameBackend:
        if BackendKind(self.cfg.backend) is BackendKind.TAP:
            return TapBackend(self.cfg.tap_name(index), self.cfg.netns)
        if index % 2:
            end = self._peer_ends.pop(index, None)
            if end is None:  # its partner was never built: a socket with no peer
                end, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                other.close()
            return DatagramBackend(end)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        num_vfs = self.sriov_state[0]
        if index + 1 < num_vfs:
            self._peer_ends[index + 1] = b
        else:
            b.close()  # the last VF of an odd count: cabled to nothing
        return DatagramBackend(a)

    # --- what the PF netdev sets (ndo_set_vf_mac, ndo_set_vf_link_state) ------------

    def vf_settings(self, index: int) -> VfSettings:
        settings = self.settings.get(index)
        if settings is None or index not in self.vfs:
            raise OSError(errno.EINVAL, f"VF {index} does not exist")
        return settings

    def set_vf_mac(self, index: int, mac: bytes) -> None:
        settings = self.vf_settings(index)
        if not valid_vf_mac(mac):
            raise OSError(errno.EINVAL, f"{format_mac(mac)} is not a unicast MAC")
        settings.mac = mac
        self.vfs[index].set_mac(mac)
        log.info("%s: VF %d MAC %s", self.cfg.pf, index, format_mac(mac))

    def set_vf_link_state(self, index: int, state: LinkState) -> None:
        settings = self.vf_settings(index)
        settings.state = state
        self.vfs[index].set_link(settings.link_up)
        log.info("%s: VF %d link-state %s", self.cfg.pf, index, state.value)
