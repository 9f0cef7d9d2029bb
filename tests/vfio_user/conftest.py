"""Fixtures: a FakeDevice served on a real UNIX socket inside the test's trio run.

The blocking Client runs in a worker thread (``trio.to_thread.run_sync``)
so the server keeps running in the trio thread.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from vfio_user_fakedev import FakeDevice

from mdevcore.vfio_user.server import DeviceServer


@dataclasses.dataclass
class Served:
    device: FakeDevice
    server: DeviceServer
    path: str


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def sockdir() -> Iterator[str]:
    # tmp_path can exceed the 108-byte sun_path limit; keep it short.
    d = tempfile.mkdtemp(prefix="vu-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def served(sockdir: str) -> AsyncIterator[Served]:
    device = FakeDevice()
    path = os.path.join(sockdir, "dev.sock")
    async with trio.open_nursery() as nursery:
        server = DeviceServer(device, path, name="fake")
        await nursery.start(server.serve)
        yield Served(device, server, path)
        nursery.cancel_scope.cancel()
    device.close()
    assert not os.path.exists(path), "serve() must unlink its socket"
