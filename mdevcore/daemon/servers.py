"""vfio-user servers at ``<run-dir>/<name>.sock``, and the mdev devices' use of them.

:class:`NamedServers` starts ``DeviceServer(backend, <run-dir>/<name>.sock)``
in the daemon's nursery on ``serve`` and disconnects and cancels it on
``unserve`` (the server unlinks its socket on exit).  Both run inside a
synchronous sysfs write (create/remove, bind/unbind), so they only
*schedule* the change; :meth:`NamedServers.settle` waits until every
scheduled change is done, which the sysfs mirror awaits before the write
returns: the socket exists (or is gone) when ``echo ... > create`` ends.

:class:`ServerManager` serves every mdev of the core for as long as it
exists, named by its UUID; hosted parents (a PF's VFs) use NamedServers
directly, named by BDF.

Operators read the servers through :meth:`NamedServers.status` (``mdevd
status``) and :meth:`NamedServers.errors_text` (``vfio_user/errors``); a
server that died on its own stays listed as failed, with its reason and
counters, until its name is served again (an mdev whose server died is
removed, so the list is where an operator learns why).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import trio

from mdevcore.core import DeviceAdded, DeviceRemoved, MdevCore, MdevEvent, MdevType
from mdevcore.vfio_user.backend import DeviceBackend

log = logging.getLogger(__name__)

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL
MAX_FAILED_KEPT = 64  # failed servers status remembers (the oldest go first)


class Server(Protocol):
    """What NamedServers needs of mdevcore.vfio_user.server.DeviceServer."""

    async def serve(self, *, task_status: Any = ...) -> None: ...

    def disconnect(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    def status(self) -> dict[str, object]: ...

    def errors_text(self) -> str: ...


# (backend, socket path, label for logs, mdev parent name or None) -> server
ServerFactory = Callable[[DeviceBackend, Path, str, "str | None"], Server]

NATIVE = "native"
LIBVFIO_USER = "libvfio-user"
TRANSPORTS = (NATIVE, LIBVFIO_USER)


def default_server_factory(
    backend: DeviceBackend,
    path: Path,
    name: str,
    parent: str | None = None,
    io: str = "",
    spin_us: float | None = None,
) -> Server:
    from mdevcore.vfio_user.server import DEFAULT_IO, DeviceServer

    server: Server = DeviceServer(
        backend, str(path), name=name, io=io or DEFAULT_IO, spin_us=spin_us
    )
    return server


@dataclasses.dataclass(frozen=True)
class TransportChoice:
    """A ServerFactory choosing the vfio-user implementation per mdev parent.

    ``default`` serves every device whose parent has no entry in
    ``per_parent`` (and the hosted parents' devices, which have no mdev
    parent).  "libvfio-user" imports cffi and the C library only when used.
    ``io`` ("thread", "trio"; "" = the server's default) is the native
    server's I/O mode (``mdevcore.vfio_user.server.DeviceServer``), and
    ``spin_us`` its polling before a connection thread sleeps (None: each
    device's ``request_spin_us``).
    """

    default: str = NATIVE
    per_parent: Mapping[str, str] = dataclasses.field(default_factory=dict)
    io: str = ""
    spin_us: float | None = None

    def __post_init__(self) -> None:
        for transport in (self.default, *self.per_parent.values()):
            if transport not in TRANSPORTS:
                raise ValueError(
                    f"unknown transport {transport!r} (one of {', '.join(TRANSPORTS)})"
                )

    def uses(self, transport: str) -> bool:
        return transport in (self.default, *self.per_parent.values())

    def transport_for(self, parent: str | None) -> str:
        return self.per_parent.get(parent, self.default) if parent else self.default

    def __call__(
        self, backend: DeviceBackend, path: Path, name: str, parent: str | None = None
    ) -> Server:
        if self.transport_for(parent) == LIBVFIO_USER:
            from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

            server: Server = LibvfioUserServer(backend, str(path), name=name)
            return server
        return default_server_factory(backend, path, name, io=self.io, spin_us=self.spin_us)


@dataclasses.dataclass(eq=False)
class _Served:
    name: str
    label: str  # what logs call it
    server: Server
    path: Path
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)


class _Started:
    """The ``task_status`` a server's ``serve`` gets: listening means ready."""

    __slots__ = ("_servers", "_entry")

    def __init__(self, servers: NamedServers, entry: _Served) -> None:
        self._servers = servers
        self._entry = entry

    def started(self, value: object = None) -> None:
        self._servers._started(self._entry)


class NamedServers:
    """vfio-user servers at ``<run_dir>/<name>.sock``, started and stopped on request.

    Use from the trio thread that owns ``nursery``.  ``on_failed(name)`` is
    called when a server dies on its own (not when it is unserved).
    """

    def __init__(
        self,
        run_dir: Path,
        nursery: trio.Nursery,
        server_factory: ServerFactory = default_server_factory,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self._nursery = nursery
        self._factory = server_factory
        self._on_failed = on_failed
        self._served: dict[str, _Served] = {}
        self._stopping: dict[str, _Served] = {}
        self._pending: set[trio.Event] = set()
        self._failed: dict[str, tuple[_Served, str]] = {}  # name -> (entry, why)

    def socket_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.sock"

    def check(self, name: str) -> Path:
        """The socket path for ``name``; ENAMETOOLONG/EACCES if it cannot work."""
        path = self.socket_path(name)
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"socket path {path} is too long for AF_UNIX")
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, f"cannot create sockets in {self.run_dir}")
        return path

    def connected(self, name: str) -> bool:
        entry = self._served.get(name)
        return entry is not None and entry.server.connected

    def errors_text(self, name: str) -> str:
        """The ``vfio_user/errors`` attribute of ``name`` (counts kept after a failure)."""
        entry = self._served.get(name)
        if entry is None and name in self._failed:
            entry = self._failed[name][0]
        return entry.server.errors_text() if entry is not None else "total 0\n"

    def status(self) -> list[dict[str, object]]:
        """Every server, serving or failed, for ``mdevd status`` (JSON-ready)."""
        out = []
        for entry in self._served.values():
            state = "serving" if entry.ready.is_set() else "starting"
            out.append(self._describe(entry, state))
        for entry, why in self._failed.values():
            out.append(self._describe(entry, f"failed: {why}"))
        return sorted(out, key=lambda d: str(d["name"]))

    @staticmethod
    def _describe(entry: _Served, state: str) -> dict[str, object]:
        info: dict[str, object] = {"name": entry.name, "label": entry.label, "state": state}
        info.update(entry.server.status())
        info["socket"] = str(entry.path)
        return info

    def serve(
        self,
        name: str,
        backend: DeviceBackend,
        *,
        label: str | None = None,
        parent: str | None = None,
        checked: Path | None = None,
    ) -> Path:
        """Start serving ``backend``; ENAMETOOLONG/EACCES/EBUSY refuse it at once.

        ``parent``: the mdev parent's name, for the factory's choice of transport.
        ``checked``: what ``check(name)`` returned just before (not checked again).
        """
        if name in self._served:
            raise OSError(errno.EBUSY, f"{name} is already served")
        path = checked if checked is not None else self.check(name)
        self._failed.pop(name, None)
        label = label or name
        server = self._factory(backend, path, label, parent)
        entry = _Served(name=name, label=label, server=server, path=path)
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
            log.info("%s: going away, disconnecting its client", entry.label)
        entry.server.disconnect()
        entry.scope.cancel()
        if not entry.done.is_set():
            self._stopping[name] = entry
            self._pending.add(entry.done)

    async def _run(self, entry: _Served) -> None:
        previous = self._stopping.get(entry.name)
        failed = False
        try:
            with entry.scope:
                if previous is not None:
                    # the same name unserved and served again: the old socket goes first
                    await previous.done.wait()
                # Awaited in this task rather than through nursery.start: one
                # task and two scheduler passes fewer per device created.
                await entry.server.serve(task_status=_Started(self, entry))
        except Exception as exc:
            log.exception("%s: vfio-user server failed", entry.label)
            failed = self._served.get(entry.name) is entry
            if failed:
                del self._served[entry.name]
                why = entry.server.status().get("failure") or _reason(exc)
                self._failed[entry.name] = (entry, str(why))
                while len(self._failed) > MAX_FAILED_KEPT:
                    del self._failed[next(iter(self._failed))]
        finally:
            if self._stopping.get(entry.name) is entry:
                del self._stopping[entry.name]
            self._done(entry.ready)
            self._done(entry.done)
            log.info("%s: no longer served", entry.label)
        if failed and self._on_failed is not None:
            try:
                self._on_failed(entry.name)
            except Exception:  # a callback bug must not take the daemon's nursery down
                log.exception("%s: cleanup after the server failed", entry.label)

    def _started(self, entry: _Served) -> None:
        self._done(entry.ready)
        log.debug("%s: serving vfio-user at %s", entry.label, entry.path)

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
        for name in list(self._served):
            self.unserve(name)
        await self.settle()


def _reason(exc: BaseException) -> str:
    """What status says of a failed server: the OSError inside a nursery's group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


class ServerManager:
    """Serves every device of ``core`` for as long as it exists, at <run-dir>/<uuid>.sock.

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
        self.servers = NamedServers(run_dir, nursery, server_factory, self._unserved)
        self.settle = self.servers.settle
        self._checked: tuple[str, Path] | None = None  # (name, path) of the create in progress
        core.add_create_check(self._check_socket_path)
        core.subscribe(self._on_event, replay=True)

    def _check_socket_path(self, mtype: MdevType, dev_uuid: uuid.UUID) -> None:
        name = str(dev_uuid)
        # Checked under the core's lock right before the probe, and the
        # DeviceAdded that follows (same lock, same create) uses it.
        self._checked = (name, self.servers.check(name))

    def socket_path(self, dev_uuid: uuid.UUID) -> Path:
        return self.servers.socket_path(str(dev_uuid))

    def errors_text(self, dev_uuid: uuid.UUID) -> str:
        return self.servers.errors_text(str(dev_uuid))

    def _on_event(self, event: MdevEvent) -> None:
        if isinstance(event, DeviceAdded):
            device = event.device
            label = f"mdev {device.name} ({device.type.id})"
            checked, self._checked = self._checked, None
            path = checked[1] if checked is not None and checked[0] == device.name else None
            try:
                self.servers.serve(
                    device.name,
                    device.backend,
                    label=label,
                    parent=device.parent.name,
                    checked=path,
                )
            except Exception:
                log.exception("%s: cannot serve it over vfio-user", label)
        elif isinstance(event, DeviceRemoved):
            self.servers.unserve(event.device.name)

    def _unserved(self, name: str) -> None:
        """A device whose server died is removed: no device without a socket."""
        try:
            dev_uuid = uuid.UUID(name)
        except ValueError:
            return  # a hosted parent's device (a VF, by BDF): its driver keeps it
        try:
            self.core.remove(dev_uuid)
        except OSError as e:
            log.error("mdev %s: cannot remove the unserved device: %s", name, e)

    async def aclose(self) -> None:
        """Disconnect every client and stop every server (daemon shutdown)."""
        self.core.unsubscribe(self._on_event)
        self.core.remove_create_check(self._check_socket_path)
        await self.servers.aclose()
