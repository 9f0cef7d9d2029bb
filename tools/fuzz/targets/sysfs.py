"""The sysfs store parsers and stores, against a model of the kernel's rules.

Input: byte 0 picks the store, the rest is what one write(2) hands it (at
most a page, as the sysfs tree passes it on):

0 parse_uuid           4 sysfs_streq with a BDF        8 sriov_numvfs parse
1 kstrtoul             5 mdev create_store             9 sriov_drivers_autoprobe
2 kstrtoul, 16 bits    6 mdev remove_store
3 kstrtobool           7 driver_override_store, drivers_probe_store

Invariant: the same value or the same errno as ``kernel_model`` (the C
semantics of lib/kstrtox.c, sysfs_streq, mdev_sysfs.c, driver.c, iov.c);
the mdev stores run against a real MdevCore with the mtty parent (a
refused create makes no device, a refused or zero remove keeps it), the
PCI stores against a real PciBus.
"""

from __future__ import annotations

import errno
import logging
import uuid
from collections.abc import Callable

from mdevcore import kernel_parse as kp
from mdevcore.core import MdevCore
from mdevcore.pci.bus import Bdf, PciBus, PciFunction
from mdevcore.samples.counter import Counter
from mdevcore.samples.mtty.device import MttyDriver
from mdevcore.sysfs.mdev_view import create_store, remove_store
from mdevcore.tools.fuzz import Finding, check
from mdevcore.tools.fuzz.targets import kernel_model as km

PAGE_SIZE = 4096
BDF = "0000:00:01.0"
PARENT, TYPE = "mtty", "mtty-2"
KEPT = uuid.UUID("11111111-2222-3333-4444-555555555555")


def expected_create(buf: bytes) -> uuid.UUID | km.Errno:
    """The kernel's create_store parse (once found divergent: any 37th byte passes)."""
    return km.mdev_create(buf)


def ours(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as exc:
        return km.Errno(exc.errno or 0)


def same(what: str, data: bytes, got: object, want: object) -> None:
    # bool is an int: compare types too, so True never passes for 1.
    if type(got) is not type(want) or got != want:
        raise Finding(f"{what}({data[:60]!r}): ours {got!r}, the kernel's {want!r}")


class SysfsTarget:
    def __init__(self) -> None:
        logging.getLogger("mdevcore").setLevel(logging.CRITICAL)
        self.core = MdevCore()
        self.core.register_parent(PARENT, "devices/virtual/mtty/mtty", MttyDriver())
        self.bus = PciBus()
        self.fn = PciFunction(Bdf.parse(BDF), Counter())
        self.bus.add_function(self.fn)

    def run(self, data: bytes) -> None:
        if not data:
            return
        store, buf = data[0] % 10, data[1 : 1 + PAGE_SIZE]
        if store == 0:
            got = ours(lambda: kp.parse_uuid(buf))
            same("parse_uuid", buf, got, expected_create(buf))
        elif store in (1, 2):
            bits = 64 if store == 1 else 16
            same(f"kstrtou{bits}", buf, ours(lambda: kp.kstrtoul(buf, bits)), km.kstrtou(buf, bits))
        elif store == 3:
            same("kstrtobool", buf, ours(lambda: kp.kstrtobool(buf)), km.kstrtobool(buf))
        elif store == 4:
            same("sysfs_streq", buf, kp.sysfs_streq(buf, BDF), km.sysfs_streq(buf, BDF.encode()))
        elif store == 5:
            self._create(buf)
        elif store == 6:
            self._remove(buf)
        elif store == 7:
            self._pci(buf)
        elif store == 8:
            same("sriov_numvfs", buf, self._numvfs(buf), km.sriov_numvfs(buf))
        else:
            got = ours(lambda: kp.kstrtobool(buf))
            same("sriov_drivers_autoprobe", buf, got, km.sriov_autoprobe(buf))

    def _create(self, buf: bytes) -> None:
        before = set(self.core.devices)
        want = expected_create(buf)
        result = ours(lambda: create_store(self.core, PARENT, TYPE, buf))
        after = set(self.core.devices)
        try:
            if isinstance(want, km.Errno):
                same("create_store", buf, result, want)
                check(after == before, "a refused create made a device")
            else:
                check(not isinstance(result, km.Errno), f"create_store({buf!r}): {result}")
                check(after == before | {want}, f"create_store({buf!r}) made {after - before}")
        finally:
            for dev in after - before:
                self.core.remove(dev)

    def _remove(self, buf: bytes) -> None:
        if KEPT not in self.core.devices:
            self.core.create(PARENT, TYPE, KEPT)
        want = km.mdev_remove(buf)
        got = ours(lambda: remove_store(self.core, KEPT, buf))
        gone = KEPT not in self.core.devices
        if isinstance(want, km.Errno):
            same("remove_store", buf, got, want)
            check(not gone, "a refused remove removed the device")
        else:
            check(got is None, f"remove_store({buf!r}): {got}")
            check(gone == want, f"remove_store({buf!r}): removed={gone}, the kernel's {want}")

    def _pci(self, buf: bytes) -> None:
        want = km.driver_override(buf)
        got = ours(lambda: self.bus.driver_override_store(self.fn, buf))
        if isinstance(want, km.Errno):
            same("driver_override_store", buf, got, want)
        else:
            value = self.fn.driver_override
            wanted = None if want is None else want.decode(errors="replace")
            check(value == wanted, f"driver_override {value!r} for {buf!r}, kernel {wanted!r}")
        self.fn.driver_override = None
        found = km.sysfs_streq(buf, BDF.encode())
        got = ours(lambda: self.bus.drivers_probe_store(buf))
        same("drivers_probe_store", buf, got, None if found else km.Errno(errno.ENODEV))

    def _numvfs(self, buf: bytes) -> object:
        # The parse step of PciBus.sriov_numvfs_store (the rest needs a PF driver).
        try:
            return kp.kstrtoul(buf, 16)
        except OSError:
            return km.Errno(errno.EINVAL)

    def close(self) -> None:
        for dev in list(self.core.devices):
            self.core.remove(dev)


def make() -> SysfsTarget:
    return SysfsTarget()


def seeds() -> dict[str, bytes]:
    """What mdevctl, libvirt, driverctl and shell scripts write."""
    u = b"83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    return {
        "uuid-mdevctl": b"\0" + u,
        "uuid-echo": b"\0" + u + b"\n",
        "uuid-upper": b"\0" + u.upper(),
        "kstrtoul-hex": b"\1" + b"0x1f\n",
        "kstrtoul-octal": b"\1" + b"017",
        "kstrtoul-max": b"\1" + b"18446744073709551615\n",
        "kstrtou16-plus": b"\2" + b"+65535",
        "bool-on": b"\3" + b"on\n",
        "bool-n": b"\3" + b"N",
        "streq-bdf": b"\4" + BDF.encode() + b"\n",
        "create-echo": b"\5" + u + b"\n",
        "remove-1": b"\6" + b"1\n",
        "remove-0": b"\6" + b"0",
        "override-vfio": b"\7" + b"vfio-pci\n",
        "override-clear": b"\7" + b"\n",
        "numvfs-4": b"\x08" + b"4\n",
        "autoprobe-0": b"\x09" + b"0\n",
    }
