"""The trio server: one UNIX socket per device, one client at a time.

Two I/O modes (``io``): "thread" (the default) serves each connection on
its own thread with blocking socket calls (``mdevcore.vfio_user.threaded``,
which also states the threading rule) when the backend allows it
(``serve_in_thread``); "trio", and any backend that does not allow it,
serves the connection as a task of the trio run, as described here.  The
accept loop, counters and lifetime below are the same for both.

A thin shell around ``engine.Connection``.  The hot path uses a raw
non-blocking stdlib socket: recvmsg_into (one buffer per connection) is
tried first and ``trio.lowlevel.wait_readable`` awaited only on EAGAIN;
every whole message in what arrived is handled before replying, and the
replies go out in one send (trio.socket's wrapper measured ~6 us more per
round trip on these machines).  While a client sends bursts, the reader polls the
socket for up to ``spin_us`` (default 0: off) before parking in trio.

One client at a time: while one is served the server does not accept, so a
second connection waits in the listen backlog (its VERSION unanswered)
until the first client leaves; then it is served.  When the client goes,
``backend.disconnected()`` runs (DMA unmapped, IRQ fds closed, device state
kept) and the next client is accepted.

Server-to-client DMA (QEMU has no twin socket): ``DmaPort.dma_read/write``
queue a request on the same socket and wait for the reply the reader task
matches, while the client's own requests keep being served.

Fairness: every device of a daemon is served by tasks of one trio run, so
a client that keeps its socket full must not keep the others waiting.  A
reader handles at most ``TURN_MESSAGES`` messages or ``TURN_BYTES`` bytes
between two checkpoints, then lets the other tasks run.  A client waiting
for each reply parks every turn and never reaches the bound, so its round
trip costs the same (benchmarks/fairness.py shows both).

Counters (requests, clients, errors by kind) and the rate-limited log of
what clients provoke live in ``DeviceServer.stats`` and outlive clients.
Accepting: running out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
is retried with a logged back-off; any other accept error ends ``serve``
with that OSError (``failure`` says why), leaving other devices be.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial

import trio

from mdevcore.unix_listener import unix_listener
from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.constants import SERVER_MAX_MSG_FDS
from mdevcore.vfio_user.engine import Connection, DmaResult
from mdevcore.vfio_user.profile import ConnectionProfile
from mdevcore.vfio_user.stats import DeviceStats
from mdevcore.vfio_user.threaded import (
    DeviceLock,
    ThreadedClient,
    ThreadedDmaPort,
    device_lock,
    fds_from_ancdata,
    run_locked,
    serve_threaded,
)
from mdevcore.vfio_user.wire import close_fds

log = logging.getLogger(__name__)

_RECV_SIZE = 256 * 1024
# Plain ints: socket.MSG_* are IntFlag members, whose & costs microseconds.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Room for more fds than we accept, so a client sending too many gets
# EINVAL rather than silently truncated (and kernel-closed) fds.
_CMSG_SPACE = socket.CMSG_SPACE(4 * SERVER_MAX_MSG_FDS * 8)
# How long the reader polls for the next request of a bursting client
# before parking in trio (a park + wakeup costs ~5 us here).  At most this
# much CPU per message and this much delay to other tasks of the trio run.
# Off by default: on this 2-core VM, shared with QEMU and other devices, it
# helped some runs and hurt others (benchmarks/vfio_user_rtt.py, "spin 20").
DEFAULT_SPIN_US = 0.0
# One turn of a reader between checkpoints: what another device's request
# may wait for behind a flood.  32 bad requests take ~250 us on this 2-core
# VM (8 us each); a client posting good writes pays one checkpoint per 32.
TURN_MESSAGES = 32
TURN_BYTES = _RECV_SIZE
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


class _DmaPort:
    """DmaPort for one connection: requests over the socket, replies matched."""

    def __init__(self, client: _Client) -> None:
        self._client = client

    async def dma_read(self, address: int, count: int) -> bytes:
        client = self._client
        # The reply carries the data, so it must fit what we accept too.
        limit = min(client.conn.client_caps.max_data_xfer_size, client.conn.max_data_xfer_size)
        chunks: list[bytes] = []
        done = 0
        while done < count:
            n = min(limit, count - done)
            result = await client.dma_request(
                partial(client.conn.dma_read_request, address + done, n)
            )
            chunks.append(result.data)
            done += n
        return b"".join(chunks)

    async def dma_write(self, address: int, data: bytes) -> None:
        client = self._client
        limit = client.conn.client_caps.max_data_xfer_size
        for done in range(0, len(data), limit):
            piece = bytes(data[done : done + limit])
            await client.dma_request(partial(client.conn.dma_write_request, address + done, piece))


class _Client:
    """One accepted connection: its socket, engine and pending DMA."""

    def __init__(
        self,
        sock: socket.socket,
        backend: DeviceBackend,
        name: str,
        spin_ns: int = 0,
        stats: DeviceStats | None = None,
        profile: ConnectionProfile | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.spin_ns = spin_ns
        self.profile = profile
        if profile is not None:
            backend = profile.wrap(backend)
        self.conn = Connection(backend, name=name, stats=stats)
        self._pending: list[tuple[list[bytes], list[int]]] = []
        self._writer_busy = False
        self._drained = trio.Event()
        self._waiters: dict[int, tuple[trio.Event, list[DmaResult]]] = {}
        self.gone = False
        # recvmsg(n) allocates n bytes per call - an mmap/munmap pair at this
        # size, ~35 us - so receive into one buffer kept for the connection.
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self.parks = 0  # waits in trio for the socket
        self.spin_hits = 0  # requests caught by polling instead
        self.yields = 0  # turns ended by the fairness bound

    # --- sending --------------------------------------------------------

    def _send_some(self) -> None:
        """Send what the socket takes now; keep the rest in order."""
        self._pending.extend(self.conn.outgoing())
        sock = self.sock
        if self.profile is not None and self._pending:
            t0 = time.perf_counter_ns()
            try:
                self._send_pending(sock)
            finally:
                elapsed = time.perf_counter_ns() - t0
                self.profile.send_ns += elapsed
                self.profile.sends += 1
                self.profile.syscall(elapsed)
            return
        self._send_pending(sock)

    def _send_pending(self, sock: socket.socket) -> None:
        while self._pending:
            bufs, fds = self._pending[0]
            data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = sock.sendmsg([data], anc)
                else:
                    sent = sock.send(data)  # ~1 us cheaper than sendmsg
            except BlockingIOError:
                return
            except OSError as e:
                # EPIPE/ECONNRESET: the client is gone; only this connection ends.
                self.conn.stats.event("gone", "%s: send failed: %s", self.name, e)
                self._pending.clear()
                self.gone = True
                return
            if sent == len(data):
                self._pending.pop(0)
            else:
                # Partial send: the fds went with the first byte; keep the rest.
                self._pending[0] = ([data[sent:]], [])

    async def flush(self) -> None:
        self._send_some()
        if not self._pending:
            return
        if self._writer_busy:
            # Another task is waiting for the socket and sends ours too.
            while self._pending and self._writer_busy:
                await self._drained.wait()
            if not self._pending:
                return
        self._writer_busy = True
        try:
            while self._pending and not self.gone:
                await trio.lowlevel.wait_writable(self.sock)
                self._send_some()
        finally:
            self._writer_busy = False
            self._drained.set()
            self._drained = trio.Event()

    # --- server-originated DMA -------------------------------------------

    async def dma_request(self, make_request: Callable[[], int]) -> DmaResult:
        if self.gone:
            raise OSError(errno.ENOTCONN, "client gone")
        msg_id = make_request()
        event = trio.Event()
        slot: list[DmaResult] = []
        self._waiters[msg_id] = (event, slot)
        try:
            await self.flush()
            await event.wait()
        finally:
            self._waiters.pop(msg_id, None)
        result = slot[0]
        if result.error:
            raise OSError(result.error, f"DMA request failed: {os.strerror(result.error)}")
        return result

    def complete(self, results: Sequence[DmaResult]) -> None:
        for result in results:
            waiter = self._waiters.get(result.msg_id)
            if waiter is not None:
                waiter[1].append(result)
                waiter[0].set()

    # --- receiving --------------------------------------------------------

    def _spin_recv(self) -> tuple[int, list[tuple[int, int, bytes]], int] | None:
        """Poll the socket for up to spin_ns before parking in trio.

        Parking and waking through trio costs ~5-7 us per message here, most
        of the round trip; a client that sends its next request within a few
        microseconds of our reply (MMIO bursts) is caught by the spin.  Other
        tasks of this trio run wait at most spin_ns for it.
        """
        clock = time.perf_counter_ns
        end = clock() + self.spin_ns
        recvmsg_into = self.sock.recvmsg_into
        bufs = [self._rview]
        while clock() < end:
            try:
                n, ancdata, msg_flags, _ = recvmsg_into(bufs, _CMSG_SPACE)
            except BlockingIOError:
                continue
            return n, ancdata, msg_flags
        return None

    async def run(self) -> None:
        sock = self.sock
        conn = self.conn
        clock = time.perf_counter_ns
        # Spin only while the client is in a burst: its last request came
        # within spin_ns of our previous send.  Sparse traffic, or a client
        # starved of CPU (where spinning would steal its core), parks at once.
        burst = False
        sent_at = 0
        bufs = [self._rview]
        # This turn so far: the messages since conn.handled was turn_mark, bytes.
        turn_mark = 0
        turn_bytes = 0
        turn_messages, turn_bytes_max = TURN_MESSAGES, TURN_BYTES  # locals: read per request
        profile = self.profile
        process = conn.process if profile is None else partial(profile.process, conn)
        t0 = 0
        while True:
            try:
                if profile is not None:
                    t0 = clock()
                n, ancdata, msg_flags, _ = sock.recvmsg_into(bufs, _CMSG_SPACE)
            except BlockingIOError:
                if profile is not None:
                    profile.syscall(clock() - t0)  # the EAGAIN before a park costs too
                got = self._spin_recv() if burst else None
                if got is None:
                    self.parks += 1
                    await trio.lowlevel.wait_readable(sock)
                    turn_mark, turn_bytes = conn.handled, 0
                    continue
                self.spin_hits += 1
                n, ancdata, msg_flags = got
            except OSError as e:
                conn.stats.event("gone", "%s: connection error: %s", self.name, e)
                return
            if profile is not None:
                elapsed = clock() - t0
                profile.recv_ns += elapsed
                profile.recvs += 1
                profile.syscall(elapsed)
            if self.spin_ns:
                burst = clock() - sent_at < self.spin_ns
            fds = fds_from_ancdata(ancdata) if ancdata else []
            if msg_flags & _MSG_CTRUNC:
                conn.stats.error(
                    "too many fds",
                    "%s: control data truncated (too many fds); closing",
                    self.name,
                    level=logging.WARNING,
                )
                close_fds(fds)
                return
            if not n:
                close_fds(fds)
                conn.stats.event("gone", "%s: client closed the connection", self.name)
                return
            conn.receive_data(self._rview[:n], fds)
            turn_bytes += n
            # What _handle does, inline: an awaited call costs a coroutine per request.
            results = process(turn_messages)
            if results:
                self.complete(results)
            if conn.has_output or self._pending:
                # Usually the socket takes it all at once: no await needed.
                if not self._writer_busy:
                    self._send_some()
                if self._pending:
                    await self.flush()
                sent_at = clock()
            if profile is not None:
                profile.end_batch()
            if conn.closed or self.gone:
                return
            if conn.handled - turn_mark >= turn_messages or turn_bytes >= turn_bytes_max:
                # A client with a backlog (or a long turn): others go first,
                # then what is left is handled a turn at a time.
                while True:
                    self.yields += 1
                    await trio.lowlevel.checkpoint()
                    turn_mark, turn_bytes = conn.handled, 0
                    await self._handle(turn_messages)
                    if conn.closed or self.gone:
                        return
                    if conn.handled - turn_mark < turn_messages:
                        break  # all whole messages handled

    async def _handle(self, limit: int) -> None:
        """Up to ``limit`` buffered messages, then send the replies."""
        conn = self.conn
        results = conn.process(limit) if self.profile is None else self.profile.process(conn, limit)
        if results:
            self.complete(results)
        if conn.has_output or self._pending:
            # Usually the socket takes it all at once: no await needed.
            if not self._writer_busy:
                self._send_some()
            if self._pending:
                await self.flush()

    def close(self) -> None:
        self.gone = True
        self.conn.stats.detach(self.conn)
        self.complete(self.conn.fail_pending_dma())
        self.conn.framer.close()
        self.sock.close()


class DeviceServer:
    """Serves one device on one UNIX socket (see the module doc)."""

    def __init__(
        self,
        backend: DeviceBackend,
        path: str | os.PathLike[str],
        *,
        name: str,
        spin_us: float = DEFAULT_SPIN_US,
        io: str = DEFAULT_IO,
        profile: bool = False,
    ) -> None:
        """``spin_us``: how long to poll for the next request before parking
        (0 = never spin; see ``_Client._spin_recv``).  ``io``: "thread"
        serves each connection on its own thread when the backend allows
        it (``mdevcore.vfio_user.threaded``), "trio" always as a trio task.
        ``profile``: time every request (``mdevcore.vfio_user.profile``)
        and print the table to stderr when a client leaves."""
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {', '.join(IO_MODES)}, not {io!r}")
        self.spin_ns = int(spin_us * 1000)
        self.backend = backend
        self.path = os.fspath(path)
        self.name = name
        self.profile = profile
        # Not None: connections run on threads, and this guards the device.
        self._lock: DeviceLock | None = device_lock(backend) if io == IO_THREAD else None
        self.io = IO_THREAD if self._lock is not None else IO_TRIO
        self._client: _Client | ThreadedClient | None = None
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
                    recv_size=_RECV_SIZE,
                    cmsg_space=_CMSG_SPACE,
                    turn_messages=TURN_MESSAGES,
                    spin_ns=self.spin_ns,
                    profile=profile,
                )
                self._client = threaded
                await self._serve_threaded(threaded, self._client_scope)
            else:
                sock.setblocking(False)
                client = _Client(sock, self.backend, name, self.spin_ns, self.stats, profile)
                self._client = client
                await self._serve_client(client, self._client_scope)
            if profile is not None:
                print(profile.report(name), file=sys.stderr, flush=True)

    async def _serve_threaded(self, client: ThreadedClient, scope: trio.CancelScope) -> None:
        """As _serve_client, the connection on its thread; device calls under the lock."""
        lock = client.lock
        with lock:
            self.stats.event("connect", "%s: client connected (thread)", client.name)
        try:
            with scope:
                try:
                    with lock:
                        self.backend.connected(ThreadedDmaPort(client))
                except Exception:
                    log.exception("%s: device failed in connected()", client.name)
                    return
                await serve_threaded(client)
        finally:
            client.close()
            self._client = None
            self._client_scope = None
            with lock:
                try:
                    self.backend.disconnected()
                except Exception:
                    log.exception("%s: device failed in disconnected()", client.name)
                self.stats.event(
                    "gone",
                    "%s: client gone (%d requests, %d turns yielded; thread)",
                    client.name,
                    client.conn.handled,
                    client.yields,
                )
                self.stats.flush()

    async def _serve_client(self, client: _Client, scope: trio.CancelScope) -> None:
        self.stats.event("connect", "%s: client connected", client.name)
        try:
            with scope:
                try:
                    self.backend.connected(_DmaPort(client))
                except Exception:
                    # A device bug costs this client, not the server.
                    log.exception("%s: device failed in connected()", client.name)
                    return
                await client.run()
        finally:
            client.close()
            self._client = None
            self._client_scope = None
            try:
                self.backend.disconnected()
            except Exception:
                log.exception("%s: device failed in disconnected()", client.name)
            self.stats.event(
                "gone",
                "%s: client gone (%d requests, %d parks, %d caught spinning, %d turns yielded)",
                client.name,
                client.conn.handled,
                client.parks,
                client.spin_hits,
                client.yields,
            )
            self.stats.flush()


async def serve_forever(
    backend: DeviceBackend,
    path: str | os.PathLike[str],
    *,
    name: str = "vfio-user",
    spin_us: float = DEFAULT_SPIN_US,
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
