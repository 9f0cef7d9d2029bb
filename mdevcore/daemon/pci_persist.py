"""--persist for the PCI bus: the host's SR-IOV and driver settings survive a restart.

What an administrator set up through sysfs and devlink on the hosted
parents' functions is recorded in ``<persist dir>/pci.json``, rewritten
atomically after every change of the bus: per function its driver and
driver_override, per PF its sriov_numvfs and sriov_drivers_autoprobe, and
the boolean devlink parameters of ``pci/<BDF>`` (pds_core's enable_lm).

At start, after the hosted parents added their functions, :meth:`restore`
replays that state in the order a setup script would (parameters, VFs,
overrides, bindings), so a VF bound to pds_vfio before a crash is served
again at the same socket path (the stale socket file is replaced).  The
namespace data of a VF lives in its backing file, which outlives the
daemon anyway.

Like the mdev records, the file stays when the daemon stops: :meth:`stop`
is called before the hosted parents tear their functions down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mdevcore.daemon.devlink import DevlinkRegistry
from mdevcore.pci.bus import BusEvent, PciBus, PciFunction

log = logging.getLogger(__name__)

PCI_STATE_FILE = "pci.json"
_VERSION = 1


class PciPersist:
    """Records the bus's host-side settings in ``path`` and restores them."""

    def __init__(self, bus: PciBus, devlink: DevlinkRegistry, path: Path) -> None:
        self.bus = bus
        self.devlink = devlink
        self.path = path
        self._following = False
        self._restoring = False

    # --- recording ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        functions: dict[str, Any] = {}
        for fn in sorted(self.bus.functions.values(), key=lambda f: f.bdf):
            record: dict[str, Any] = {
                "driver": fn.driver.name if fn.driver is not None else None,
                "driver_override": fn.driver_override,
            }
            if fn.sriov is not None:
                record["sriov"] = {
                    "numvfs": len(fn.sriov.vfs),
                    "drivers_autoprobe": fn.sriov.drivers_autoprobe,
                }
            params = self.devlink.instances.get(f"pci/{fn.name}", {})
            if params:
                record["devlink"] = {name: bool(p.get()) for name, p in sorted(params.items())}
            functions[fn.name] = record
        return {"version": _VERSION, "functions": functions}

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(), indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("persist: cannot record the PCI state in %s: %s", self.path, e)

    def start(self) -> None:
        """Follow the bus from now on (call after restore); records the state once."""
        self._following = True
        with self._restoring_scope():  # the replay of what exists: one save for it all
            self.bus.subscribe(self._on_event)
        self.save()

    def stop(self) -> None:
        """Stop following, so tearing the functions down keeps the record."""
        if self._following:
            self._following = False
            self.bus.unsubscribe(self._on_event)

    def _on_event(self, event: BusEvent) -> None:
        if not self._restoring:
            self.save()

    # --- restoring ----------------------------------------------------------

    def load(self) -> Mapping[str, Any]:
        """The recorded functions by name; empty (with a warning) if unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("persist: ignoring %s: %s", self.path, e)
            return {}
        functions = data.get("functions") if isinstance(data, dict) else None
        if not isinstance(functions, dict) or data.get("version") != _VERSION:
            log.warning("persist: ignoring %s: not a version %d PCI state", self.path, _VERSION)
            return {}
        return {k: v for k, v in functions.items() if isinstance(v, dict)}

    def restore(self) -> int:
        """Bring the bus to the recorded state; return how many functions were restored."""
        saved = self.load()
        restored = 0
        with self._restoring_scope():
            for name in sorted(saved):
                fn = self.bus.functions.get(name)
                if fn is None:  # a VF its PF could not enable again, or a PF not hosted now
                    log.warning("persist: PCI device %s is gone, its state is dropped", name)
                    continue
                if fn.physfn is not None:
                    continue  # VFs come back with their PF's sriov_numvfs
                restored += self._restore_function(fn, saved[name])
                if fn.sriov is not None and isinstance(saved[name].get("sriov"), dict):
                    restored += self._restore_sriov(fn, saved[name]["sriov"], saved)
        return restored

    @contextlib.contextmanager
    def _restoring_scope(self) -> Iterator[None]:
        self._restoring = True
        try:
            yield
        finally:
            self._restoring = False

    def _restore_function(self, fn: PciFunction, record: Mapping[str, Any]) -> int:
        override = _text(record.get("driver_override"))
        if override != (fn.driver_override or ""):
            _try(fn, "driver_override", self.bus.driver_override_store, fn, override.encode())
        self._restore_binding(fn, record)
        params = record.get("devlink")
        instance = self.devlink.instances.get(f"pci/{fn.name}", {})
        if isinstance(params, dict):
            for name, value in params.items():
                param = instance.get(name)
                if param is None or not isinstance(value, bool):
                    log.warning("persist: %s: devlink parameter %s not restored", fn.name, name)
                elif param.get() != value:
                    _try(fn, f"devlink {name}", param.set, value)
        return 1

    def _restore_binding(self, fn: PciFunction, record: Mapping[str, Any]) -> None:
        wanted = record.get("driver", False)
        if wanted is not None and not isinstance(wanted, str):
            if wanted is not False:
                log.warning("persist: %s: driver %r is not a driver name", fn.name, wanted)
            return  # not recorded (or nonsense): leave the binding as it is
        current = fn.driver.name if fn.driver is not None else None
        if wanted == current:
            return
        if current is not None:
            _try(fn, "unbind", self.bus.unbind_store, current, fn.name.encode())
        if isinstance(wanted, str):
            if wanted not in self.bus.drivers:
                log.warning("persist: %s: driver %s is not loaded", fn.name, wanted)
                return
            _try(fn, f"bind to {wanted}", self.bus.bind_store, wanted, fn.name.encode())

    def _restore_sriov(
        self, pf: PciFunction, sriov: Mapping[str, Any], saved: Mapping[str, Any]
    ) -> int:
        assert pf.sriov is not None
        numvfs = sriov.get("numvfs")
        autoprobe = sriov.get("drivers_autoprobe")
        restored = 0
        if type(numvfs) is int and numvfs > 0 and not pf.sriov.vfs:
            # No driver may grab a VF as it appears: each gets its own
            # recorded binding below, as after the script that set it up.
            pf.sriov.drivers_autoprobe = False
            _try(pf, "sriov_numvfs", self.bus.sriov_numvfs_store, pf, b"%d" % numvfs)
            for vf in pf.sriov.vfs:
                override = _text(saved.get(vf.name, {}).get("driver_override"))
                if override:
                    _try(
                        vf, "driver_override", self.bus.driver_override_store, vf, override.encode()
                    )
            # A VF bound while autoprobe was on may have no override: allow
            # its probe now, and set the recorded autoprobe afterwards.
            pf.sriov.drivers_autoprobe = True
            for vf in pf.sriov.vfs:
                self._restore_binding(vf, saved.get(vf.name, {}))
                restored += 1
        if isinstance(autoprobe, bool):
            pf.sriov.drivers_autoprobe = autoprobe
        return restored


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _try(fn: PciFunction, what: str, action: Any, *args: Any) -> None:
    """Apply one recorded setting; a refusal is logged and the rest goes on."""
    try:
        action(*args)
    except OSError as e:
        log.warning("persist: %s: cannot restore %s: %s", fn.name, what, e)
    else:
        log.info("persist: %s: restored %s", fn.name, what)
