"""Frame backends: the wire behind a virtio-net device.

A backend carries whole Ethernet frames.  One with ``vnet_hdr`` set
carries each frame behind a 12-byte virtio_net_hdr (the TAP backend, for
the offloads it lists in ``offloads``: see offload.py); the others carry
bare frames and offer no offloads.  The one here
is a UNIX datagram socket: each datagram is one frame, so two devices
given the two ends of ``socketpair()`` are cabled back to back (VF-to-VF
loopback), and a test or a tool holding one end is the "other host".  It
needs no privileges; a TAP backend fits the same interface.

Sending never blocks: a full socket buffer drops the frame, as a NIC whose
wire is busy would; the counters say so.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from typing import Protocol

import trio

# Largest frame we take from the wire: a 64 KiB IP packet plus Ethernet and VLAN headers.
MAX_FRAME = 65535 + 18


@dataclasses.dataclass(slots=True)
class BackendStats:
    tx_frames: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_truncated: int = 0


class FrameBackend(Protocol):
    stats: BackendStats
    vnet_hdr: bool  # frames are virtio_net_hdr (12 bytes) + Ethernet frame, both ways
    offloads: int  # virtio-net feature bits the backend can honour (offload.OFFLOAD_FEATURES)

    def set_offload(self, features: int) -> None:
        """The negotiated features: what the backend may hand over in its headers."""

    def send(self, frame: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    def close(self) -> None: ...


class DatagramBackend:
    """One end of a UNIX SOCK_DGRAM (or SOCK_SEQPACKET) socket, non-blocking."""

    def __init__(self, sock: socket.socket) -> None:
        if sock.family != socket.AF_UNIX or sock.type not in (
            socket.SOCK_DGRAM,
            socket.SOCK_SEQPACKET,
        ):
            raise ValueError("a frame backend needs a UNIX datagram socket")
        sock.setblocking(False)
        self.sock = sock
        self.stats = BackendStats()
        # Bare frames: the peer may be a driver that did not take the offloads,
        # and nothing here would checksum or segment for it.
        self.vnet_hdr = False
        self.offloads = 0

    def set_offload(self, features: int) -> None:
        pass

    def send(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError as exc:
            # EAGAIN/ENOBUFS: buffer full; ECONNREFUSED/EPIPE: nobody on the other end.
            if exc.errno not in (
                errno.EAGAIN,
                errno.ENOBUFS,
                errno.ECONNREFUSED,
                errno.EPIPE,
                errno.EMSGSIZE,
            ):
                raise
            self.stats.tx_dropped += 1
            return
        self.stats.tx_frames += 1

    async def receive(self) -> bytes:
        """The next frame from the wire (frames longer than MAX_FRAME are dropped)."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                frame, _, flags, _ = self.sock.recvmsg(MAX_FRAME)
            except BlockingIOError:
                continue
            if flags & socket.MSG_TRUNC:
                self.stats.rx_truncated += 1
                continue
            self.stats.rx_frames += 1
            return frame

    def close(self) -> None:
        self.sock.close()


def backend_pair() -> tuple[DatagramBackend, DatagramBackend]:
    """Two backends cabled to each other."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return DatagramBackend(a), DatagramBackend(b)
