"""Fixtures: a FakeDevice served on a real UNIX socket inside the test's trio run.

The blocking Client runs in a worker thread (``trio.to_thread.run_sync``)
so the server keeps running in the trio thread.  ``served`` runs each test
twice: with the connection as a trio task (``io="trio"``) and on its own
thread (``io="thread"``, a ThreadFakeDevice).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from vfio_user_fakedev import FakeDevice, ThreadFakeDevice
from vfio_user_served import Served

from mdevcore.vfio_user.server import DeviceServer


@pytest.fixture
def sockdir(tmp_path: Path) -> str:
    return str(tmp_path)  # the shared tmp_path is short enough for sun_path


@pytest.fixture(params=["trio", "thread"])
async def served(sockdir: str, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    io = request.param
    device = ThreadFakeDevice() if io == "thread" else FakeDevice()
    path = os.path.join(sockdir, "dev.sock")
    async with trio.open_nursery() as nursery:
        server = DeviceServer(device, path, name="fake", io=io)
        assert server.io == io
        await nursery.start(server.serve)
        yield Served(device, server, path)
        nursery.cancel_scope.cancel()
    device.close()
    assert not os.path.exists(path), "serve() must unlink its socket"
