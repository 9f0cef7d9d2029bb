"""An IFCVF card hosted the way mdevd hosts it: tree, named vfio-user servers, netdevs.

(Named ifcvf_card, not conftest: test modules import from it.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mdevcore.daemon.devlink import DevlinkRegistry, Reply
from mdevcore.daemon.hosts import HostContext, NamedServers
from mdevcore.daemon.iplink import NetdevRegistry, run_ip
from mdevcore.parents.ifcvf.driver import IfcvfHost
from mdevcore.parents.ifcvf.pf import IfcvfConfig
from mdevcore.pci.bus import PciBus
from mdevcore.sysfs.pci_view import PciSysfs
from mdevcore.sysfs.tree import SysfsTree

PF = "0000:61:00.0"
VF0 = "0000:61:00.1"
VF1 = "0000:61:00.2"
PF_DIR = f"bus/pci/devices/{PF}"


@dataclasses.dataclass
class Card:
    tree: SysfsTree
    servers: NamedServers
    netdevs: NetdevRegistry
    host: IfcvfHost
    run_dir: Path

    def ip(self, line: str) -> Reply:
        return run_ip(self.netdevs, line.split())

    def write_err(self, path: str, data: str) -> int:
        with pytest.raises(OSError) as info:
            self.tree.write(path, data)
        assert info.value.errno is not None
        return info.value.errno

    async def bind_vfio(self, vf: str) -> str:
        """driver_override + bind to ifcvf_vfio; the VF's socket path once served."""
        t = self.tree
        t.write(f"bus/pci/devices/{vf}/driver_override", "ifcvf_vfio\n")
        t.write("bus/pci/drivers/ifcvf_vfio/bind", f"{vf}\n")
        await self.servers.settle()
        return t.read(f"bus/pci/devices/{vf}/vfio_user/socket").strip()

    async def vfs_for_vfio(self, count: int) -> list[str]:
        """Autoprobe off, ``count`` VFs, each bound to ifcvf_vfio: their socket paths."""
        self.tree.write(f"{PF_DIR}/sriov_drivers_autoprobe", "0")
        self.tree.write(f"{PF_DIR}/sriov_numvfs", f"{count}")
        return [await self.bind_vfio(f"0000:61:00.{n + 1}") for n in range(count)]


@asynccontextmanager
async def make_card(tmp_path: Path, **config: Any) -> AsyncIterator[Card]:
    """A started card (4 VFs, loopback backend, unless ``config`` says otherwise)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    async with trio.open_nursery() as nursery:
        tree = SysfsTree()
        servers = NamedServers(run_dir, nursery)
        netdevs = NetdevRegistry()
        host = IfcvfHost(IfcvfConfig(**config))
        bus = PciBus()
        view = PciSysfs(bus, tree)  # as mdevd: one bus, one view, for every host
        host.start(HostContext(tree, servers, DevlinkRegistry(), run_dir, bus, netdevs))
        try:
            yield Card(tree, servers, netdevs, host, run_dir)
        finally:
            host.stop()
            view.close()
            await servers.aclose()
            nursery.cancel_scope.cancel()
