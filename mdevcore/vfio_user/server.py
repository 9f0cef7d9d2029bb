"""The vfio-user server: one UNIX socket per device, one client at a time.

Two I/O modes (``io``): "thread" (the default) serves each connection on
its own thread with blocking socket calls (``mdevcore.vfio_user.threaded``,
its threading rule: ``mdevcore.vfio_user.locking``) when the backend allows it
(``serve_in_thread``); "trio", and any backend that does not allow it,
serves the connection as a task of the trio run
(``mdevcore.vfio_user.trio_client``).  The accept loop, counters and
lifetime here are the same for both.

One client at a time: while one is served the server does not accept, so a
second connection waits in the listen backlog (its VERSION unanswered)
until the first client leaves; then it is served.  When the client goes,
``backend.disconnected()`` runs (DMA unmapped, IRQ fds closed, device state
kept) and the next client is accepted.

Counters (requests, clients, errors by kind) and the rate-limited log of
what clients provoke live in ``DeviceServer.stats`` and outlive clients.
Accepting: running out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
is retried with a logged back-off; any other accept error ends ``serve``
with that OSError (``failure`` says why), leaving other devices be.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from mdevcore.unix_listener import unix_listener
from mdevcore.vfio_user.backend import DeviceBackend, DmaPort
from mdevcore.vfio_user.locking import DeviceLock, device_lock, run_locked
from mdevcore.vfio_user.profile import ConnectionProfile
from mdevcore.vfio_user.stats import DeviceStats
from mdevcore.vfio_user.threaded import ThreadedClient, ThreadedDmaPort, serve_threaded
from mdevcore.vfio_user.trio_client import (
    CMSG_SPACE,
    DEFAULT_SPIN_US,
    RECV_SIZE,
    TURN_BYTES,
    TURN_MESSAGES,
    TrioClient,
    TrioDmaPort,
)

__all__ = [
    "DEFAULT_IO",
    "DEFAULT_SPIN_US",
    "IO_MODES",
    "TURN_BYTES",
    "TURN_MESSAGES",
    "DeviceServer",
    "serve_forever",
]

log = logging.getLogger(__name__)

# accept() errors that say "not now" (out of fds or memory): retried, the
# wait doubling from the first to the last, each retry logged.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_MAX = 1.0
# How a connection is served: "trio" (a task of the trio run, this module)
# or "thread" (its own thread, mdevcore.vfio_user.threaded) - the latter
# only for a backend that allows it (serve_in_thread), else trio.
IO_TRIO = "trio"
IO_THREAD = "thread"
IO_MODES = (IO_TRIO, IO_THREAD)
DEFAULT_IO = IO_THREAD


class DeviceServer:
    """Serves one device on one UNIX socket (see the module doc)."""

    def __init__(
        self,
        backend: DeviceBackend,
        path: str | os.PathLike[str],
        *,
        name: str,
        spin_us: float | None = None,
        io: str = DEFAULT_IO,
        profile: bool = False,
    ) -> None:
        """``spin_us``: how long to poll for the next request before parking
        (0 = never spin; see ``TrioClient._spin_recv``); None: the device's
        ``request_spin_us`` on a connection thread (a trio task never spins
        unless told: it would hold up the whole run).  ``io``: "thread"
        serves each connection on its own thread when the backend allows
        it (``mdevcore.vfio_user.threaded``), "trio" always as a trio task.
        ``profile``: time every request (``mdevcore.vfio_user.profile``)
        and print the table to stderr when a client leaves."""
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {', '.join(IO_MODES)}, not {io!r}")
        self.backend = backend
        self.path = os.fspath(path)
        self.name = name
        self.profile = profile
        # Not None: connections run on threads, and this guards the device.
        self._lock: DeviceLock | None = device_lock(backend) if io == IO_THREAD else None
        self.io = IO_THREAD if self._lock is not None else IO_TRIO
        if spin_us is None:
            hint = float(getattr(backend, "request_spin_us", DEFAULT_SPIN_US))
            spin_us = hint if self.io == IO_THREAD else DEFAULT_SPIN_US
        self.spin_ns = int(spin_us * 1000)
        self._client: TrioClient | ThreadedClient | None = None
        self._client_scope: trio.CancelScope | None = None
        self.stats = DeviceStats(name)
        self.failure: str | None = None  # why serve() ended on its own, if it did

    @property
    def connected(self) -> bool:
        return self._client is not None

    def status(self) -> dict[str, object]:
        """What ``mdevd status`` shows of this server (JSON-ready)."""
        client = self._client
        with self._lock or contextlib.nullcontext():  # a connection thread counts too
            return {
                "socket": self.path,
                "io": self.io,
                "connected": client is not None,
                "client": client.name if client is not None else None,
                "clients": self.stats.clients,
                "requests": self.stats.requests,
                "errors": self.stats.errors(),
                "failure": self.failure,
            }

    def errors_text(self) -> str:
        """The ``vfio_user/errors`` attribute: counts by kind, then the total."""
        with self._lock or contextlib.nullcontext():
            return self.stats.errors_text()

    def disconnect(self) -> None:
        """Drop the current client now (device removal)."""
        if self._client_scope is not None:
            log.info("%s: disconnecting the client", self.name)
            self._client_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then serve clients one after another until cancelled.

        Unlinks a stale socket first (EEXIST if the path is not a socket),
        calls ``task_status.started()`` once listening, runs
        ``backend.run()`` alongside for the whole time (an exception from it
        ends serve), and on exit drops the client and unlinks the socket.
        """
        with unix_listener(self.path, 4) as listener:
            log.info("%s: listening on %s", self.name, self.path)
            async with trio.open_nursery() as nursery:
                if self._lock is not None:
                    # The threading rule: trio-side device code holds the lock.
                    nursery.start_soon(run_locked, self.backend.run, self._lock)
                else:
                    nursery.start_soon(self.backend.run)
                task_status.started()
                await self._accept_loop(listener)

    async def _accept_loop(self, listener: socket.socket) -> None:
        # Not accepting while a client is served keeps later connections
        # waiting in the listen backlog: one client at a time, and a client
        # reconnecting right after a disconnect is never turned away.
        delay = ACCEPT_BACKOFF_FIRST
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as e:
                if e.errno not in CAPACITY_ERRNOS:
                    # Not a shortage that passes: this listener is broken.
                    self.failure = f"accept failed: {e}"
                    log.error("%s: %s; this device is no longer served", self.name, self.failure)
                    raise
                log.warning("%s: accept failed: %s; retrying in %.2f s", self.name, e, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, ACCEPT_BACKOFF_MAX)
                continue
            delay = ACCEPT_BACKOFF_FIRST
            self.stats.clients += 1
            name = f"{self.name}#{self.stats.clients}"
            profile = ConnectionProfile() if self.profile else None
            self._client_scope = trio.CancelScope()
            if self._lock is not None:
                sock.setblocking(True)
                threaded = ThreadedClient(
                    sock,
                    self.backend,
                    self._lock,
                    name,
                    stats=self.stats,
                    recv_size=RECV_SIZE,
                    cmsg_space=CMSG_SPACE,
                    turn_messages=TURN_MESSAGES,
                    spin_ns=self.spin_ns,
                    profile=profile,
                )
                self._client = threaded
                await self._serve_threaded(threaded, self._client_scope)
            else:
                sock.setblocking(False)
                client = TrioClient(sock, self.backend, name, self.spin_ns, self.stats, profile)
                self._client = client
                await self._serve_client(client, self._client_scope)
            if profile is not None:
                print(profile.report(name), file=sys.stderr, flush=True)

    async def _serve_threaded(self, client: ThreadedClient, scope: trio.CancelScope) -> None:
        """The connection on its thread; device calls from here take the lock."""
        await self._serve_one(
            client, scope, ThreadedDmaPort(client), partial(serve_threaded, client), client.lock,
            lambda: (f"{client.conn.handled} requests, {client.spin_hits} caught spinning "
                     f"({client.spin_refused} polls refused), {client.yields} turns yielded; "
                     "thread"),
            " (thread)",
        )  # fmt: skip

    async def _serve_client(self, client: TrioClient, scope: trio.CancelScope) -> None:
        await self._serve_one(
            client, scope, TrioDmaPort(client), client.run, contextlib.nullcontext(),
            lambda: (f"{client.conn.handled} requests, {client.parks} parks, "
                     f"{client.spin_hits} caught spinning, {client.yields} turns yielded"),
            "",
        )  # fmt: skip

    async def _serve_one(
        self,
        client: ThreadedClient | TrioClient,
        scope: trio.CancelScope,
        port: DmaPort,
        run: Callable[[], Awaitable[None]],
        lock: contextlib.AbstractContextManager[object],
        counters: Callable[[], str],
        mode: str,
    ) -> None:
        """One client from connect to gone, in either I/O mode."""
        with lock:
            self.stats.event("connect", "%s: client connected%s", client.name, mode)
        try:
            with scope:
                try:
                    with lock:
                        self.backend.connected(port)
                except Exception:
                    # A device bug costs this client, not the server.
                    log.exception("%s: device failed in connected()", client.name)
                    return
                await run()
        finally:
            client.close()
            self._client = None
            self._client_scope = None
            with lock:
                try:
                    self.backend.disconnected()
                except Exception:
                    log.exception("%s: device failed in disconnected()", client.name)
                self.stats.event("gone", "%s: client gone (%s)", client.name, counters())
                self.stats.flush()


async def serve_forever(
    backend: DeviceBackend,
    path: str | os.PathLike[str],
    *,
    name: str = "vfio-user",
    spin_us: float | None = None,
    io: str = DEFAULT_IO,
    profile: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then clean up and return."""
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = DeviceServer(backend, path, name=name, spin_us=spin_us, io=io, profile=profile)
            await nursery.start(server.serve)
            async for signum in signals:
                log.info("%s: signal %d, shutting down", name, signum)
                nursery.cancel_scope.cancel()
                break
