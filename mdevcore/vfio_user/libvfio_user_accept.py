"""Handing a client to libvfio-user without letting it block the trio thread.

``vfu_attach_ctx`` accepts a connection and reads the client's VERSION with
a blocking recv: a client that connects and then waits (or never speaks)
would hold the whole daemon.  So the server accepts clients itself, on a
dup of libvfio-user's listening socket, and waits in trio until a client's
first message is all there.  Then:

1. a helper connection is made to libvfio-user's socket (the server's own
   pending connections are taken off the kernel queue first, so
   ``vfu_attach_ctx`` accepts the helper) and the client's first message
   is copied onto it, fds included;
2. ``vfu_attach_ctx`` negotiates over the helper, which costs it no wait;
3. its reply (fds included: a twin socket) is copied back to the client;
4. ``dup2`` puts the client's socket in place of the helper under
   libvfio-user's connection fd; from then on libvfio-user talks to the
   client directly, as if it had accepted it.
"""

from __future__ import annotations

import array
import collections
import fcntl
import os
import socket
import struct
import termios

import trio

from mdevcore.vfio_user.constants import HEADER_SIZE
from mdevcore.vfio_user.wire import close_fds, fds_from_ancdata

_HEADER = struct.Struct("<HHIII")
_MAX_FIRST = 64 * 1024  # a VERSION is a few hundred bytes; libvfio-user refuses huge ones
_CMSG_SPACE = socket.CMSG_SPACE(64 * 4)
_POLL = 0.0005
BACKLOG = 4  # as the native server; libvfio-user itself listens with 0


def queued(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


class Acceptor:
    """The server's side of libvfio-user's listening socket (see the module doc)."""

    def __init__(self, listen_fd: int, path: str, timeout: float) -> None:
        self.listener = socket.socket(fileno=os.dup(listen_fd))
        self.listener.listen(BACKLOG)  # the backlog is the socket's, not the fd's
        self.path = path
        self.timeout = timeout
        self.waiting: collections.deque[socket.socket] = collections.deque()

    def close(self) -> None:
        while self.waiting:
            self.waiting.popleft().close()
        self.listener.close()

    def take_pending(self) -> None:
        """Move every connection the kernel holds into ``waiting`` (FIFO)."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the client stays queued, try later
            self.waiting.append(sock)

    async def first_message(self, client: socket.socket) -> tuple[bytes, list[int]] | None:
        """The client's first message, once all of it arrived; None if it does not in time."""
        try:
            return await self._first_message(client)
        except OSError:  # ECONNRESET and the like: gone before it spoke
            return None

    async def _first_message(self, client: socket.socket) -> tuple[bytes, list[int]] | None:
        deadline = trio.current_time() + self.timeout
        size = 0
        while True:
            have = queued(client)
            if have >= HEADER_SIZE:
                size = _HEADER.unpack(client.recv(HEADER_SIZE, socket.MSG_PEEK))[2]
                if not HEADER_SIZE <= size <= _MAX_FIRST:
                    return None
                if have >= size:
                    break
            elif have == 0:
                try:
                    if not client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        return None  # gone before saying anything
                except BlockingIOError:
                    pass
            if trio.current_time() > deadline:
                return None
            if have == 0:
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(client)
            else:
                await trio.sleep(_POLL)
        chunks: list[bytes] = []
        fds: list[int] = []
        got = 0
        while got < size:  # all queued: these reads do not wait
            data, anc, _flags, _ = client.recvmsg(size - got, _CMSG_SPACE, socket.MSG_DONTWAIT)
            fds += fds_from_ancdata(anc)
            if not data:
                close_fds(fds)
                return None
            chunks.append(data)
            got += len(data)
        return b"".join(chunks), fds

    def connect_helper(self, message: bytes, fds: list[int]) -> socket.socket:
        """A connection to libvfio-user's socket carrying the client's first message."""
        self.take_pending()  # so that libvfio-user's accept() finds the helper first
        helper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        helper.setblocking(False)
        try:
            helper.connect(self.path)
            _send(helper, message, fds)
        except OSError:
            helper.close()
            raise
        finally:
            close_fds(fds)
        return helper

    @staticmethod
    def relay_reply(helper: socket.socket, client: socket.socket) -> None:
        """Copy what libvfio-user answered on the helper to the client."""
        while True:
            try:
                data, anc, _flags, _ = helper.recvmsg(_MAX_FIRST, _CMSG_SPACE)
            except (BlockingIOError, ConnectionResetError):
                return
            fds = fds_from_ancdata(anc)
            try:
                if data:
                    _send(client, data, fds)
            except OSError:
                pass  # the client left already; attaching finds out
            finally:
                close_fds(fds)
            if not data:
                return

    @staticmethod
    def swap_in(client: socket.socket, conn_fd: int) -> None:
        """Make libvfio-user's connection fd refer to the client's socket."""
        os.dup2(client.fileno(), conn_fd, inheritable=False)
        client.close()
