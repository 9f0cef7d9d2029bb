"""How the stream travels: straight into a local receiver, or over a socket.

A sender needs three things from its link: ``send`` bytes, ``poll`` for a
STATUS the receiver sent early (a refusal), and ``wait_status`` at the
end.  Addresses are ``tcp:HOST:PORT`` or ``unix:PATH``.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Protocol

from mdevcore.migration import stream
from mdevcore.migration.receiver import Receiver
from mdevcore.migration.stream import FrameType, StreamError


class Link(Protocol):
    def send(self, data: bytes) -> None: ...
    def poll(self) -> tuple[int, str] | None: ...
    def wait_status(self, timeout: float) -> tuple[int, str]: ...
    def close(self) -> None: ...


class LocalLink:
    """Both ends in one process: every send is fed to the receiver at once."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._status: tuple[int, str] | None = None

    def send(self, data: bytes) -> None:
        self._take(self.receiver.feed(data))

    def _take(self, reply: bytes) -> None:
        if reply and self._status is None:
            (fr,) = stream.Decoder(expect_header=False).feed(reply)
            self._status = stream.parse_status(fr.payload)

    def poll(self) -> tuple[int, str] | None:
        return self._status if self._status and self._status[0] else None

    def wait_status(self, timeout: float) -> tuple[int, str]:
        if self._status is None:
            self._take(self.receiver.eof())
        assert self._status is not None
        return self._status

    def close(self) -> None:
        if not self.receiver.finished:
            self.receiver.eof()


class SocketLink:
    """A connected stream socket; the receiver's STATUS comes back on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = stream.Decoder(expect_header=False, max_frame=8192)
        self._status: tuple[int, str] | None = None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            # The receiver may have refused and closed: its STATUS says why.
            status = self._read_status(1.0)
            if status is not None and status[0]:
                raise OSError(status[0], f"destination refused: {status[1]}") from None
            raise OSError(e.errno or errno.EPIPE, f"destination gone: {e}") from None

    def poll(self) -> tuple[int, str] | None:
        status = self._read_status(0.0)
        return status if status and status[0] else None

    def wait_status(self, timeout: float) -> tuple[int, str]:
        status = self._read_status(timeout)
        if status is None:
            return (errno.ETIMEDOUT, "no status from the destination")
        return status

    def _read_status(self, timeout: float) -> tuple[int, str] | None:
        deadline = time.monotonic() + timeout
        while self._status is None:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self.sock], [], [], left)
            except (OSError, ValueError):
                return (errno.EPIPE, "destination connection closed")
            if not ready:
                return None
            try:
                data = self.sock.recv(4096)
            except OSError as e:
                return (e.errno or errno.EPIPE, f"destination connection lost: {e}")
            if not data:
                return (errno.EPIPE, "destination closed the connection without a status")
            try:
                frames = self.decoder.feed(data)
            except StreamError as e:
                return (e.errno or errno.EPROTO, f"bad reply: {e.strerror}")
            for fr in frames:
                if fr.type == FrameType.STATUS:
                    self._status = stream.parse_status(fr.payload)
                    break
        return self._status

    def close(self) -> None:
        self.sock.close()


# --- addresses ----------------------------------------------------------------


def parse_address(text: str) -> tuple[int, str | tuple[str, int]]:
    """``tcp:HOST:PORT`` or ``unix:PATH`` -> (family, sockaddr)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return family, (host, int(port))
    raise ValueError(f"address {text!r}: want tcp:HOST:PORT or unix:PATH")


def connect(text: str, timeout: float = 10.0) -> socket.socket:
    family, addr = parse_address(text)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listen(text: str) -> socket.socket:
    family, addr = parse_address(text)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            assert isinstance(addr, str)
            try:
                os.unlink(addr)
            except FileNotFoundError:
                pass
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_receiver(conn: socket.socket, receiver: Receiver, timeout: float) -> None:
    """Feed one connection to ``receiver`` until it is finished; send its reply."""
    conn.settimeout(timeout)
    while not receiver.finished:
        try:
            data = conn.recv(1 << 20)
        except OSError:
            data = b""
        reply = receiver.feed(data) if data else receiver.eof()
        if reply:
            try:
                conn.sendall(reply)
            except OSError:
                return  # the sender is gone; it rolls itself back
    if receiver.error is not None:
        _linger(conn, min(timeout, 5.0))


def _linger(conn: socket.socket, timeout: float) -> None:
    """After a refusal, read (and drop) what the sender still sends until it closes.

    Closing with unread bytes would reset a TCP connection, and a reset can
    discard the STATUS before the sender reads it.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and conn.recv(1 << 20):
            pass
    except OSError:
        pass
