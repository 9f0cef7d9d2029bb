"""The host side of a pds card: the pds_core, pds_vfio and nvme drivers, and the hosted parent.

- ``pds_core`` binds the PF: it owns SR-IOV (sriov_configure) and the
  devlink instance ``pci/<PF>`` with the driver-specific parameter
  ``enable_lm``.  While enable_lm is true every VF has an auxiliary device
  ``pds_core.LM.<n>`` (n = VF number, 1-based) and may migrate.
- ``pds_vfio`` (PCI driver, override-only like every VFIO variant driver)
  binds a VF by ``driver_override``: the VF is then served over vfio-user
  at ``<run-dir>/<VF BDF>.sock`` (where /dev/vfio/<group> would appear),
  and its LM auxiliary device binds to the ``pds_vfio.lm`` auxiliary
  driver.  Unbinding disconnects the client and resets the VF.
- ``nvme`` stands for the host's own NVMe driver (class 01/08/02): a VF it
  binds is the host's, so it is not served.

:class:`PdsHost` puts the card into mdevd (``mdevcore.daemon.hosts``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from mdevcore.daemon.devlink import BoolParam, DevlinkError, DevlinkRegistry
from mdevcore.daemon.hosts import HostContext
from mdevcore.parents.pds.pf import PDS_CORE_PF_DEVICE_ID, PdsConfig, PdsCorePf
from mdevcore.parents.pds.vf import NVME_CLASS_CODE, PDS_NVME_VF_DEVICE_ID, PENSANDO_VENDOR_ID
from mdevcore.pci.bus import AuxDevice, PciBus, PciDriver, PciFunction, PciId, Sriov
from mdevcore.sysfs.mdev_view import qemu_device_arg
from mdevcore.vfio_user.backend import DeviceBackend

log = logging.getLogger(__name__)

LM_AUX_DRIVER = "pds_vfio.lm"


class VfioHost(Protocol):
    """Serves devices over vfio-user by name (mdevcore.daemon.servers.NamedServers)."""

    def serve(self, name: str, backend: DeviceBackend) -> Path: ...

    def unserve(self, name: str) -> None: ...

    def errors_text(self, name: str) -> str: ...


def lm_aux_name(vf: PciFunction) -> str:
    assert vf.vf_index is not None
    return f"pds_core.LM.{vf.vf_index + 1}"


def _pf_device(fn: PciFunction) -> PdsCorePf:
    assert isinstance(fn.device, PdsCorePf)
    return fn.device


class PdsCoreDriver(PciDriver):
    name = "pds_core"
    ids = (PciId(PENSANDO_VENDOR_ID, PDS_CORE_PF_DEVICE_ID),)
    has_sriov_configure = True

    def __init__(self, bus: PciBus, devlink: DevlinkRegistry) -> None:
        self.bus = bus
        self.devlink = devlink

    def probe(self, fn: PciFunction) -> None:
        if not isinstance(fn.device, PdsCorePf):
            raise OSError(errno.ENODEV, f"{fn.name} is not a pds_core PF")
        handle = f"pci/{fn.name}"

        def get() -> bool:
            return _pf_device(fn).enable_lm

        def set_lm(on: bool) -> None:
            self._set_enable_lm(fn, on)

        self.devlink.register(handle, [BoolParam("enable_lm", get, set_lm)])

    def remove(self, fn: PciFunction) -> None:
        if fn.sriov is not None and fn.sriov.vfs:
            self._disable(fn)
        self.devlink.unregister(f"pci/{fn.name}")
        _pf_device(fn).set_enable_lm(False)  # driver state does not outlive the driver

    def sriov_configure(self, bus: PciBus, fn: PciFunction, num_vfs: int) -> int:
        if num_vfs == 0:
            self._disable(fn)
            return 0
        bus.enable_sriov(fn, num_vfs)
        if _pf_device(fn).enable_lm:
            self._add_lm_devices(fn)
        return num_vfs

    def _disable(self, fn: PciFunction) -> None:
        self._remove_lm_devices(fn)
        self.bus.disable_sriov(fn)

    # --- enable_lm -----------------------------------------------------------------

    def _set_enable_lm(self, fn: PciFunction, on: bool) -> None:
        assert fn.sriov is not None
        busy = [
            vf.name for vf in fn.sriov.vfs if vf.driver is not None and vf.driver.name == "pds_vfio"
        ]
        if busy:
            raise DevlinkError(
                errno.EBUSY, f"VF {busy[0]} is bound to pds_vfio; unbind it to change enable_lm"
            )
        _pf_device(fn).set_enable_lm(on)
        if on:
            self._add_lm_devices(fn)
        else:
            self._remove_lm_devices(fn)
        log.info("%s: enable_lm %s", fn.name, "true" if on else "false")
        self.bus.changed(fn)  # recorded by mdevd --persist

    def _add_lm_devices(self, fn: PciFunction) -> None:
        assert fn.sriov is not None
        for vf in fn.sriov.vfs:
            if lm_aux_name(vf) not in self.bus.aux_devices:
                self.bus.add_aux(AuxDevice(lm_aux_name(vf), vf))

    def _remove_lm_devices(self, fn: PciFunction) -> None:
        assert fn.sriov is not None
        for vf in fn.sriov.vfs:
            aux = self.bus.aux_devices.get(lm_aux_name(vf))
            if aux is not None:
                self.bus.remove_aux(aux)


class PdsVfioDriver(PciDriver):
    name = "pds_vfio"
    ids = (PciId(PENSANDO_VENDOR_ID, PDS_NVME_VF_DEVICE_ID, override_only=True),)

    def __init__(self, bus: PciBus, host: VfioHost) -> None:
        self.bus = bus
        self.host = host
        self.sockets: dict[str, Path] = {}

    def probe(self, fn: PciFunction) -> None:
        pf = fn.physfn
        if pf is None or pf.driver is None or pf.driver.name != "pds_core":
            # pci_iov_get_pf_drvdata(): the PF must be driven by pds_core
            raise OSError(errno.EINVAL, f"{fn.name}: its PF is not bound to pds_core")
        self.sockets[fn.name] = self.host.serve(fn.name, fn.device)
        aux = self.bus.aux_devices.get(lm_aux_name(fn))
        if aux is not None and aux.driver is None:
            self.bus.bind_aux(aux, LM_AUX_DRIVER)

    def remove(self, fn: PciFunction) -> None:
        aux = self.bus.aux_devices.get(lm_aux_name(fn))
        if aux is not None:
            self.bus.unbind_aux(aux)
        self.host.unserve(fn.name)
        self.sockets.pop(fn.name, None)
        fn.device.reset()  # as vfio-pci resets a device it releases

    def device_attributes(self, fn: PciFunction) -> Mapping[str, str | Callable[[], str]]:
        path = self.sockets.get(fn.name)
        if path is None:
            return {}
        name = fn.name
        return {
            "vfio_user/socket": f"{path}\n",
            "vfio_user/qemu_device": f"{qemu_device_arg(path)}\n",
            "vfio_user/errors": lambda: self.host.errors_text(name),
        }


class NvmeHostDriver(PciDriver):
    """The host's nvme driver: it takes NVMe functions for the host itself."""

    name = "nvme"
    ids = (PciId(class_code=NVME_CLASS_CODE, class_mask=0xFFFFFF),)


class PdsHost:
    """A pds card in mdevd: the PF at ``config.pf``, its drivers and its sysfs."""

    name = "pds"

    def __init__(self, config: PdsConfig) -> None:
        self.config = config
        self.bus = PciBus()  # replaced by the daemon's at start
        self.pf: PciFunction | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, str], run_dir: Path) -> PdsHost:
        """Build from mdevd's --pds-* options (strings); unset ones take defaults."""
        kwargs: dict[str, object] = {}
        if options.get("pf"):
            kwargs["pf"] = options["pf"]
        if options.get("total_vfs"):
            kwargs["total_vfs"] = int(options["total_vfs"], 0)
        if options.get("ns_size"):
            kwargs["ns_size"] = parse_size(options["ns_size"])
        if options.get("doorbells"):
            kwargs["doorbells"] = options["doorbells"]
        backing = Path(options["backing_dir"]) if options.get("backing_dir") else run_dir / "pds"
        return cls(PdsConfig(backing_dir=backing, **kwargs))  # type: ignore[arg-type]

    def start(self, ctx: HostContext) -> None:
        bus = self.bus = ctx.bus
        # Modules load in this order: the PF driver, the host nvme driver, pds_vfio.
        bus.register_driver(PdsCoreDriver(bus, ctx.devlink))
        bus.register_driver(NvmeHostDriver())
        bus.register_driver(PdsVfioDriver(bus, ctx.servers))
        bus.register_aux_driver(LM_AUX_DRIVER)
        device = PdsCorePf(self.config)
        self.pf = PciFunction(device.cfg.pf_bdf, device, sriov=Sriov(provider=device))
        bus.add_function(self.pf)

    def banner(self, sysfs: Path, run_dir: Path) -> list[str]:
        pf = self.config.pf
        return [
            f"pds PF {pf}: VFs: echo N > {sysfs}/bus/pci/devices/{pf}/sriov_numvfs",
            f"pds live migration: mdevd devlink --run-dir {run_dir} dev param set pci/{pf} "
            "name enable_lm value true cmode runtime",
            f"pds VF to vfio-user: echo pds_vfio > .../<VF>/driver_override; "
            f"echo <VF> > {sysfs}/bus/pci/drivers/pds_vfio/bind",
        ]

    def stop(self) -> None:
        if self.pf is not None:
            self.bus.remove_function(self.pf)
            self.pf.device.close()
            self.pf = None


_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``512M``, ``2G``, ``1T`` (binary units) -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SUFFIXES else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size like 512M or 2G")
    return int(number) * _SUFFIXES[unit]
