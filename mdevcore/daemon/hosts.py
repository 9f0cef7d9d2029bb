"""Hosted parents: devices that are not mdevs (a PF and its SR-IOV VFs).

A hosted parent adds its functions and drivers to the daemon's PCI bus
(whose sysfs view the daemon keeps), registers devlink instances, and
asks :class:`NamedServers` to serve a device over vfio-user when a host
driver (e.g. pds_vfio) takes it.  The daemon gives
it a :class:`HostContext` at start and calls ``stop`` at shutdown.

:class:`~mdevcore.daemon.servers.NamedServers` (the same one that serves
the mdevs) schedules the change inside the synchronous sysfs write, and the
mirror settles it before the write returns, so the socket exists (or is
gone) when ``echo BDF > bind`` ends.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Protocol

from mdevcore.daemon.devlink import DevlinkRegistry
from mdevcore.daemon.iplink import NetdevRegistry
from mdevcore.daemon.servers import NamedServers
from mdevcore.pci.bus import PciBus
from mdevcore.sysfs.tree import SysfsTree

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class HostContext:
    """What the daemon lends a hosted parent for its lifetime."""

    tree: SysfsTree
    servers: NamedServers
    devlink: DevlinkRegistry
    run_dir: Path
    bus: PciBus  # the daemon's one PCI bus; its sysfs view is the daemon's too
    # PF netdevs that ``mdevd ip link set PF vf N ...`` reaches (the control socket's)
    netdevs: NetdevRegistry = dataclasses.field(default_factory=NetdevRegistry)


class HostedParent(Protocol):
    name: str

    def start(self, ctx: HostContext) -> None:
        """Appear in sysfs, register devlink instances (synchronously)."""
        ...

    def stop(self) -> None:
        """Remove devices (unserving them) and leave sysfs."""
        ...

    def banner(self, sysfs: Path, run_dir: Path) -> list[str]:
        """Lines for mdevd's start banner: how to use it."""
        ...
