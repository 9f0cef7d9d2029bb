"""The vfio-user engine after VERSION, against a real PciDevice (Counter or mtty).

Input: byte 0 picks the device (even: mdevcore.samples.counter.Counter, odd: a
2-port mtty); the rest is records, one per recvmsg the server would do::

    u8 fds (bits 0-1: how many, 0-3; bit 2: memfd of 64 KiB, else eventfd)
    u16 length, then that many stream bytes

A trailing partial record is stream bytes without fds.  ``engine.record``
turns captured traffic into this format.

Invariants, checked after every record and at the end:
- every reply is well-formed: reply type, echoes a request's msg_id and
  command in arrival order, exactly one per request without NO_REPLY,
  msg_size matches, an error reply is a bare header with an errno of the set
  below, a REGION_READ reply carries count bytes after the echoed head;
- fds the device hands out go with GET_REGION_INFO only;
- after the client goes (``disconnected``) the process holds exactly the fds
  it held before the connection: none of the input's fds leaked;
- the device still answers a REGION_READ of config space (vendor/device id),
  on the same connection when it is still open and on a new one.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

from mdevcore.pci.device import PciDevice
from mdevcore.samples.counter import Counter
from mdevcore.samples.mtty.device import MttyDevice
from mdevcore.tools.fuzz import check, open_fds
from mdevcore.vfio_user import wire
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX
from mdevcore.vfio_user.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_REPLY,
    FLAG_TYPE_MASK,
    HEADER_SIZE,
    Command,
)
from mdevcore.vfio_user.engine import Connection
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

# Errnos a reply may carry: what the spec's server (libvfio-user) and ours
# answer for refused requests.  A transport errno (ENOTCONN, EPIPE...) or an
# unknown number would mean internal state leaking to the client.
ALLOWED_ERRNOS = frozenset(
    {
        errno.EINVAL,
        errno.EIO,
        errno.EFAULT,
        errno.ENOENT,
        errno.EBUSY,
        errno.EPERM,
        errno.EACCES,
        errno.ENOSPC,
        errno.ENOMEM,
        errno.ERANGE,
        errno.E2BIG,
        errno.EAGAIN,
        errno.EEXIST,
        errno.ENODEV,
        errno.ENXIO,
        errno.ENOTTY,
        errno.EBADF,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.ENOSYS,
        errno.EOVERFLOW,
        errno.EFBIG,
        errno.EMSGSIZE,
    }
)
MEMFD_SIZE = 64 << 10
RECORD = struct.Struct("<BH")
VERSION_BODY = struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_msg_fds":8}}\0'


class _NoDma:
    """The DmaPort of a client that serves no DMA messages (the sans-IO harness)."""

    async def dma_read(self, address: int, count: int) -> bytes:
        raise OSError(errno.ENOTCONN, "no DMA by message in the fuzz harness")

    async def dma_write(self, address: int, data: bytes) -> None:
        raise OSError(errno.ENOTCONN, "no DMA by message in the fuzz harness")


def make_device(selector: int) -> tuple[PciDevice, bytes]:
    """The device and the 4 bytes its config space starts with."""
    if selector & 1:
        return MttyDevice(2), struct.pack("<HH", 0x4348, 0x3253)
    return Counter(), struct.pack("<HH", 0x1234, 0x0001)


def records(data: bytes) -> list[tuple[bytes, int, bool]]:
    """(stream bytes, fd count, memfd?) per recvmsg."""
    out = []
    pos = 0
    while pos < len(data):
        if pos + RECORD.size > len(data):
            out.append((data[pos:], 0, False))
            break
        flags, length = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        out.append((data[pos : pos + length], flags & 3, bool(flags & 4)))
        pos += length
    return out


def encode(chunks: list[tuple[bytes, int, bool]], device: int = 0) -> bytes:
    """The inverse of ``records`` (for seeds)."""
    out = bytearray([device])
    for chunk, nfds, memfd in chunks:
        for start in range(0, max(len(chunk), 1), 0xFFFF):
            piece = chunk[start : start + 0xFFFF]
            out += RECORD.pack((nfds | (4 if memfd else 0)) if start == 0 else 0, len(piece))
            out += piece
    return bytes(out)


def make_fds(count: int, memfd: bool) -> list[int]:
    fds = []
    for _ in range(count):
        if memfd:
            fd = os.memfd_create("fuzz-dma", os.MFD_CLOEXEC)
            os.ftruncate(fd, MEMFD_SIZE)
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fds.append(fd)
    return fds


class Expect:
    """What a correct engine answers: the stream framed independently of it."""

    def __init__(self, max_msg_size: int) -> None:
        self.max_msg_size = max_msg_size
        self.stream = bytearray()
        self.pos = 0
        self.broken = False  # a msg_size the engine must refuse (it closes)
        self.pending: list[tuple[int, int, bytes]] = []  # (msg_id, command, body)

    def feed(self, data: bytes) -> None:
        self.stream += data
        while not self.broken and len(self.stream) - self.pos >= HEADER_SIZE:
            msg_id, command, size, flags, _ = HEADER.unpack_from(self.stream, self.pos)
            if size < HEADER_SIZE or size > self.max_msg_size:
                self.broken = True
                break
            if len(self.stream) - self.pos < size:
                break
            body = bytes(self.stream[self.pos + HEADER_SIZE : self.pos + size])
            self.pos += size
            if flags & FLAG_TYPE_MASK != FLAG_REPLY and not flags & FLAG_NO_REPLY:
                self.pending.append((msg_id, command, body))


def check_replies(conn: Connection, expect: Expect) -> int:
    """Check every queued reply; returns how many."""
    checked = 0
    framer = wire.Framer(1 << 31)
    try:
        for buffers, fds in conn.outgoing():
            check(len(fds) <= 8, f"{len(fds)} fds in one reply")
            framer.feed(b"".join(buffers))
            if fds:
                # Device-owned fds: only a complete GET_REGION_INFO answer carries one.
                head = HEADER.unpack_from(buffers[0])
                check(head[1] == Command.DEVICE_GET_REGION_INFO, f"fds with command {head[1]}")
            while (msg := framer.next_message()) is not None:
                check_reply(msg, expect)
                checked += 1
        check(framer.next_message() is None and not framer.peek()[2], "partial reply queued")
    finally:
        framer.close()
    return checked


def check_reply(msg: wire.RawMessage, expect: Expect) -> None:
    check(expect.pending, f"reply {msg.msg_id:#x} cmd {msg.command} to no request")
    msg_id, command, body = expect.pending.pop(0)
    check(
        (msg.msg_id, msg.command) == (msg_id, command),
        f"reply {msg.msg_id:#x}/{msg.command} for request {msg_id:#x}/{command}",
    )
    if msg.flags & FLAG_ERROR:
        check(msg.flags == FLAG_REPLY | FLAG_ERROR, f"error reply flags {msg.flags:#x}")
        check(not msg.payload, f"error reply with {len(msg.payload)} payload bytes")
        check(msg.error in ALLOWED_ERRNOS, f"cmd {command}: errno {msg.error} not in the set")
        return
    check(msg.flags == FLAG_REPLY and msg.error == 0, f"reply flags {msg.flags:#x}")
    check(command != Command.VERSION, "a second VERSION accepted")
    if command == Command.REGION_READ:
        check(len(body) == REGION_ACCESS.size, "REGION_READ of a malformed body accepted")
        count = REGION_ACCESS.unpack(body)[2]
        check(msg.payload[:16] == body, "REGION_READ reply does not echo its request")
        check(len(msg.payload) == 16 + count, f"REGION_READ reply of {len(msg.payload)} bytes")
    elif command == Command.REGION_WRITE:
        check(msg.payload == body[:16], "REGION_WRITE reply does not echo its request")
    elif command == Command.DEVICE_GET_INFO:
        check(len(msg.payload) == wire.DEVICE_INFO_SIZE, "DEVICE_GET_INFO reply size")


def config_read(conn: Connection, msg_id: int) -> bytes:
    body = REGION_ACCESS.pack(0, PCI_CONFIG_REGION_INDEX, 4)
    conn.receive_data(HEADER.pack(msg_id, Command.REGION_READ, 32, 0, 0) + body)
    conn.process()
    out = b"".join(b"".join(bufs) for bufs, _ in conn.outgoing())
    check(len(out) == 36, f"config read answered with {len(out)} bytes")
    head = HEADER.unpack_from(out)
    check(head[0] == msg_id and head[3] == FLAG_REPLY, f"config read reply {head}")
    return out[32:]


def negotiate(conn: Connection) -> None:
    conn.receive_data(HEADER.pack(0, Command.VERSION, 16 + len(VERSION_BODY), 0, 0) + VERSION_BODY)
    conn.process()
    conn.outgoing()
    check(conn.negotiated, "VERSION refused")


class EngineTarget:
    def __init__(self) -> None:
        # Refusals log at info, device errors at error: both are expected here.
        logging.getLogger("mdevcore").setLevel(logging.CRITICAL)
        logging.getLogger("samples").setLevel(logging.CRITICAL)
        self.replies_checked = 0  # so a test can tell the checks are not vacuous

    def run(self, data: bytes) -> None:
        if not data:
            return
        fds_before = open_fds()
        device, ident = make_device(data[0])
        try:
            self._connection(device, ident, data[1:])
            # A client that comes back finds the device answering.
            device.connected(_NoDma())
            conn = Connection(device, name="fuzz-again")
            negotiate(conn)
            check(config_read(conn, 0xBEEF) == ident, "config space changed identity")
            conn.framer.close()
            device.disconnected()
        finally:
            device.close()
        check(open_fds() == fds_before, f"fds: {fds_before} before, {open_fds()} after")

    def _connection(self, device: PciDevice, ident: bytes, data: bytes) -> None:
        device.connected(_NoDma())
        held = open_fds()
        conn = Connection(device, name="fuzz")
        try:
            negotiate(conn)
            expect = Expect(conn.framer.max_msg_size)
            for chunk, nfds, memfd in records(data):
                conn.receive_data(chunk, make_fds(nfds, memfd))
                expect.feed(chunk)
                conn.process()
                self.replies_checked += check_replies(conn, expect)
                check(conn.closed == expect.broken, f"closed={conn.closed} broken={expect.broken}")
                if conn.closed:
                    break
            if not conn.closed:
                check(not expect.pending, f"{len(expect.pending)} requests unanswered")
            if not conn.closed and expect.pos == len(expect.stream):
                # On a message boundary the same connection must still answer.
                check(config_read(conn, 0xCAFE) == ident, "config space changed identity")
        finally:
            conn.framer.close()
            device.disconnected()
        check(open_fds() == held, f"fds after disconnect: {open_fds()}, {held} before")

    def close(self) -> None:
        pass


def make() -> EngineTarget:
    return EngineTarget()


def seeds() -> dict[str, bytes]:
    """Sessions of the project's Client against a served Counter and mtty."""
    from functools import partial

    from mdevcore.tools.fuzz import record

    counter = partial(record.qemu_like_session, bars=[0], io_offsets=[0, 4, 8])
    mtty = partial(record.qemu_like_session, bars=[0, 1], io_offsets=list(range(8)))
    return {
        "counter-session": encode(record.record(Counter(), counter), 0),
        "counter-migration": encode(record.record(Counter(), record.migration_session), 0),
        "mtty-session": encode(record.record(MttyDevice(2), mtty), 1),
        "mtty-migration": encode(record.record(MttyDevice(2), record.migration_session), 1),
    }
