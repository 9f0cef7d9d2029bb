"""Start the devices mdevctl defined with ``--auto``, as udev does on a real host.

``mdevctl define --auto`` writes ``<config>/<parent>/<uuid>``, a JSON
object with ``mdev_type`` and ``"start": "auto"``; on a real host
mdevctl's udev rule starts those devices when their parent device appears
(``mdevctl start-parent-mdevs``).  mdevd has no udev: :class:`Autostart`
starts them for every parent registered when the daemon starts, and for
each parent registered later.  Devices that exist already (recreated by
--persist, or started by hand) are left alone; ``attrs`` in a definition
are not supported by the mirror's devices and are reported, not applied.
"""

from __future__ import annotations

import errno
import json
import logging
import uuid
from pathlib import Path

import trio

from mdevcore.core import MdevCore, MdevEvent, ParentAdded

log = logging.getLogger(__name__)


class Autostart:
    """Auto-start definitions in ``config`` (what ``mdevd mdevctl --config`` uses)."""

    def __init__(self, core: MdevCore, config: Path, nursery: trio.Nursery) -> None:
        self.core = core
        self.config = config
        self._nursery = nursery

    def start(self) -> int:
        """Start the definitions of the parents present; follow new ones. Returns how many."""
        started = sum(self.start_parent(name) for name in sorted(self.core.parents))
        self.core.subscribe(self._on_event)
        return started

    def stop(self) -> None:
        self.core.unsubscribe(self._on_event)

    def _on_event(self, event: MdevEvent) -> None:
        if isinstance(event, ParentAdded):
            # Observers must not call back into the core: start from a task.
            self._nursery.start_soon(self._start_later, event.parent.name)

    async def _start_later(self, parent: str) -> None:
        self.start_parent(parent)

    def start_parent(self, parent: str) -> int:
        """Create the auto-start devices defined for ``parent``; return how many."""
        directory = self.config / parent
        try:
            entries = sorted(directory.iterdir())
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("autostart: cannot read %s: %s", directory, e)
            return 0
        started = 0
        for path in entries:
            try:
                dev_uuid = uuid.UUID(path.name)
            except ValueError:
                continue  # not a definition (mdevctl names them by UUID)
            try:
                started += self._start_one(parent, dev_uuid, path)
            except OSError as e:
                log.warning("autostart: mdev %s on %s not started: %s", dev_uuid, parent, e)
        if started:
            log.info("autostart: started %d device(s) of %s", started, parent)
        return started

    def _start_one(self, parent: str, dev_uuid: uuid.UUID, path: Path) -> int:
        try:
            definition = json.loads(path.read_text())
        except ValueError as e:
            raise OSError(errno.EINVAL, f"{path} is not JSON: {e}") from None
        if not isinstance(definition, dict) or not isinstance(definition.get("mdev_type"), str):
            raise OSError(errno.EINVAL, f"{path} has no mdev_type")
        if definition.get("start") != "auto" or dev_uuid in self.core.devices:
            return 0
        if definition.get("attrs"):
            log.warning("autostart: mdev %s: attrs %r not applied", dev_uuid, definition["attrs"])
        self.core.create(parent, definition["mdev_type"], dev_uuid)
        return 1
