"""A host's PCI bus as the kernel's driver core sees it: functions, drivers, binding, SR-IOV.

The model (drivers/base/bus.c, drivers/pci/pci-driver.c, drivers/pci/iov.c)
knows nothing of sysfs files or sockets: the sysfs view
(``mdevcore.sysfs.pci_view``) observes it, and each ``*_store`` method
is what a write to the matching sysfs attribute does, errno included:

- ``bind_store``: unknown device or no match ENODEV, already bound EBUSY;
  a VF of a PF with ``sriov_drivers_autoprobe`` 0 probes only with a
  ``driver_override`` (ENODEV otherwise), as pci_device_can_probe();
- ``unbind_store``: ENODEV unless the device is bound to that driver;
- ``driver_override_store``: "" or "\\n" clears, text up to a newline sets;
- ``sriov_numvfs_store``: not a u16 EINVAL, > TotalVFs ERANGE, same count
  no-op, no PF driver (or one without sriov_configure) ENOENT, a non-zero
  count while VFs exist EBUSY, 0 removes every VF.

Auxiliary devices (drivers/base/auxiliary.c) are kept here too, since the
PF drivers that create them live on this bus.

Not thread-safe: every call comes from one trio thread (FUSE handlers and
the control socket of mdevd); observers run synchronously inside the call.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from mdevcore.kernel_parse import kstrtobool, kstrtoul, sysfs_streq
from mdevcore.observers import Observers
from mdevcore.pci import caps
from mdevcore.pci.device import PciDevice

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
PCI_ANY_ID = -1


# --- addresses ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Bdf:
    """A PCI address: domain, bus, device (slot) and function."""

    domain: int
    bus: int
    devfn: int  # slot << 3 | function

    @classmethod
    def parse(cls, text: str) -> Bdf:
        """Parse ``DDDD:BB:SS.F`` (the form sysfs names devices by)."""
        try:
            domain, bus, slotfn = text.split(":")
            slot, fn = slotfn.split(".")
            d, b, s, f = int(domain, 16), int(bus, 16), int(slot, 16), int(fn, 16)
        except ValueError:
            raise ValueError(f"{text!r} is not a PCI address DDDD:BB:SS.F") from None
        if not (0 <= d <= 0xFFFF and 0 <= b <= 0xFF and 0 <= s <= 0x1F and 0 <= f <= 7):
            raise ValueError(f"{text!r} is out of range")
        if len(domain) != 4 or len(bus) != 2 or len(slot) != 2 or len(fn) != 1:
            raise ValueError(f"{text!r} is not in the canonical DDDD:BB:SS.F form")
        return cls(d, b, s << 3 | f)

    @property
    def routing_id(self) -> int:
        return self.bus << 8 | self.devfn

    def offset(self, delta: int) -> Bdf:
        """The address ``delta`` routing ids further (VF = PF + offset + n*stride)."""
        rid = self.routing_id + delta
        return Bdf(self.domain, rid >> 8, rid & 0xFF)

    @property
    def bus_name(self) -> str:
        """The bus as sysfs names it, e.g. ``0000:60``."""
        return f"{self.domain:04x}:{self.bus:02x}"

    def __str__(self) -> str:
        return f"{self.bus_name}:{self.devfn >> 3:02x}.{self.devfn & 7:x}"


# --- functions, drivers, auxiliary devices ----------------------------------------


class SriovProvider(Protocol):
    """What a PF device offers the SR-IOV core: its VFs' hardware."""

    def vf_device(self, index: int, bdf: Bdf) -> PciDevice:
        """The VF ``index`` (0-based) appearing at ``bdf``: build it."""
        ...

    def vf_gone(self, index: int, device: PciDevice) -> None:
        """The VF was removed (SR-IOV disabled): release what vf_device made."""
        ...


@dataclasses.dataclass
class Sriov:
    """SR-IOV state of a PF that the capability does not hold."""

    provider: SriovProvider
    drivers_autoprobe: bool = True
    vfs: list[PciFunction] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class PciFunction:
    """One PCI function: its address, its hardware and how the host uses it."""

    bdf: Bdf
    device: PciDevice
    physfn: PciFunction | None = None
    vf_index: int | None = None
    driver: PciDriver | None = None
    driver_override: str | None = None
    sriov: Sriov | None = None

    @property
    def name(self) -> str:
        return str(self.bdf)

    @property
    def vendor(self) -> int:
        return self.device.config.get_u16(0x00)

    @property
    def device_id(self) -> int:
        return self.device.config.get_u16(0x02)

    @property
    def class_code(self) -> int:
        return self.device.config.get_u32(0x08) >> 8

    @property
    def subsystem_vendor(self) -> int:
        return self.device.config.get_u16(0x2C)

    @property
    def subsystem_device(self) -> int:
        return self.device.config.get_u16(0x2E)

    @property
    def revision(self) -> int:
        return self.device.config.get_u8(0x08)

    # The SR-IOV capability registers, read where the kernel reads them.
    def _sriov_reg(self, reg: int) -> int:
        layout = self.device.sriov
        if layout is None:
            raise OSError(errno.ENOENT, f"{self.name} has no SR-IOV capability")
        return self.device.config.get_u16(layout.offset + reg)

    @property
    def total_vfs(self) -> int:
        return self._sriov_reg(caps.SRIOV_TOTAL_VF)

    @property
    def num_vfs(self) -> int:
        return self.device.sriov_state[0] if self.device.sriov_state[1] else 0

    @property
    def vf_offset(self) -> int:
        return self._sriov_reg(caps.SRIOV_VF_OFFSET)

    @property
    def vf_stride(self) -> int:
        return self._sriov_reg(caps.SRIOV_VF_STRIDE)

    @property
    def vf_device_id(self) -> int:
        return self._sriov_reg(caps.SRIOV_VF_DID)


@dataclasses.dataclass(frozen=True, slots=True)
class PciId:
    """One id-table entry (struct pci_device_id); PCI_ANY_ID matches anything.

    ``override_only``: match only a device whose driver_override names the
    driver (PCI_DRIVER_OVERRIDE_DEVICE_VFIO, what VFIO variant drivers use).
    """

    vendor: int = PCI_ANY_ID
    device: int = PCI_ANY_ID
    class_code: int = 0
    class_mask: int = 0
    override_only: bool = False

    def matches(self, fn: PciFunction) -> bool:
        return (
            self.vendor in (PCI_ANY_ID, fn.vendor)
            and self.device in (PCI_ANY_ID, fn.device_id)
            and (fn.class_code & self.class_mask) == (self.class_code & self.class_mask)
        )


class PciDriver:
    """A PCI driver: an id table plus probe/remove (and maybe sriov_configure).

    Subclasses override what they need; probe and sriov_configure raise
    OSError(errno) to fail, which reaches the sysfs writer.
    """

    name: str = "pci-driver"
    ids: tuple[PciId, ...] = ()
    has_sriov_configure = False

    def probe(self, fn: PciFunction) -> None:
        """Take the device (it is bound once this returns)."""

    def remove(self, fn: PciFunction) -> None:
        """Let go of the device (it is unbound once this returns)."""

    def sriov_configure(self, bus: PciBus, fn: PciFunction, num_vfs: int) -> int:
        """Enable ``num_vfs`` VFs (0: disable); return how many were enabled."""
        raise OSError(errno.ENOENT, f"{self.name} cannot configure SR-IOV")

    def device_attributes(self, fn: PciFunction) -> Mapping[str, str | Callable[[], str]]:
        """Read-only attributes the driver adds to a bound device's directory.

        A value is the text, or a function giving it each time it is read.
        """
        return {}

    def match(self, fn: PciFunction) -> bool:
        """pci_match_device(): driver_override first, then the id table."""
        if fn.driver_override is not None and fn.driver_override != self.name:
            return False
        for entry in self.ids:
            if entry.matches(fn) and (not entry.override_only or fn.driver_override is not None):
                return True
        return fn.driver_override is not None  # an override matches any device


@dataclasses.dataclass(eq=False)
class AuxDevice:
    """An auxiliary-bus device, e.g. ``pds_core.LM.1``, child of a PCI function."""

    name: str
    parent: PciFunction
    driver: str | None = None


# --- events ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionAdded:
    fn: PciFunction


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionRemoved:
    fn: PciFunction


@dataclasses.dataclass(frozen=True, slots=True)
class DriverBound:
    fn: PciFunction
    driver: PciDriver


@dataclasses.dataclass(frozen=True, slots=True)
class DriverUnbound:
    fn: PciFunction
    driver: PciDriver


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionChanged:
    """Host-side settings of ``fn`` changed that no other event shows: its
    driver_override, its PF's sriov_drivers_autoprobe, or a driver's
    parameter of it (devlink).  Lets state be recorded (mdevd --persist)."""

    fn: PciFunction


@dataclasses.dataclass(frozen=True, slots=True)
class DriverRegistered:
    driver: PciDriver


@dataclasses.dataclass(frozen=True, slots=True)
class AuxDriverRegistered:
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class AuxAdded:
    aux: AuxDevice


@dataclasses.dataclass(frozen=True, slots=True)
class AuxRemoved:
    aux: AuxDevice


@dataclasses.dataclass(frozen=True, slots=True)
class AuxBound:
    aux: AuxDevice


@dataclasses.dataclass(frozen=True, slots=True)
class AuxUnbound:
    aux: AuxDevice
    driver: str


BusEvent = (
    FunctionAdded
    | FunctionRemoved
    | FunctionChanged
    | DriverBound
    | DriverUnbound
    | DriverRegistered
    | AuxDriverRegistered
    | AuxAdded
    | AuxRemoved
    | AuxBound
    | AuxUnbound
)
Observer = Callable[[BusEvent], None]


# --- the bus --------------------------------------------------------------------


class PciBus:
    """Functions and drivers of one host, with the kernel's bind rules."""

    def __init__(self) -> None:
        self.functions: dict[str, PciFunction] = {}
        self.drivers: dict[str, PciDriver] = {}
        self.aux_devices: dict[str, AuxDevice] = {}
        self.aux_drivers: list[str] = []
        # Changed from the daemon's trio thread only (mdevcore.observers).
        self._observers: Observers[BusEvent] = Observers()

    def subscribe(self, observer: Observer) -> None:
        """Follow the bus; what exists already is replayed first."""
        existing: list[BusEvent] = [DriverRegistered(d) for d in self.drivers.values()]
        existing += [AuxDriverRegistered(name) for name in self.aux_drivers]
        for fn in sorted(self.functions.values(), key=lambda f: f.bdf):
            existing.append(FunctionAdded(fn))
            if fn.driver is not None:
                existing.append(DriverBound(fn, fn.driver))
        for aux in self.aux_devices.values():
            existing.append(AuxAdded(aux))
            if aux.driver is not None:
                existing.append(AuxBound(aux))
        self._observers.subscribe(observer, existing)

    def unsubscribe(self, observer: Observer) -> None:
        self._observers.unsubscribe(observer)

    def _emit(self, event: BusEvent) -> None:
        self._observers.emit(event)

    def changed(self, fn: PciFunction) -> None:
        """A driver changed a setting of ``fn`` (e.g. a devlink parameter): tell observers."""
        self._emit(FunctionChanged(fn))

    def function(self, name: str) -> PciFunction:
        fn = self.functions.get(name)
        if fn is None:
            raise OSError(errno.ENODEV, f"no PCI device {name}")
        return fn

    # --- drivers --------------------------------------------------------------

    def register_driver(self, driver: PciDriver) -> None:
        """Register ``driver`` and let it probe the unbound devices it matches."""
        if driver.name in self.drivers:
            raise OSError(errno.EEXIST, f"driver {driver.name} is registered")
        self.drivers[driver.name] = driver
        self._emit(DriverRegistered(driver))
        for fn in sorted(self.functions.values(), key=lambda f: f.bdf):
            if fn.driver is None and self._autoprobe_allowed(fn) and driver.match(fn):
                self._try_probe(fn, driver)

    def register_aux_driver(self, name: str) -> None:
        if name not in self.aux_drivers:
            self.aux_drivers.append(name)
            self._emit(AuxDriverRegistered(name))

    # --- functions ------------------------------------------------------------

    def add_function(self, fn: PciFunction) -> None:
        """A device appears (hotplug, VF enable) and the drivers probe it."""
        if fn.name in self.functions:
            raise OSError(errno.EEXIST, f"PCI device {fn.name} exists")
        self.functions[fn.name] = fn
        self._emit(FunctionAdded(fn))
        if self._autoprobe_allowed(fn):
            self._attach_any(fn)

    def remove_function(self, fn: PciFunction) -> None:
        """Unbind and remove ``fn`` (its VFs first, as pci_stop_and_remove does)."""
        if fn.driver is not None:
            self._detach(fn)
        if fn.sriov is not None and fn.sriov.vfs:
            self.disable_sriov(fn)
        for aux in [a for a in self.aux_devices.values() if a.parent is fn]:
            self.remove_aux(aux)
        del self.functions[fn.name]
        self._emit(FunctionRemoved(fn))

    def _autoprobe_allowed(self, fn: PciFunction) -> bool:
        """pci_device_can_probe(): a VF probes only if its PF says so or it has an override."""
        pf = fn.physfn
        if pf is None or pf.sriov is None:
            return True
        return pf.sriov.drivers_autoprobe or fn.driver_override is not None

    def _attach_any(self, fn: PciFunction) -> None:
        for driver in list(self.drivers.values()):
            if driver.match(fn) and self._try_probe(fn, driver):
                return

    def _try_probe(self, fn: PciFunction, driver: PciDriver) -> bool:
        try:
            self._probe(fn, driver)
        except OSError as e:
            log.warning("%s: probe of %s failed: %s", driver.name, fn.name, e)
            return False
        return True

    def _probe(self, fn: PciFunction, driver: PciDriver) -> None:
        if not self._autoprobe_allowed(fn):
            raise OSError(errno.ENODEV, f"{fn.name}: VF autoprobe is off and no driver_override")
        driver.probe(fn)
        fn.driver = driver
        log.info("%s: bound to %s", fn.name, driver.name)
        self._emit(DriverBound(fn, driver))

    def _detach(self, fn: PciFunction) -> None:
        driver = fn.driver
        assert driver is not None
        try:
            driver.remove(fn)
        finally:
            fn.driver = None  # remove cannot fail in the kernel either
            log.info("%s: unbound from %s", fn.name, driver.name)
            self._emit(DriverUnbound(fn, driver))

    # --- what sysfs writes do ---------------------------------------------------

    def _find(self, data: bytes) -> PciFunction | None:
        for fn in self.functions.values():
            if sysfs_streq(data, fn.name):
                return fn
        return None

    def bind_store(self, driver_name: str, data: bytes) -> None:
        """``echo BDF > bus/pci/drivers/<driver>/bind`` (bind_store)."""
        driver = self.drivers[driver_name]
        fn = self._find(data)
        if fn is None or not driver.match(fn):
            raise OSError(errno.ENODEV, f"{driver_name}: no matching device {data!r}")
        if fn.driver is not None:
            raise OSError(errno.EBUSY, f"{fn.name} is bound to {fn.driver.name}")
        self._probe(fn, driver)

    def unbind_store(self, driver_name: str, data: bytes) -> None:
        """``echo BDF > bus/pci/drivers/<driver>/unbind`` (unbind_store)."""
        fn = self._find(data)
        if fn is None or fn.driver is None or fn.driver.name != driver_name:
            raise OSError(errno.ENODEV, f"{driver_name}: {data!r} is not bound to it")
        self._detach(fn)

    def drivers_probe_store(self, data: bytes) -> None:
        """``echo BDF > bus/pci/drivers_probe``: attach an unbound device (ENODEV if none)."""
        fn = self._find(data)
        if fn is None:
            raise OSError(errno.ENODEV, f"no PCI device {data!r}")
        if fn.driver is None:
            self._attach_any(fn)

    def driver_override_store(self, fn: PciFunction, data: bytes) -> None:
        """driver_set_override(): up to the first newline; empty clears."""
        if len(data) >= PAGE_SIZE - 1:
            raise OSError(errno.EINVAL, "driver_override is too long")
        text = data.split(b"\0", 1)[0].split(b"\n", 1)[0]
        fn.driver_override = text.decode(errors="replace") if text else None
        self._emit(FunctionChanged(fn))

    def sriov_numvfs_store(self, pf: PciFunction, data: bytes) -> None:
        """``echo N > sriov_numvfs`` (sriov_numvfs_store)."""
        try:
            num_vfs = kstrtoul(data, 16)
        except OSError:
            raise OSError(errno.EINVAL, f"sriov_numvfs: {data!r} is not a number") from None
        if num_vfs > pf.total_vfs:
            raise OSError(errno.ERANGE, f"{num_vfs} VFs, sriov_totalvfs is {pf.total_vfs}")
        if num_vfs == pf.num_vfs:
            return
        driver = pf.driver
        if driver is None or not driver.has_sriov_configure:
            raise OSError(errno.ENOENT, f"{pf.name}: no PF driver can configure SR-IOV")
        if num_vfs and pf.num_vfs:
            log.warning(
                "%s: %d VFs already enabled. Disable before enabling %d VFs",
                pf.name,
                pf.num_vfs,
                num_vfs,
            )
            raise OSError(errno.EBUSY, f"{pf.num_vfs} VFs already enabled")
        enabled = driver.sriov_configure(self, pf, num_vfs)
        if enabled != num_vfs:
            log.warning("%s: %d VFs requested; %d enabled", pf.name, num_vfs, enabled)

    def sriov_autoprobe_store(self, pf: PciFunction, data: bytes) -> None:
        assert pf.sriov is not None
        pf.sriov.drivers_autoprobe = kstrtobool(data)
        self._emit(FunctionChanged(pf))

    # --- SR-IOV core (pci_enable_sriov / pci_disable_sriov) ---------------------

    def vf_address(self, pf: PciFunction, index: int) -> Bdf:
        return pf.bdf.offset(pf.vf_offset + index * pf.vf_stride)

    def enable_sriov(self, pf: PciFunction, num_vfs: int) -> None:
        """Program the capability and add the VFs, each probed as it appears."""
        if pf.sriov is None:
            raise OSError(errno.ENOENT, f"{pf.name} has no SR-IOV")
        if pf.sriov.vfs:
            raise OSError(errno.EBUSY, f"{pf.name}: VFs already enabled")
        pf.device.sriov_configure(num_vfs)
        try:
            for index in range(num_vfs):
                bdf = self.vf_address(pf, index)
                device = pf.sriov.provider.vf_device(index, bdf)
                vf = PciFunction(bdf, device, physfn=pf, vf_index=index)
                pf.sriov.vfs.append(vf)
                self.add_function(vf)
        except Exception:
            self.disable_sriov(pf)
            raise
        log.info("%s: %d VFs enabled", pf.name, num_vfs)

    def disable_sriov(self, pf: PciFunction) -> None:
        """Remove every VF (unbinding it first), then clear VF Enable."""
        assert pf.sriov is not None
        while pf.sriov.vfs:
            vf = pf.sriov.vfs[-1]
            # Identity, not name: when enabling failed because another function
            # holds this address, that function must stay.
            if self.functions.get(vf.name) is vf:
                self.remove_function(vf)
            pf.sriov.vfs.pop()
            assert vf.vf_index is not None
            pf.sriov.provider.vf_gone(vf.vf_index, vf.device)
        pf.device.sriov_configure(0)
        log.info("%s: VFs disabled", pf.name)

    # --- auxiliary bus ------------------------------------------------------------

    def add_aux(self, aux: AuxDevice) -> None:
        if aux.name in self.aux_devices:
            raise OSError(errno.EEXIST, f"auxiliary device {aux.name} exists")
        self.aux_devices[aux.name] = aux
        self._emit(AuxAdded(aux))

    def remove_aux(self, aux: AuxDevice) -> None:
        if aux.driver is not None:
            self.unbind_aux(aux)
        if self.aux_devices.get(aux.name) is aux:
            del self.aux_devices[aux.name]
            self._emit(AuxRemoved(aux))

    def bind_aux(self, aux: AuxDevice, driver: str) -> None:
        if driver not in self.aux_drivers:
            raise OSError(errno.ENODEV, f"no auxiliary driver {driver}")
        if aux.driver is not None:
            raise OSError(errno.EBUSY, f"{aux.name} is bound to {aux.driver}")
        aux.driver = driver
        self._emit(AuxBound(aux))

    def unbind_aux(self, aux: AuxDevice) -> None:
        if aux.driver is None:
            return
        driver, aux.driver = aux.driver, None
        self._emit(AuxUnbound(aux, driver))
