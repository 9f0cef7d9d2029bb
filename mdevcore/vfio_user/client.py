"""A blocking vfio-user client: for tests, benchmarks and the CLI.

Plain stdlib socket, one thread.  It can send every command, pass fds,
pipeline (``send`` then ``wait_reply``), send raw bytes for error tests,
and answers the server's DMA_READ/DMA_WRITE requests from buffers the
caller registers with ``add_dma_buffer`` (what QEMU does for guest memory
mapped without an fd) whenever it reads from the socket.
"""

from __future__ import annotations

import array
import dataclasses
import errno
import json
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from mdevcore.vfio_user import wire
from mdevcore.vfio_user.backend import DeviceInfo, IrqInfo, RegionInfo, SparseArea
from mdevcore.vfio_user.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_CAP_TYPE,
    Command,
)
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS, RawMessage

# What this client announces; QEMU 10.1+ sends the same shape.
QEMU_LIKE_CAPS: dict[str, Any] = {
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
}


class VfioUserError(OSError):
    """The server answered a request with an error reply (errno set)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RegionInfoReply:
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: list[wire.ParsedCap]
    fd: int | None

    def as_region_info(self) -> RegionInfo:
        """The RegionInfo the server encoded (sparse areas and type decoded)."""
        areas: tuple[SparseArea, ...] = ()
        type_cap = None
        for cap in self.caps:
            if cap.id == REGION_INFO_CAP_SPARSE_MMAP:
                head = wire.SparseMmapHead.parse(cap.body[:8])
                areas = tuple(
                    SparseArea(a.offset, a.size)
                    for a in (
                        wire.SparseArea.parse(cap.body[8 + 16 * i : 24 + 16 * i])
                        for i in range(head.nr_areas)
                    )
                )
            elif cap.id == REGION_INFO_CAP_TYPE:
                t = wire.TypeCap.parse(cap.body[:8])
                type_cap = (t.type, t.subtype)
        return RegionInfo(self.index, self.flags, self.size, self.fd, self.offset, areas, type_cap)


class Client:
    """Blocking vfio-user client over a UNIX socket.

    ``timeout`` (seconds, None = block forever) bounds every socket wait;
    tests keep a timeout so a server bug fails instead of hanging.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.framer = wire.Framer(1 << 30)
        self._next_id = 1
        self._stash: dict[int, RawMessage] = {}
        self._dma: list[tuple[int, bytearray]] = []
        self.server_caps: dict[str, Any] = {}
        # One receive buffer: recvmsg(n) would allocate n bytes per call.
        self._rview = memoryview(bytearray(1 << 18))
        self.dma_requests_served = 0

    # --- raw transport -----------------------------------------------------

    def close(self) -> None:
        self.sock.close()
        self.framer.close()
        for msg in self._stash.values():
            wire.close_fds(msg.fds)
        self._stash.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if not fds:
            self.sock.sendall(data)
            return
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        view = memoryview(data)
        sent = self.sock.sendmsg([view], anc)
        if sent < len(data):
            self.sock.sendall(view[sent:])

    def new_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def send(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
        msg_id: int | None = None,
    ) -> int:
        """Send one request; returns its msg_id (for ``wait_reply``)."""
        if msg_id is None:
            msg_id = self.new_id()
        flags = FLAG_NO_REPLY if no_reply else 0
        self.send_raw(
            HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, 0) + payload, fds
        )
        return msg_id

    def recv_message(self) -> RawMessage:
        """The next message from the server (blocking); raises EOFError at EOF."""
        while True:
            msg = self.framer.next_message()
            if msg is not None:
                return msg
            n, ancdata, flags, _ = self.sock.recvmsg_into([self._rview], socket.CMSG_SPACE(4 * 64))
            fds = wire.fds_from_ancdata(ancdata)
            if not n:
                wire.close_fds(fds)
                raise EOFError("server closed the connection")
            self.framer.feed(self._rview[:n], fds)

    def wait_reply(self, msg_id: int) -> RawMessage:
        """Read until the reply to ``msg_id``; serve DMA requests meanwhile."""
        if msg_id in self._stash:
            return self._stash.pop(msg_id)
        while True:
            msg = self.recv_message()
            if msg.flags & 0xF != FLAG_REPLY:
                self._serve_request(msg)
            elif msg.msg_id == msg_id:
                return msg
            else:
                self._stash[msg.msg_id] = msg

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
    ) -> RawMessage:
        """Send and wait; an error reply raises VfioUserError(errno)."""
        reply = self.wait_reply(self.send(command, payload, fds))
        return check(reply)

    def poll(self, timeout: float) -> int:
        """Serve server requests (DMA) arriving within ``timeout``; returns the count."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        served = 0
        try:
            while True:
                try:
                    msg = self.recv_message()
                except (TimeoutError, BlockingIOError):
                    return served
                if msg.flags & 0xF == FLAG_REPLY:
                    self._stash[msg.msg_id] = msg
                else:
                    self._serve_request(msg)
                    served += 1
        finally:
            self.sock.settimeout(old)

    # --- answering the server's DMA --------------------------------------

    def add_dma_buffer(self, address: int, buf: bytearray) -> None:
        """Guest memory at ``address`` the server may reach by DMA_READ/WRITE."""
        self._dma.append((address, buf))

    def _find_dma(self, address: int, count: int) -> memoryview | None:
        for base, buf in self._dma:
            if base <= address and address + count <= base + len(buf):
                return memoryview(buf)[address - base : address - base + count]
        return None

    def _serve_request(self, msg: RawMessage) -> None:
        wire.close_fds(msg.fds)
        p = msg.payload
        err = 0
        body = b""
        if msg.command in (Command.DMA_READ, Command.DMA_WRITE) and len(p) >= 16:
            address, count = wire.DMA_ACCESS.unpack_from(p)
            view = self._find_dma(address, count)
            if view is None:
                err = errno.EFAULT
            elif msg.command == Command.DMA_READ:
                body = p[:16] + bytes(view)
            elif len(p) - 16 != count:
                err = errno.EINVAL
            else:
                view[:] = p[16:]
                body = p[:16]
        else:
            err = errno.ENOSYS  # what QEMU answers to unknown server requests
        self.dma_requests_served += 1
        if msg.flags & FLAG_NO_REPLY:
            return
        if err:
            self.send_raw(wire.error_reply(msg.msg_id, msg.command, err))
        else:
            self.send_raw(
                HEADER.pack(msg.msg_id, msg.command, HEADER_SIZE + len(body), FLAG_REPLY, 0) + body
            )

    # --- commands -----------------------------------------------------------

    def negotiate(
        self,
        caps: dict[str, Any] | None = QEMU_LIKE_CAPS,
        *,
        major: int = 0,
        minor: int = 0,
    ) -> tuple[int, int, dict[str, Any]]:
        """VERSION; returns the server's (major, minor, capabilities).

        ``caps=None`` sends no JSON at all (the spec allows it).
        """
        body = wire.VersionHead.build({"major": major, "minor": minor})
        if caps is not None:
            body += json.dumps({"capabilities": caps}).encode() + b"\0"
        reply = self.request(Command.VERSION, body)
        head = wire.VersionHead.parse(reply.payload[:4])
        raw = reply.payload[4:]
        top = json.loads(raw[:-1].decode()) if raw else {}
        self.server_caps = top.get("capabilities", {})
        return head.major, head.minor, self.server_caps

    def device_info(self) -> DeviceInfo:
        req = wire.DeviceInfoMsg.build({"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0})
        r = wire.DeviceInfoMsg.parse(self.request(Command.DEVICE_GET_INFO, req).payload[:16])
        return DeviceInfo(r.flags, r.num_regions, r.num_irqs)

    def region_info(self, index: int, argsz: int = 4096) -> RegionInfoReply:
        """GET_REGION_INFO; the caller owns (and must close) a returned fd."""
        req = wire.RegionInfoMsg.build(
            {"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0, "offset": 0}
        )
        reply = self.request(Command.DEVICE_GET_REGION_INFO, req)
        p = reply.payload
        r = wire.RegionInfoMsg.parse(p[:32])
        # The chain is only there when our argsz was big enough for it.
        caps = wire.parse_region_caps(p, r.cap_offset) if r.cap_offset and len(p) >= r.argsz else []
        fd = reply.fds[0] if reply.fds else None
        wire.close_fds(reply.fds[1:])
        return RegionInfoReply(r.argsz, r.flags, r.index, r.cap_offset, r.size, r.offset, caps, fd)

    def region_io_fds(self, index: int, argsz: int = 16) -> tuple[int, int]:
        """GET_REGION_IO_FDS: returns (argsz, count)."""
        req = wire.RegionIoFds.build({"argsz": argsz, "flags": 0, "index": index, "count": 0})
        reply = self.request(Command.DEVICE_GET_REGION_IO_FDS, req)
        wire.close_fds(reply.fds)
        r = wire.RegionIoFds.parse(reply.payload[:16])
        return r.argsz, r.count

    def irq_info(self, index: int) -> IrqInfo:
        req = wire.IrqInfoMsg.build({"argsz": 16, "flags": 0, "index": index, "count": 0})
        r = wire.IrqInfoMsg.parse(self.request(Command.DEVICE_GET_IRQ_INFO, req).payload[:16])
        return IrqInfo(r.index, r.flags, r.count)

    def set_irqs(
        self,
        index: int,
        flags: int,
        start: int,
        count: int,
        data: bytes = b"",
        fds: Sequence[int] = (),
    ) -> None:
        req = wire.SetIrqs.build(
            {
                "argsz": 20 + len(data),
                "flags": flags,
                "index": index,
                "start": start,
                "count": count,
            }
        )
        self.request(Command.DEVICE_SET_IRQS, req + data, fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        reply = self.request(Command.REGION_READ, REGION_ACCESS.pack(offset, index, count))
        return reply.payload[REGION_ACCESS.size :]

    def region_write(self, index: int, offset: int, data: bytes, *, no_reply: bool = False) -> None:
        payload = REGION_ACCESS.pack(offset, index, len(data)) + data
        if no_reply:
            self.send(Command.REGION_WRITE, payload, no_reply=True)
        else:
            self.request(Command.REGION_WRITE, payload)

    def region_write_multi(
        self, writes: Iterable[tuple[int, int, bytes]], *, no_reply: bool = False
    ) -> None:
        """REGION_WRITE_MULTI of (region, offset, data <= 8 bytes) entries."""
        entries = [
            wire.WRITE_MULTI_ENTRY.pack(offset, region, len(data), data)
            for region, offset, data in writes
        ]
        payload = wire.WRITE_MULTI_COUNT.pack(len(entries)) + b"".join(entries)
        if no_reply:
            self.send(Command.REGION_WRITE_MULTI, payload, no_reply=True)
        else:
            self.request(Command.REGION_WRITE_MULTI, payload)

    def dma_map(
        self, address: int, size: int, flags: int, fd: int | None = None, offset: int = 0
    ) -> None:
        req = wire.DmaMap.build(
            {"argsz": 32, "flags": flags, "offset": offset, "address": address, "size": size}
        )
        self.request(Command.DMA_MAP, req, [fd] if fd is not None else [])

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> None:
        req = wire.DmaUnmap.build({"argsz": 24, "flags": flags, "address": address, "size": size})
        self.request(Command.DMA_UNMAP, req)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    def device_feature(
        self, flags: int, data: bytes = b"", argsz: int | None = None
    ) -> tuple[int, int, bytes]:
        """DEVICE_FEATURE; returns the reply's (argsz, flags, data)."""
        if argsz is None:
            argsz = 8 + max(len(data), 4096)
        reply = self.request(
            Command.DEVICE_FEATURE,
            wire.DeviceFeature.build({"argsz": argsz, "flags": flags}) + data,
        )
        r = wire.DeviceFeature.parse(reply.payload[:8])
        return r.argsz, r.flags, reply.payload[8:]

    def mig_data_read(self, size: int) -> bytes:
        req = wire.MigData.build({"argsz": 8 + size, "size": size})
        p = self.request(Command.MIG_DATA_READ, req).payload
        r = wire.MigData.parse(p[:8])
        return p[8 : 8 + r.size]

    def mig_data_write(self, data: bytes) -> None:
        req = wire.MigData.build({"argsz": 8 + len(data), "size": len(data)})
        self.request(Command.MIG_DATA_WRITE, req + data)


def check(reply: RawMessage) -> RawMessage:
    """Raise VfioUserError for an error reply (closing any fds it carried)."""
    if reply.flags & FLAG_ERROR:
        wire.close_fds(reply.fds)
        try:
            what = Command(reply.command).name
        except ValueError:
            what = f"command {reply.command}"
        raise VfioUserError(reply.error, f"{what}: {os.strerror(reply.error)}")
    return reply
