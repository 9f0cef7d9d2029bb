"""A connection served as a task of the trio run (``DeviceServer(io="trio")``).

A thin shell around ``engine.Connection``.  The hot path uses a raw
non-blocking stdlib socket: recvmsg_into (one buffer per connection) is
tried first and ``trio.lowlevel.wait_readable`` awaited only on EAGAIN;
every whole message in what arrived is handled before replying, and the
replies go out in one send (trio.socket's wrapper measured ~6 us more per
round trip on these machines).  While a client sends bursts, the reader polls the
socket for up to ``spin_us`` (default 0: off) before parking in trio.

Server-to-client DMA (QEMU has no twin socket): ``DmaPort.dma_read/write``
queue a request on the same socket and wait for the reply the reader task
matches, while the client's own requests keep being served.

Fairness: every device of a daemon is served by tasks of one trio run, so
a client that keeps its socket full must not keep the others waiting.  A
reader handles at most ``TURN_MESSAGES`` messages or ``TURN_BYTES`` bytes
between two checkpoints, then lets the other tasks run.  A client waiting
for each reply parks every turn and never reaches the bound, so its round
trip costs the same (benchmarks/fairness.py shows both).
"""

from __future__ import annotations

import array
import errno
import logging
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial

import trio

from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.constants import SERVER_MAX_MSG_FDS
from mdevcore.vfio_user.dma_waiters import DmaWaiters
from mdevcore.vfio_user.engine import Connection, DmaResult
from mdevcore.vfio_user.profile import ConnectionProfile
from mdevcore.vfio_user.stats import DeviceStats
from mdevcore.vfio_user.wire import close_fds, fds_from_ancdata

RECV_SIZE = 256 * 1024
# Plain ints: socket.MSG_* are IntFlag members, whose & costs microseconds.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# Room for more fds than we accept, so a client sending too many gets
# EINVAL rather than silently truncated (and kernel-closed) fds.
CMSG_SPACE = socket.CMSG_SPACE(4 * SERVER_MAX_MSG_FDS * 8)
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
TURN_BYTES = RECV_SIZE


class TrioDmaPort:
    """DmaPort for one connection: requests over the socket, replies matched."""

    def __init__(self, client: TrioClient) -> None:
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


class TrioClient:
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
        self._waiters = DmaWaiters()
        self.gone = False
        # recvmsg(n) allocates n bytes per call - an mmap/munmap pair at this
        # size, ~35 us - so receive into one buffer kept for the connection.
        self._rbuf = bytearray(RECV_SIZE)
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
        return await self._waiters.wait(make_request(), self.flush)

    def complete(self, results: Sequence[DmaResult]) -> None:
        self._waiters.complete(results)

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
                n, ancdata, msg_flags, _ = recvmsg_into(bufs, CMSG_SPACE)
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
                n, ancdata, msg_flags, _ = sock.recvmsg_into(bufs, CMSG_SPACE)
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
