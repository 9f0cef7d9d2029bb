"""Hosted parents: devices that are not mdevs (a PF and its SR-IOV VFs).

A hosted parent builds its own part of the sysfs tree, registers devlink
instances, and asks :class:`NamedServers` to serve a device over
vfio-user when a host driver (e.g. pds_vfio) takes it.  The daemon gives
it a :class:`HostContext` at start and calls ``stop`` at shutdown.

:class:`NamedServers` is the ServerManager pattern keyed by name: ``serve``
and ``unserve`` only *schedule* the change on the daemon's nursery (they
run inside a synchronous sysfs write); ``settle`` waits until each change
is done, and the sysfs mirror awaits it before a write returns, so the
socket exists (or is gone) when ``echo BDF > bind`` ends.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Protocol

import trio

from mdevcore.daemon.devlink import DevlinkRegistry
from mdevcore.daemon.servers import UNIX_PATH_MAX, Server, ServerFactory, default_server_factory
from mdevcore.sysfs.tree import SysfsTree
from mdevcore.vfio_user.backend import DeviceBackend

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Served:
    name: str
    server: Server
    path: Path
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class NamedServers:
    """vfio-user servers at ``<run_dir>/<name>.sock``, started and stopped on request.

    Use from the trio thread that owns ``nursery``.
    """

    def __init__(
        self,
        run_dir: Path,
        nursery: trio.Nursery,
        server_factory: ServerFactory = default_server_factory,
    ) -> None:
        self.run_dir = run_dir
        self._nursery = nursery
        self._factory = server_factory
        self._served: dict[str, _Served] = {}
        self._stopping: dict[str, _Served] = {}
        self._pending: set[trio.Event] = set()

    def socket_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.sock"

    def serving(self, name: str) -> bool:
        return name in self._served

    def connected(self, name: str) -> bool:
        entry = self._served.get(name)
        return entry is not None and entry.server.connected

    def serve(self, name: str, backend: DeviceBackend) -> Path:
        """Start serving ``backend``; ENAMETOOLONG/EACCES/EBUSY refuse it at once."""
        path = self.socket_path(name)
        if name in self._served:
            raise OSError(errno.EBUSY, f"{name} is already served at {path}")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket path {path} is too long for AF_UNIX")
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, f"cannot create sockets in {self.run_dir}")
        server = self._factory(backend, path, name)
        entry = _Served(name=name, server=server, path=path)
        self._served[name] = entry
        self._pending.add(entry.ready)
        self._nursery.start_soon(self._run, entry, name=f"serve {name}")
        return path

    def unserve(self, name: str) -> None:
        """Disconnect the client (if any) and stop serving ``name``."""
        entry = self._served.pop(name, None)
        if entry is None:
            return
        if entry.server.connected:
            log.info("%s: unbound, disconnecting its client", name)
        entry.server.disconnect()
        entry.scope.cancel()
        if not entry.done.is_set():
            self._stopping[name] = entry
            self._pending.add(entry.done)

    async def _run(self, entry: _Served) -> None:
        previous = self._stopping.get(entry.name)
        try:
            with entry.scope:
                if previous is not None:
                    await previous.done.wait()  # rebound at once: the old socket goes first
                async with trio.open_nursery() as nursery:
                    await nursery.start(entry.server.serve)
                    self._done(entry.ready)
                    log.info("%s: serving vfio-user at %s", entry.name, entry.path)
        except Exception:
            log.exception("%s: vfio-user server failed", entry.name)
            if self._served.get(entry.name) is entry:
                del self._served[entry.name]
        finally:
            if self._stopping.get(entry.name) is entry:
                del self._stopping[entry.name]
            self._done(entry.ready)
            self._done(entry.done)
            log.info("%s: no longer served", entry.name)

    def _done(self, event: trio.Event) -> None:
        event.set()
        self._pending.discard(event)

    async def settle(self) -> None:
        """Wait until every start and stop scheduled so far has completed."""
        for event in list(self._pending):
            await event.wait()

    async def aclose(self) -> None:
        for name in list(self._served):
            self.unserve(name)
        await self.settle()


@dataclasses.dataclass(frozen=True, slots=True)
class HostContext:
    """What the daemon lends a hosted parent for its lifetime."""

    tree: SysfsTree
    servers: NamedServers
    devlink: DevlinkRegistry
    run_dir: Path


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
