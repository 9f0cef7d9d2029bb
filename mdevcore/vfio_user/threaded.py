"""A served connection on its own thread: blocking recvmsg/sendmsg, engine, device.

Why: in the trio server every request costs a park in trio and a wake-up
through its scheduler, most of a small request's round trip
(benchmarks/vfio_user_rtt.py).  Here one thread per connection blocks in
``recvmsg``, runs the sans-IO engine and the device, and answers with a
blocking ``send``: the kernel wakes the thread straight, no scheduler in
between.  ``DeviceServer(io="thread")`` (``mdevd serve --io thread``)
serves with it; the accept loop, counters and the DMA port stay in trio.

Structure: the thread is started with ``trio.to_thread.run_sync`` from the
task that accepted the client and is joined by it (never abandoned, with
its own capacity limiter so any number of clients get one).  Cancelling
that task (disconnect, unserve, shutdown) shuts the socket down
(``SHUT_RDWR``), which ends a blocked ``recvmsg`` or ``send`` at once; the
thread returns and the task finishes its cleanup in trio.

The threading rule it follows is ``mdevcore.vfio_user.locking``'s.  The
connection thread holds the device lock for one turn of the engine (at
most ``TURN_MESSAGES`` messages) and never across a socket call, so trio
waits for the lock at most one turn and never for a client.

The engine (``Connection``) is guarded by the same lock: the DMA port
queues its DMA_READ/DMA_WRITE requests from trio under it, sends them
itself (``send_lock`` keeps whole messages apart), and the thread hands
the replies back with ``run_sync_soon``.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import trio

from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.dma_waiters import DmaWaiters
from mdevcore.vfio_user.engine import Connection, DmaResult
from mdevcore.vfio_user.locking import DeviceLock
from mdevcore.vfio_user.profile import ConnectionProfile
from mdevcore.vfio_user.stats import DeviceStats
from mdevcore.vfio_user.wire import close_fds, fds_from_ancdata

log = logging.getLogger(__name__)


_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)

# How many connection threads of this process may poll at once: polling
# costs at most that many CPUs, however many devices are busy, and leaves
# one for the rest (a polling thread also takes the GIL between its polls).
# A thread finding no slot free waits in recvmsg, as without a spin.
SPIN_SLOTS = max(1, (os.cpu_count() or 1) - 1)
_spin_slots = threading.BoundedSemaphore(SPIN_SLOTS)


class ThreadedClient:
    """One accepted connection served by a thread (see the module doc).

    ``run`` is the thread's body; everything else runs in trio.  Counters
    as the trio server's ``_Client``: ``yields`` (turns ended by the
    fairness bound), ``spin_hits`` (requests caught polling),
    ``spin_refused`` (polls not started: every slot of ``SPIN_SLOTS`` was
    taken), ``parks`` (waits for the client; counted only while profiling).
    """

    def __init__(
        self,
        sock: socket.socket,
        backend: DeviceBackend,
        lock: DeviceLock,
        name: str,
        *,
        stats: DeviceStats,
        recv_size: int,
        cmsg_space: int,
        turn_messages: int,
        spin_ns: int = 0,
        profile: ConnectionProfile | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.lock = lock
        self.spin_ns = spin_ns
        self.profile = profile
        self.conn = Connection(backend if profile is None else profile.wrap(backend),
                               name=name, stats=stats)  # fmt: skip
        self.send_lock = threading.Lock()
        self._token = trio.lowlevel.current_trio_token()
        self._waiters = DmaWaiters()
        self._buf = bytearray(recv_size)
        self._view = memoryview(self._buf)
        self._cmsg_space = cmsg_space
        self._turn = turn_messages
        self._poller: select.poll | None = None
        self._stopped = False  # stop() was called: an end of file is ours
        self._sent_at = 0  # when the last requests were done with (spinning only)
        self._burst = False  # the last request came within spin_ns of it
        self.gone = False
        self.parks = 0
        self.spin_hits = 0
        self.spin_refused = 0
        self.yields = 0

    # --- in the thread ----------------------------------------------------------

    def run(self) -> None:
        """Serve until the client leaves, the engine closes, or the socket is shut down."""
        try:
            self._serve()
        except OSError as e:
            # EPIPE/ECONNRESET, or EBADF/EINVAL after a shutdown: this connection ends.
            with self.lock:
                self.conn.stats.event("gone", "%s: connection error: %s", self.name, e)
        finally:
            self.gone = True

    def _receive(self) -> tuple[int, list[tuple[int, int, bytes]], int]:
        """recvmsg, after polling for spin_ns if set (or timed, when profiling).

        Polls only while the client is in a burst (its last request came
        within spin_ns of our previous reply), as the trio reader does: a
        sparse client, or one starved of CPU, is waited for at once.  And
        only with a slot of ``SPIN_SLOTS`` free.
        """
        recvmsg_into, bufs, cmsg = self.sock.recvmsg_into, [self._view], self._cmsg_space
        clock = time.perf_counter_ns
        if self._burst:
            slots = _spin_slots
            if slots.acquire(blocking=False):
                try:
                    end = clock() + self.spin_ns
                    while True:
                        try:
                            n, anc, flags, _ = recvmsg_into(bufs, cmsg, _MSG_DONTWAIT)
                        except BlockingIOError:
                            if clock() >= end:
                                break
                            continue
                        self.spin_hits += 1
                        return n, anc, flags
                finally:
                    slots.release()
            else:
                self.spin_refused += 1
        elif self.profile is not None:
            return self._receive_profiled()
        n, anc, flags, _ = recvmsg_into(bufs, cmsg)
        if self.spin_ns:
            self._burst = clock() - self._sent_at < self.spin_ns
        return n, anc, flags

    def _receive_profiled(self) -> tuple[int, list[tuple[int, int, bytes]], int]:
        # Waiting for the client is not a cost: poll first, then time the receive.
        assert self.profile is not None
        clock = time.perf_counter_ns
        recvmsg_into, bufs, cmsg = self.sock.recvmsg_into, [self._view], self._cmsg_space
        while True:
            t0 = clock()
            try:
                n, anc, flags, _ = recvmsg_into(bufs, cmsg, _MSG_DONTWAIT)
            except BlockingIOError:
                self.parks += 1
                if self._poller is None:
                    self._poller = select.poll()
                    self._poller.register(self.sock, select.POLLIN)
                self._poller.poll()
                continue
            elapsed = clock() - t0
            self.profile.recv_ns += elapsed
            self.profile.recvs += 1
            self.profile.syscall(elapsed)
            return n, anc, flags

    def _serve(self) -> None:
        conn, lock, turn, view = self.conn, self.lock, self._turn, self._view
        profile = self.profile
        # The common case inline: one blocking recvmsg, no method call around it.
        plain = not self.spin_ns and profile is None
        recvmsg_into, bufs, cmsg = self.sock.recvmsg_into, [view], self._cmsg_space
        while True:
            if plain:
                n, ancdata, msg_flags, _ = recvmsg_into(bufs, cmsg)
            else:
                n, ancdata, msg_flags = self._receive()
            fds = fds_from_ancdata(ancdata) if ancdata else []
            if msg_flags & _MSG_CTRUNC:
                close_fds(fds)
                with lock:
                    conn.stats.error(
                        "too many fds",
                        "%s: control data truncated (too many fds); closing",
                        self.name,
                        level=logging.WARNING,
                    )
                return
            if not n:
                close_fds(fds)
                why = "connection shut down by the server" if self._stopped else "client closed"
                with lock:
                    conn.stats.event("gone", "%s: %s", self.name, why)
                return
            while True:
                # One turn under the lock: the trio side waits at most this long.
                with lock:
                    if n:
                        conn.receive_data(view[:n], fds)
                        n = 0
                    before = conn.handled
                    if profile is None:
                        results = conn.process(turn)
                    else:
                        results = profile.process(conn, turn)
                    out = conn.outgoing()
                if results:
                    self._token.run_sync_soon(self._complete, results)
                if out:
                    self._send(out)
                if self.spin_ns:
                    # Done with these requests, answered or posted: a
                    # bursting client's next one comes within spin_ns.
                    self._sent_at = time.perf_counter_ns()
                if conn.closed:
                    return
                if conn.handled - before < turn:
                    break
                # A backlog: let the others run first.  The lock is free
                # already; sleep(0) also gives up the GIL, which a busy
                # thread would otherwise keep for the 5 ms switch interval.
                self.yields += 1
                time.sleep(0)
            if profile is not None:
                profile.end_batch()  # what one receive brought, all turns of it

    def _send(self, out: list[tuple[list[bytes], list[int]]]) -> None:
        profile = self.profile
        t0 = time.perf_counter_ns() if profile is not None else 0
        with self.send_lock:
            for bufs, fds in out:
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], anc)
                    if sent < len(data):
                        self.sock.sendall(memoryview(data)[sent:])
                else:
                    self.sock.sendall(data)
        if profile is not None:
            elapsed = time.perf_counter_ns() - t0
            profile.send_ns += elapsed
            profile.sends += 1
            profile.syscall(elapsed)

    # --- in trio ------------------------------------------------------------------------

    def stop(self) -> None:
        """End ``run`` soon: a blocked recvmsg or send returns at once."""
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more: the thread is ending anyway

    def _complete(self, results: Sequence[DmaResult]) -> None:
        self._waiters.complete(results)

    async def dma_request(self, make_request: Callable[[], int]) -> DmaResult:
        """Queue one DMA request (under the lock), send it, wait for its reply."""
        if self.gone:
            raise OSError(errno.ENOTCONN, "client gone")
        with self.lock:
            # The thread takes its own output inside the lock: what is
            # queued now is this request alone.
            msg_id = make_request()
            out = self.conn.outgoing()
        return await self._waiters.wait(msg_id, partial(self._send_from_trio, out))

    async def _send_from_trio(self, out: list[tuple[list[bytes], list[int]]]) -> None:
        # Never block the trio thread: the send lock may be held by the
        # thread in a blocking send to a client that does not read.
        while not self.send_lock.acquire(blocking=False):
            await trio.sleep(0.001)
        try:
            for bufs, _fds in out:  # DMA requests carry no fds
                data = memoryview(b"".join(bufs))
                while data:
                    if self.gone:
                        raise OSError(errno.ENOTCONN, "client gone")
                    try:
                        sent = self.sock.send(data, _MSG_DONTWAIT)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.sock)
                        continue
                    data = data[sent:]
        finally:
            self.send_lock.release()

    def close(self) -> list[DmaResult]:
        """After the thread ended: fail the DMA still waiting, close the socket."""
        self.gone = True
        with self.lock:
            self.conn.stats.detach(self.conn)
            failed = self.conn.fail_pending_dma()
            self.conn.framer.close()
        self._complete(failed)
        self.sock.close()
        return failed


class ThreadedDmaPort:
    """DmaPort for a threaded connection (chunked as the trio server's)."""

    def __init__(self, client: ThreadedClient) -> None:
        self._client = client

    async def dma_read(self, address: int, count: int) -> bytes:
        client = self._client
        conn = client.conn
        limit = min(conn.client_caps.max_data_xfer_size, conn.max_data_xfer_size)
        chunks: list[bytes] = []
        for done in range(0, count, limit):
            n = min(limit, count - done)
            result = await client.dma_request(partial(conn.dma_read_request, address + done, n))
            chunks.append(result.data)
        return b"".join(chunks)

    async def dma_write(self, address: int, data: bytes) -> None:
        client = self._client
        conn = client.conn
        limit = conn.client_caps.max_data_xfer_size
        for done in range(0, len(data), limit):
            piece = bytes(data[done : done + limit])
            await client.dma_request(partial(conn.dma_write_request, address + done, piece))


async def serve_threaded(client: ThreadedClient) -> None:
    """Run ``client`` on its own thread until it ends; cancellation stops it.

    The thread is joined before this returns (or raises Cancelled).
    """

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            client.stop()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_cancel)
        try:
            await trio.to_thread.run_sync(
                client.run, limiter=trio.CapacityLimiter(1), abandon_on_cancel=False
            )
        finally:
            nursery.cancel_scope.cancel()
