"""A device served over a real UNIX socket from a background thread."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.client import Client
from mdevcore.vfio_user.server import DEFAULT_IO, DeviceServer


class ServedDevice:
    """The device, its socket, and a way to connect (see :func:`serve`)."""

    def __init__(self, device: DeviceBackend, path: Path) -> None:
        self.device = device
        self.path = path

    def connect(self, *, timeout: float | None = 10.0) -> Client:
        """A new client, VERSION already negotiated (close it, or use ``with``)."""
        client = Client(self.path, timeout=timeout)
        try:
            client.negotiate()
        except BaseException:
            client.close()
            raise
        return client


@contextmanager
def serve(
    device: DeviceBackend,
    path: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    io: str = DEFAULT_IO,
) -> Iterator[ServedDevice]:
    """Serve ``device`` until the block ends (the server runs in its own trio thread).

    ``io`` is the server's (``DeviceServer``): "thread" serves each
    connection on its own thread if the device allows it, "trio" in the
    server's trio run.

    The socket goes in a fresh short directory unless ``path`` is given
    (AF_UNIX paths must stay under 108 bytes).  While it is served, reach
    the device through clients, or hold its ``device_lock`` (a PciDevice's)
    to look at it: the server's threads use it meanwhile.  An exception in
    the server (or the device's background task) is raised here when the
    block ends.
    """
    scratch = None
    if path is None:
        scratch = Path(tempfile.mkdtemp(prefix="mdt-"))
        path = scratch / "dev.sock"
    sock = Path(path)
    label = name or type(device).__name__
    started = threading.Event()
    failure: list[BaseException] = []
    token: list[trio.lowlevel.TrioToken] = []
    scope = trio.CancelScope()

    async def main() -> None:
        token.append(trio.lowlevel.current_trio_token())
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(DeviceServer(device, sock, name=label, io=io).serve)
                started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            failure.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=run, name=f"serve {label}", daemon=True)
    thread.start()
    started.wait()
    try:
        if failure:
            raise failure[0]
        yield ServedDevice(device, sock)
    finally:
        if token and thread.is_alive():
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=token[0])
            except trio.RunFinishedError:
                pass
        thread.join()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if failure:
        raise failure[0]
