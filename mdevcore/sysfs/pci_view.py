"""The PCI (and auxiliary) bus layout of the sysfs tree, kept in step with a PciBus.

::

    devices/pci<D:B>/                          the root bus's host bridge
    devices/pci<D:B>/pci_bus/<D:B>/device      -> ../../../pci<D:B>
    class/pci_bus/<D:B>                        -> ../../devices/pci<D:B>/pci_bus/<D:B>
    devices/pci<D:B>/<BDF>/{vendor,device,class,subsystem_vendor,subsystem_device,
                            revision,config,uevent,driver_override,subsystem,driver}
      a PF adds  sriov_{totalvfs,numvfs,offset,stride,vf_device,drivers_autoprobe}
                 and virtfn<N> -> ../<VF BDF>
      a VF adds  physfn -> ../<PF BDF>
      a bound device adds its driver's attributes (pds_vfio: vfio_user/{socket,qemu_device})
      <BDF>/<aux device>/{uevent,subsystem,driver}
    bus/pci/devices/<BDF>                      -> the device
    bus/pci/drivers/<driver>/{bind,unbind,<BDF> -> the device}
    bus/pci/drivers_probe
    bus/auxiliary/devices/<aux device>         -> the aux device
    bus/auxiliary/drivers/<driver>/<aux device> -> the aux device

The view observes the bus (drivers/pci/pci-sysfs.c and iov.c are its
kernel counterparts); every write goes to the bus's ``*_store`` methods,
which carry the kernel's errnos.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mdevcore.pci.bus import (
    AuxAdded,
    AuxBound,
    AuxDevice,
    AuxDriverRegistered,
    AuxRemoved,
    AuxUnbound,
    BusEvent,
    DriverBound,
    DriverRegistered,
    DriverUnbound,
    FunctionAdded,
    FunctionRemoved,
    PciBus,
    PciDriver,
    PciFunction,
)
from mdevcore.sysfs.mdev_view import relative_link
from mdevcore.sysfs.tree import Dir, SysfsTree

log = logging.getLogger(__name__)

PCI_DEVICES = "bus/pci/devices"
PCI_DRIVERS = "bus/pci/drivers"
AUX_DEVICES = "bus/auxiliary/devices"
AUX_DRIVERS = "bus/auxiliary/drivers"


def device_path(fn: PciFunction) -> str:
    return f"devices/pci{fn.bdf.bus_name}/{fn.name}"


def aux_path(aux: AuxDevice) -> str:
    return f"{device_path(aux.parent)}/{aux.name}"


def _uevent(fn: PciFunction) -> str:
    lines = [f"DRIVER={fn.driver.name}"] if fn.driver is not None else []
    lines += [
        f"PCI_CLASS={fn.class_code:X}",
        f"PCI_ID={fn.vendor:04X}:{fn.device_id:04X}",
        f"PCI_SUBSYS_ID={fn.subsystem_vendor:04X}:{fn.subsystem_device:04X}",
        f"PCI_SLOT_NAME={fn.name}",
        f"MODALIAS=pci:v{fn.vendor:08X}d{fn.device_id:08X}"
        f"sv{fn.subsystem_vendor:08X}sd{fn.subsystem_device:08X}"
        f"bc{fn.class_code >> 16:02X}sc{(fn.class_code >> 8) & 0xFF:02X}"
        f"i{fn.class_code & 0xFF:02X}",
    ]
    return "\n".join(lines) + "\n"


def _constant(value: str) -> Callable[[], str]:
    return lambda: value


class PciSysfs:
    """Builds and maintains the PCI part of a :class:`SysfsTree` for ``bus``."""

    def __init__(self, bus: PciBus, tree: SysfsTree | None = None) -> None:
        self.bus = bus
        self.tree = tree or SysfsTree()
        for skeleton in (PCI_DEVICES, PCI_DRIVERS, AUX_DEVICES, AUX_DRIVERS, "class/pci_bus"):
            self.tree.mkdir(skeleton, keep=True)
        self._bus_roots: set[str] = set()
        # device -> top-level names its driver added (files or directories)
        self._driver_attrs: dict[str, list[str]] = {}
        self._drivers_probe()
        bus.subscribe(self._on_event)

    def close(self) -> None:
        self.bus.unsubscribe(self._on_event)

    def _drivers_probe(self) -> None:
        pci = self.tree.directory("bus/pci")
        if "drivers_probe" not in pci.children:
            self.tree.add_attr(pci, "drivers_probe", store=self.bus.drivers_probe_store)

    def _on_event(self, event: BusEvent) -> None:
        with self.tree.lock:
            if isinstance(event, DriverRegistered):
                self._add_driver(event.driver)
            elif isinstance(event, AuxDriverRegistered):
                self.tree.mkdir(f"{AUX_DRIVERS}/{event.name}", keep=True)
            elif isinstance(event, FunctionAdded):
                self._add_function(event.fn)
            elif isinstance(event, FunctionRemoved):
                self._remove_function(event.fn)
            elif isinstance(event, DriverBound):
                self._bind(event.fn, event.driver)
            elif isinstance(event, DriverUnbound):
                self._unbind(event.fn, event.driver)
            elif isinstance(event, AuxAdded):
                self._add_aux(event.aux)
            elif isinstance(event, AuxRemoved):
                self._remove_aux(event.aux)
            elif isinstance(event, AuxBound):
                self._bind_aux(event.aux)
            elif isinstance(event, AuxUnbound):
                self._unbind_aux(event.aux, event.driver)

    def _remove_child(self, directory: str, name: str) -> None:
        try:
            holder = self.tree.directory(directory)
        except OSError:
            return
        node = holder.children.get(name)
        if node is not None:
            self.tree.remove(node)

    # --- drivers --------------------------------------------------------------------

    def _add_driver(self, driver: PciDriver) -> None:
        t = self.tree
        bus = self.bus
        name = driver.name
        ddir = t.mkdir(f"{PCI_DRIVERS}/{name}", keep=True)

        def bind(data: bytes) -> None:
            bus.bind_store(name, data)

        def unbind(data: bytes) -> None:
            bus.unbind_store(name, data)

        t.add_attr(ddir, "bind", store=bind)
        t.add_attr(ddir, "unbind", store=unbind)

    # --- functions -------------------------------------------------------------------

    def _bus_root(self, fn: PciFunction) -> None:
        bus_name = fn.bdf.bus_name
        if bus_name in self._bus_roots:
            return
        t = self.tree
        root = f"devices/pci{bus_name}"
        t.mkdir(root, keep=True)
        pci_bus = t.mkdir(f"{root}/pci_bus/{bus_name}", keep=True)
        t.add_link(pci_bus, "device", relative_link(t.path_of(pci_bus), root))
        t.add_link(
            t.directory("class/pci_bus"),
            bus_name,
            relative_link("class/pci_bus", t.path_of(pci_bus)),
        )
        self._bus_roots.add(bus_name)

    def _add_function(self, fn: PciFunction) -> None:
        t = self.tree
        bus = self.bus
        self._bus_root(fn)
        path = device_path(fn)
        d = t.mkdir(path, volatile=True)
        ident = {
            "vendor": lambda: f"0x{fn.vendor:04x}\n",
            "device": lambda: f"0x{fn.device_id:04x}\n",
            "subsystem_vendor": lambda: f"0x{fn.subsystem_vendor:04x}\n",
            "subsystem_device": lambda: f"0x{fn.subsystem_device:04x}\n",
            "class": lambda: f"0x{fn.class_code:06x}\n",
            "revision": lambda: f"0x{fn.revision:02x}\n",
        }
        for name, show in ident.items():
            t.add_attr(d, name, show, volatile=True)
        t.add_attr(d, "config", lambda: bytes(fn.device.config.raw), volatile=True)
        t.add_attr(d, "uevent", lambda: _uevent(fn), volatile=True)

        def show_override() -> str:
            return f"{fn.driver_override if fn.driver_override is not None else '(null)'}\n"

        def store_override(data: bytes) -> None:
            bus.driver_override_store(fn, data)

        t.add_attr(d, "driver_override", show_override, store_override, volatile=True)
        t.add_link(d, "subsystem", relative_link(path, "bus/pci"), volatile=True)
        if fn.sriov is not None:
            self._add_sriov_attrs(d, fn)
        if fn.physfn is not None:
            pf_path = device_path(fn.physfn)
            t.add_link(d, "physfn", relative_link(path, pf_path), volatile=True)
            if fn.vf_index is not None:
                pf_dir = t.directory(pf_path)
                t.add_link(
                    pf_dir, f"virtfn{fn.vf_index}", relative_link(pf_path, path), volatile=True
                )
        t.add_link(
            t.directory(PCI_DEVICES), fn.name, relative_link(PCI_DEVICES, path), volatile=True
        )

    def _add_sriov_attrs(self, d: Dir, pf: PciFunction) -> None:
        t = self.tree
        bus = self.bus
        sriov = pf.sriov
        assert sriov is not None

        def store_numvfs(data: bytes) -> None:
            bus.sriov_numvfs_store(pf, data)

        def store_autoprobe(data: bytes) -> None:
            bus.sriov_autoprobe_store(pf, data)

        t.add_attr(d, "sriov_totalvfs", lambda: f"{pf.total_vfs}\n", volatile=True)
        t.add_attr(d, "sriov_numvfs", lambda: f"{pf.num_vfs}\n", store_numvfs, volatile=True)
        t.add_attr(d, "sriov_offset", lambda: f"{pf.vf_offset}\n", volatile=True)
        t.add_attr(d, "sriov_stride", lambda: f"{pf.vf_stride}\n", volatile=True)
        t.add_attr(d, "sriov_vf_device", lambda: f"{pf.vf_device_id:x}\n", volatile=True)
        t.add_attr(
            d,
            "sriov_drivers_autoprobe",
            lambda: f"{int(sriov.drivers_autoprobe)}\n",
            store_autoprobe,
            volatile=True,
        )

    def _remove_function(self, fn: PciFunction) -> None:
        self._remove_child(PCI_DEVICES, fn.name)
        if fn.physfn is not None and fn.vf_index is not None:
            self._remove_child(device_path(fn.physfn), f"virtfn{fn.vf_index}")
        self._remove_child(f"devices/pci{fn.bdf.bus_name}", fn.name)
        self._driver_attrs.pop(fn.name, None)

    # --- binding -----------------------------------------------------------------------

    def _bind(self, fn: PciFunction, driver: PciDriver) -> None:
        t = self.tree
        path = device_path(fn)
        drv_path = f"{PCI_DRIVERS}/{driver.name}"
        d = t.directory(path)
        t.add_link(d, "driver", relative_link(path, drv_path), volatile=True)
        t.add_link(t.directory(drv_path), fn.name, relative_link(drv_path, path), volatile=True)
        added = []
        for rel, value in driver.device_attributes(fn).items():
            parts = [p for p in rel.split("/") if p]
            if not parts or any(p in (".", "..") for p in parts):
                log.warning("%s: ignoring bad attribute path %r", fn.name, rel)
                continue
            holder = t.mkdir(f"{path}/{'/'.join(parts[:-1])}", volatile=True) if parts[:-1] else d
            show = value if callable(value) else _constant(value)  # callables: read each time
            t.add_attr(holder, parts[-1], show, volatile=True)
            added.append(parts[0])
        self._driver_attrs[fn.name] = added

    def _unbind(self, fn: PciFunction, driver: PciDriver) -> None:
        path = device_path(fn)
        self._remove_child(path, "driver")
        self._remove_child(f"{PCI_DRIVERS}/{driver.name}", fn.name)
        for top in self._driver_attrs.pop(fn.name, []):
            self._remove_child(path, top)

    # --- auxiliary devices ------------------------------------------------------------

    def _add_aux(self, aux: AuxDevice) -> None:
        t = self.tree
        path = aux_path(aux)
        d = t.mkdir(path, volatile=True)
        t.add_attr(
            d, "uevent", lambda: f"MODALIAS=auxiliary:{aux.name.rsplit('.', 1)[0]}\n", volatile=True
        )
        t.add_link(d, "subsystem", relative_link(path, "bus/auxiliary"), volatile=True)
        t.add_link(
            t.directory(AUX_DEVICES), aux.name, relative_link(AUX_DEVICES, path), volatile=True
        )

    def _remove_aux(self, aux: AuxDevice) -> None:
        self._remove_child(AUX_DEVICES, aux.name)
        self._remove_child(device_path(aux.parent), aux.name)

    def _bind_aux(self, aux: AuxDevice) -> None:
        t = self.tree
        assert aux.driver is not None
        path = aux_path(aux)
        drv_path = f"{AUX_DRIVERS}/{aux.driver}"
        t.add_link(t.directory(path), "driver", relative_link(path, drv_path), volatile=True)
        t.add_link(t.directory(drv_path), aux.name, relative_link(drv_path, path), volatile=True)

    def _unbind_aux(self, aux: AuxDevice, driver: str) -> None:
        self._remove_child(aux_path(aux), "driver")
        self._remove_child(f"{AUX_DRIVERS}/{driver}", aux.name)
