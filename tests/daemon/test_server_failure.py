"""A device's server dying on its own: that device only, and the daemon's view says why."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from mdev_testdriver import ScratchDevice, register

from mdevcore.core import MdevCore
from mdevcore.daemon.servers import ServerManager
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX as CFG
from mdevcore.vfio_user.client import Client, VfioUserError

BROKEN = "accept failed: [Errno 22] Invalid argument"


def read_config(path: Path) -> bytes:
    with Client(path) as client:
        client.negotiate()
        try:
            client.region_read(99, 0, 4)  # one error, counted
        except VfioUserError:
            pass
        return client.region_read(CFG, 0, 4)


async def wait_for(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.01)


async def test_a_broken_listener_ends_only_its_device(
    tmp_path: Path, break_listener: Callable[[str], None], caplog: pytest.LogCaptureFixture
) -> None:
    core = MdevCore()
    register(core)
    broken, healthy = uuid.uuid4(), uuid.uuid4()
    vf = "0000:60:00.1"  # a hosted parent's device, served by BDF
    async with trio.open_nursery() as nursery:
        manager = ServerManager(core, tmp_path, nursery)
        servers = manager.servers
        core.create("pool", "pool-1", broken)
        core.create("pool", "pool-1", healthy)
        servers.serve(vf, ScratchDevice(1), label=f"VF {vf}")
        await manager.settle()
        sock = manager.socket_path(broken)
        await trio.to_thread.run_sync(read_config, sock)
        with caplog.at_level(logging.ERROR):
            break_listener(str(sock))
            break_listener(str(servers.socket_path(vf)))
            # the mdev goes with its server (no device without a socket)
            await wait_for(lambda: broken not in core.devices)
            await wait_for(
                lambda: all(s["state"] != "serving" for s in servers.status() if s["name"] == vf)
            )
        status = {str(s["name"]): s for s in servers.status()}
        assert status[str(broken)]["state"] == f"failed: {BROKEN}"
        assert status[str(broken)]["errors"] == {"EINVAL REGION_READ": 1}
        assert status[str(broken)]["requests"] == 3
        assert status[vf]["state"] == f"failed: {BROKEN}"
        assert status[str(healthy)]["state"] == "serving"
        assert manager.errors_text(broken) == "EINVAL REGION_READ 1\ntotal 1\n"
        assert not sock.exists()
        # the other device is still served
        healthy_sock = manager.socket_path(healthy)
        assert await trio.to_thread.run_sync(read_config, healthy_sock) == bytes(4)
        # served again, the failure is forgotten
        servers.serve(vf, ScratchDevice(1), label=f"VF {vf}")
        await manager.settle()
        assert {str(s["name"]): s["state"] for s in servers.status()}[vf] == "serving"
        await manager.aclose()
        nursery.cancel_scope.cancel()
    # logged once each, and the VF's cleanup did not trip over its name
    assert caplog.text.count("this device is no longer served") == 2
    assert "cleanup after the server failed" not in caplog.text
