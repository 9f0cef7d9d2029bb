"""One vfio-user server per mdev, following the core's device events.

A DeviceAdded event starts ``DeviceServer(backend, <run-dir>/<uuid>.sock)``
in the manager's nursery; DeviceRemoved disconnects its client and cancels
it (the server unlinks its socket on exit).  Events arrive synchronously
from the core, so starting and stopping is only *scheduled* there;
:meth:`ServerManager.settle` waits until every scheduled change is done,
which the sysfs mirror awaits before a write to ``create``/``remove``
returns.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from mdevcore.core import (
    DeviceAdded,
    DeviceRemoved,
    MdevCore,
    MdevDevice,
    MdevEvent,
    MdevType,
)
from mdevcore.vfio_user.backend import DeviceBackend

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL


class Server(Protocol):
    """What the manager needs of mdevcore.vfio_user.server.DeviceServer."""

    async def serve(self, *, task_status: Any = ...) -> None: ...

    def disconnect(self) -> None: ...

    @property
    def connected(self) -> bool: ...


ServerFactory = Callable[[DeviceBackend, Path, str], Server]


def default_server_factory(backend: DeviceBackend, path: Path, name: str) -> Server:
    from mdevcore.vfio_user.server import DeviceServer  # written alongside; imported lazily

    server: Server = DeviceServer(backend, str(path), name=name)
    return server


@dataclasses.dataclass(eq=False)
class _Served:
    device: MdevDevice
    server: Server
    path: Path
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class ServerManager:
    """Serves every device of ``core`` for as long as it exists.

    Must be used from the trio thread that owns ``nursery`` (the core's
    events then arrive on that thread too, from the FUSE handlers).
    """

    def __init__(
        self,
        core: MdevCore,
        run_dir: Path,
        nursery: trio.Nursery,
        server_factory: ServerFactory = default_server_factory,
    ) -> None:
        self.core = core
        self.run_dir = run_dir
        self._nursery = nursery
        self._factory = server_factory
        self._served: dict[uuid.UUID, _Served] = {}
        self._pending: set[trio.Event] = set()
        self._stopping: dict[uuid.UUID, _Served] = {}
        core.add_create_check(self._check_socket_path)
        core.subscribe(self._on_event, replay=True)

    def _check_socket_path(self, mtype: MdevType, dev_uuid: uuid.UUID) -> None:
        path = self.socket_path(dev_uuid)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket path {path} is too long for AF_UNIX")
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, f"cannot create sockets in {self.run_dir}")

    def socket_path(self, dev_uuid: uuid.UUID) -> Path:
        return self.run_dir / f"{dev_uuid}.sock"

    def _on_event(self, event: MdevEvent) -> None:
        if isinstance(event, DeviceAdded):
            self._start(event.device)
        elif isinstance(event, DeviceRemoved):
            self._stop(event.device.uuid)

    def _start(self, device: MdevDevice) -> None:
        path = self.socket_path(device.uuid)
        name = f"{device.name} ({device.type.id})"
        try:
            server = self._factory(device.backend, path, name)
        except Exception:
            log.exception("mdev %s: cannot create its vfio-user server", device.uuid)
            return
        entry = _Served(device=device, server=server, path=path)
        self._served[device.uuid] = entry
        self._pending.add(entry.ready)
        self._nursery.start_soon(self._run, entry, name=f"serve {device.uuid}")

    def _stop(self, dev_uuid: uuid.UUID) -> None:
        entry = self._served.pop(dev_uuid, None)
        if entry is None:
            return
        if entry.server.connected:
            log.info("mdev %s: removed, disconnecting its client", dev_uuid)
        entry.server.disconnect()
        entry.scope.cancel()
        if not entry.done.is_set():
            self._stopping[dev_uuid] = entry
            self._pending.add(entry.done)

    async def _run(self, entry: _Served) -> None:
        dev = entry.device.uuid
        previous = self._stopping.get(dev)
        try:
            with entry.scope:
                if previous is not None:
                    # same UUID removed and created again: let the old server go first
                    await previous.done.wait()
                async with trio.open_nursery() as nursery:
                    await nursery.start(entry.server.serve)
                    self._done(entry.ready)
                    log.info("mdev %s: serving vfio-user at %s", dev, entry.path)
        except Exception:
            log.exception("mdev %s: vfio-user server failed", dev)
            self._unserved(entry)
        finally:
            if self._stopping.get(dev) is entry:
                del self._stopping[dev]
            self._done(entry.ready)
            self._done(entry.done)
            log.info("mdev %s: no longer served", dev)

    def _unserved(self, entry: _Served) -> None:
        """A device whose server died is removed: no device without a socket."""
        if self._served.get(entry.device.uuid) is not entry:
            return  # already being removed
        try:
            self.core.remove(entry.device.uuid)
        except OSError as e:
            log.error("mdev %s: cannot remove the unserved device: %s", entry.device.uuid, e)

    def _done(self, event: trio.Event) -> None:
        event.set()
        self._pending.discard(event)

    async def settle(self) -> None:
        """Wait until every start and stop scheduled so far has completed.

        Waits on a snapshot, so concurrent writers each wait for their own
        change (and earlier ones) without waiting on each other's later ones.
        """
        for event in list(self._pending):
            await event.wait()

    async def aclose(self) -> None:
        """Disconnect every client and stop every server (daemon shutdown)."""
        self.core.unsubscribe(self._on_event)
        self.core.remove_create_check(self._check_socket_path)
        for dev_uuid in list(self._served):
            self._stop(dev_uuid)
        await self.settle()
