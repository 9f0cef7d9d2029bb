"""The accept loop: out of fds it backs off and recovers; a broken listener ends serve."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import trio
from vfio_user_fakedev import FakeDevice
from vfio_user_served import Served

from mdevcore.vfio_user.constants import FLAG_ERROR, FLAG_REPLY, Command
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.vfio_user.wire import HEADER

VERSION_0_0 = HEADER.pack(1, Command.VERSION, 20, 0, 0) + struct.pack("<HH", 0, 0)


async def test_out_of_fds_backs_off_then_serves(
    served: Served,
    fd_table_full: Callable[[], AbstractContextManager[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # its fd before the table fills
    try:
        with caplog.at_level(logging.WARNING, logger="mdevcore.vfio_user.server"):
            with fd_table_full():
                client.connect(served.path)  # queued: accept() needs an fd it cannot have
                await trio.sleep(0.2)
            client.settimeout(10)
            client.sendall(VERSION_0_0)
            reply = await trio.to_thread.run_sync(client.recv, 4096)
    finally:
        client.close()
    msg_id, command, size, flags, error = HEADER.unpack_from(reply)
    assert (msg_id, command, flags & (FLAG_REPLY | FLAG_ERROR)) == (1, Command.VERSION, FLAG_REPLY)
    retries = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert retries[:3] == [
        f"fake: accept failed: [Errno {errno.EMFILE}] Too many open files; retrying in {t} s"
        for t in ("0.01", "0.02", "0.04")
    ]
    assert 3 <= len(retries) <= 6  # doubling: ~5 waits fill 0.2 s
    assert served.server.failure is None


async def test_broken_listener_ends_serve_with_its_error(
    sockdir: str, caplog: pytest.LogCaptureFixture, break_listener: Callable[[str], None]
) -> None:
    device = FakeDevice()
    path = os.path.join(sockdir, "dev.sock")
    server = DeviceServer(device, path, name="dev")
    with pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            break_listener(path)
            with trio.fail_after(5):
                await trio.sleep_forever()
    device.close()
    matched, rest = info.value.split(OSError)
    assert rest is None and matched is not None
    assert server.failure == f"accept failed: [Errno {errno.EINVAL}] Invalid argument"
    assert "dev: accept failed: [Errno 22] Invalid argument; this device is no longer served" in (
        caplog.text
    )
    assert not os.path.exists(path)
