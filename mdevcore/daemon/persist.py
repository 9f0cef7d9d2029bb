"""--persist: remember the devices that exist and recreate them after a restart.

One JSON file per device, ``<dir>/<uuid>``, written atomically when the
device is created and removed with it.  Files stay when the daemon stops,
which is the point.

What a crash loses: the record is written (a temporary file renamed over
``<uuid>``) and a remove's unlink done before ``create``/``remove``
returns, with no fsync.  So the daemon crashing or being killed at any
moment loses nothing that returned: the page cache holds it.  A power loss
or kernel crash may lose the last few seconds of changes (the
filesystem's commit interval, 5 s on ext4): a device created just before
may come back missing (or as an empty record, which restore skips with a
warning) and one removed just before may come back.  Without the reboot's
persistence mdevd offers, the kernel's own mdevs do not survive a reboot at
all; a flush per create would cost a disk write for that window.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from mdevcore.core import DeviceAdded, DeviceRemoved, MdevCore, MdevEvent

log = logging.getLogger(__name__)


class PersistStore:
    def __init__(self, core: MdevCore, directory: Path) -> None:
        self.core = core
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def restore(self) -> int:
        """Create the devices recorded in the directory; return how many."""
        restored = 0
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or path.name == "pci.json":
                continue  # a record being written, or the PCI state (pci_persist)
            try:
                dev_uuid = uuid.UUID(path.name)
                record = json.loads(path.read_text())
                self.core.create(record["parent"], record["mdev_type"], dev_uuid)
                restored += 1
            except (ValueError, KeyError, TypeError) as e:
                log.warning("persist: ignoring %s: %s", path, e)
            except OSError as e:
                log.warning("persist: cannot recreate %s: %s", path.name, e)
        return restored

    def start(self) -> None:
        """Follow the core from now on (call after restore)."""
        self.core.subscribe(self._on_event, replay=True)

    def stop(self) -> None:
        """Stop following, so shutting down keeps the records."""
        self.core.unsubscribe(self._on_event)

    def _on_event(self, event: MdevEvent) -> None:
        if isinstance(event, DeviceAdded):
            dev = event.device
            record = {"parent": dev.parent.name, "mdev_type": dev.type.id}
            path = self.directory / dev.name
            tmp = path.with_name(f".{dev.name}.tmp")
            try:
                tmp.write_text(json.dumps(record) + "\n")
                os.replace(tmp, path)
            except OSError as e:
                log.warning("persist: cannot record mdev %s: %s", dev.uuid, e)
        elif isinstance(event, DeviceRemoved):
            (self.directory / event.device.name).unlink(missing_ok=True)
