"""The host side of an IFCVF card: the ifcvf, ifcvf_vfio and virtio-pci drivers, the hosted parent.

- ``ifcvf`` binds the PF: it owns SR-IOV (sriov_configure) and the PF
  netdev (``IfcvfConfig.netdev``) through which the host sets a VF's MAC
  and link state, as ``ip link set PF vf N mac ... / state ...`` does
  (``mdevd ip``, mdevcore.daemon.iplink).  (In Linux, ``ifcvf`` is the
  vDPA driver of the VFs; here, as the card's own driver, it is the PF's.)
- ``ifcvf_vfio`` (PCI driver, override-only like every VFIO variant
  driver) binds a VF by ``driver_override``: the VF is then served over
  vfio-user at ``<run-dir>/<VF BDF>.sock`` with ``vfio_user/socket`` and
  ``vfio_user/qemu_device`` in its sysfs directory, exactly like
  pds_vfio.  Unbinding disconnects the client and resets the VF.
- ``virtio-pci`` stands for the host's own virtio driver: with
  ``sriov_drivers_autoprobe`` 1 it takes the VFs for the host itself
  (they are then not served), as on a real host.

:class:`IfcvfHost` puts the card into mdevd (``mdevcore.daemon.hosts``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from mdevcore.daemon.hosts import HostContext
from mdevcore.daemon.iplink import NetdevRegistry
from mdevcore.parents.ifcvf.netdev import PfNetdev
from mdevcore.parents.ifcvf.pf import IFCVF_PF_DEVICE_ID, IfcvfConfig, IfcvfPf, parse_mac
from mdevcore.parents.ifcvf.vf import VIRTIO_NET_MODERN_DEVICE_ID, IfcvfNetVf
from mdevcore.pci.bus import PciBus, PciDriver, PciFunction, PciId, Sriov
from mdevcore.sysfs.mdev_view import qemu_device_arg
from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.virtio import spec

log = logging.getLogger(__name__)

PF_DRIVER = "ifcvf"
VFIO_DRIVER = "ifcvf_vfio"
VIRTIO_DEVICE_IDS = range(0x1000, 0x1080)  # transitional and modern virtio devices


class VfioHost(Protocol):
    """Serves devices over vfio-user by name (mdevcore.daemon.servers.NamedServers)."""

    def serve(self, name: str, backend: DeviceBackend) -> Path: ...

    def unserve(self, name: str) -> None: ...


def _pf_device(fn: PciFunction) -> IfcvfPf:
    assert isinstance(fn.device, IfcvfPf)
    return fn.device


class IfcvfPfDriver(PciDriver):
    name = PF_DRIVER
    ids = (PciId(spec.PCI_VENDOR_ID, IFCVF_PF_DEVICE_ID),)
    has_sriov_configure = True

    def __init__(self, bus: PciBus, netdevs: NetdevRegistry | None) -> None:
        self.bus = bus
        self.netdevs = netdevs

    def probe(self, fn: PciFunction) -> None:
        if not isinstance(fn.device, IfcvfPf):
            raise OSError(errno.ENODEV, f"{fn.name} is not an IFCVF PF")
        if self.netdevs is not None:
            self.netdevs.register(PfNetdev(fn, _pf_device(fn).cfg.netdev))

    def remove(self, fn: PciFunction) -> None:
        if fn.sriov is not None and fn.sriov.vfs:
            self.bus.disable_sriov(fn)
        if self.netdevs is not None:
            self.netdevs.unregister(_pf_device(fn).cfg.netdev)

    def sriov_configure(self, bus: PciBus, fn: PciFunction, num_vfs: int) -> int:
        if num_vfs == 0:
            bus.disable_sriov(fn)
            return 0
        bus.enable_sriov(fn, num_vfs)
        return num_vfs


class IfcvfVfioDriver(PciDriver):
    name = VFIO_DRIVER
    ids = (PciId(spec.PCI_VENDOR_ID, VIRTIO_NET_MODERN_DEVICE_ID, override_only=True),)

    def __init__(self, host: VfioHost) -> None:
        self.host = host
        self.sockets: dict[str, Path] = {}

    def probe(self, fn: PciFunction) -> None:
        pf = fn.physfn
        if pf is None or pf.driver is None or pf.driver.name != PF_DRIVER:
            # pci_iov_get_pf_drvdata(): the PF must be driven by ifcvf
            raise OSError(errno.EINVAL, f"{fn.name}: its PF is not bound to {PF_DRIVER}")
        if not isinstance(fn.device, IfcvfNetVf):
            raise OSError(errno.ENODEV, f"{fn.name} is not an IFCVF VF")
        self.sockets[fn.name] = self.host.serve(fn.name, fn.device)

    def remove(self, fn: PciFunction) -> None:
        self.host.unserve(fn.name)
        self.sockets.pop(fn.name, None)
        fn.device.reset()  # as vfio-pci resets a device it releases

    def device_attributes(self, fn: PciFunction) -> Mapping[str, str]:
        path = self.sockets.get(fn.name)
        if path is None:
            return {}
        return {
            "vfio_user/socket": f"{path}\n",
            "vfio_user/qemu_device": f"{qemu_device_arg(path)}\n",
        }


class VirtioPciHostDriver(PciDriver):
    """The host's virtio-pci driver: every virtio function, for the host itself."""

    name = "virtio-pci"
    ids = (PciId(spec.PCI_VENDOR_ID),)

    def probe(self, fn: PciFunction) -> None:
        if fn.device_id not in VIRTIO_DEVICE_IDS:  # as virtio_pci_probe's range check
            raise OSError(errno.ENODEV, f"{fn.name} is not a virtio device")


class IfcvfHost:
    """An IFCVF card in mdevd: the PF at ``config.pf``, its drivers and its netdev."""

    name = "ifcvf"

    def __init__(self, config: IfcvfConfig) -> None:
        self.config = config
        self.bus = PciBus()  # replaced by the daemon's at start
        self.pf: PciFunction | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, str], run_dir: Path) -> IfcvfHost:
        """Build from --parent-opt ifcvf.KEY=VALUE strings; unset ones take defaults."""
        kwargs: dict[str, object] = {}
        for key in ("pf", "backend", "netdev", "tap", "netns"):
            if options.get(key):
                kwargs[key] = options[key]
        for key in ("total_vfs", "mtu"):
            if options.get(key):
                kwargs[key] = int(options[key], 0)
        if options.get("macs"):
            try:
                kwargs["macs"] = tuple(parse_mac(m) for m in options["macs"].split(","))
            except OSError as e:
                raise ValueError(e.strerror) from None
        try:
            return cls(IfcvfConfig(**kwargs))  # type: ignore[arg-type]
        except OSError as e:  # an interface name refused
            raise ValueError(e.strerror) from None

    def start(self, ctx: HostContext) -> None:
        bus = self.bus = ctx.bus
        # Modules load in this order: the PF driver, the host's virtio-pci, ifcvf_vfio.
        bus.register_driver(IfcvfPfDriver(bus, ctx.netdevs))
        if "virtio-pci" not in bus.drivers:
            bus.register_driver(VirtioPciHostDriver())
        bus.register_driver(IfcvfVfioDriver(ctx.servers))
        device = IfcvfPf(self.config)
        self.pf = PciFunction(device.cfg.pf_bdf, device, sriov=Sriov(provider=device))
        bus.add_function(self.pf)

    def banner(self, sysfs: Path, run_dir: Path) -> list[str]:
        pf, net = self.config.pf, self.config.netdev
        return [
            f"ifcvf PF {pf} (netdev {net}): VFs: echo N > "
            f"{sysfs}/bus/pci/devices/{pf}/sriov_numvfs",
            f"ifcvf VF to vfio-user: echo {VFIO_DRIVER} > .../<VF>/driver_override; "
            f"echo <VF> > {sysfs}/bus/pci/drivers/{VFIO_DRIVER}/bind",
            f"ifcvf VF MAC/link: mdevd ip --run-dir {run_dir} link set {net} vf N "
            "mac XX:XX:XX:XX:XX:XX | state auto|enable|disable",
        ]

    def stop(self) -> None:
        if self.pf is not None:
            self.bus.remove_function(self.pf)
            self.pf.device.close()
            self.pf = None
