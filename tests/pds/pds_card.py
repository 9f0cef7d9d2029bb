"""A pds card hosted the way mdevd hosts it: tree, named vfio-user servers, devlink.

(Named pds_card, not conftest: test modules import from it, and several
test directories have a conftest.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mdevcore.daemon.devlink import DevlinkRegistry, Reply, run_devlink
from mdevcore.daemon.hosts import HostContext, NamedServers
from mdevcore.parents.pds.driver import PdsHost
from mdevcore.parents.pds.pf import PdsConfig
from mdevcore.pci.bus import PciBus
from mdevcore.sysfs.pci_view import PciSysfs
from mdevcore.sysfs.tree import SysfsTree

PF = "0000:60:00.0"
VF1 = "0000:60:00.1"
VF2 = "0000:60:00.2"
PF_DIR = f"bus/pci/devices/{PF}"
NS_SIZE = 16 << 20


@dataclasses.dataclass
class Card:
    tree: SysfsTree
    servers: NamedServers
    devlink: DevlinkRegistry
    host: PdsHost
    run_dir: Path

    def devlink_cmd(self, line: str) -> Reply:
        return run_devlink(self.devlink, line.split())

    def enable_lm(self, on: bool = True) -> None:
        value = "true" if on else "false"
        r = self.devlink_cmd(f"dev param set pci/{PF} name enable_lm value {value} cmode runtime")
        assert r.rc == 0, r.err


@asynccontextmanager
async def make_card(tmp_path: Path, **config: Any) -> AsyncIterator[Card]:
    """A started card (4 VFs of 16 MiB unless ``config`` says otherwise)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)  # a second card may follow the first (restarts)
    async with trio.open_nursery() as nursery:
        tree = SysfsTree()
        servers = NamedServers(run_dir, nursery)
        devlink = DevlinkRegistry()
        config = {"total_vfs": 4, "ns_size": NS_SIZE, **config}
        host = PdsHost(PdsConfig(backing_dir=tmp_path / "pds", **config))
        bus = PciBus()
        view = PciSysfs(bus, tree)  # as mdevd: one bus, one view, for every host
        host.start(HostContext(tree, servers, devlink, run_dir, bus))
        try:
            yield Card(tree, servers, devlink, host, run_dir)
        finally:
            host.stop()
            view.close()
            await servers.aclose()
            nursery.cancel_scope.cancel()
