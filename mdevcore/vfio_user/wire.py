"""vfio-user wire format: message layouts and stream framing.

Hot-path layouts (header, REGION_READ/WRITE, DMA_READ/WRITE) are plain
``struct.Struct``: construct costs ~2.4 us per parse even compiled, a quarter
of the socket round trip here.  Control messages, which are rare, are
declared with construct (compiled) so their layout reads like the spec.

Everything is little endian: vfio-user says host endian and this project
only runs on x86-64.
"""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from construct import Int16ul, Int32ul, Int64ul, Struct

from mdevcore.vfio_user.backend import REGION_FLAG_CAPS, RegionInfo
from mdevcore.vfio_user.constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_CAP_TYPE,
)

# --- hot path: struct ------------------------------------------------------

HEADER = struct.Struct("<HHIII")  # msg_id, command, msg_size, flags, error
REGION_ACCESS = struct.Struct("<QII")  # offset, region, count
DMA_ACCESS = struct.Struct("<QQ")  # address, count
WRITE_MULTI_COUNT = struct.Struct("<Q")
WRITE_MULTI_ENTRY = struct.Struct("<QII8s")  # offset, region, count, data[8]

# --- control messages: construct -------------------------------------------


def _compiled(s: Struct) -> Any:
    return s.compile()


VersionHead = _compiled(Struct("major" / Int16ul, "minor" / Int16ul))

DmaMap = _compiled(
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul,
        "offset" / Int64ul,
        "address" / Int64ul,
        "size" / Int64ul,
    )
)

DmaUnmap = _compiled(
    Struct("argsz" / Int32ul, "flags" / Int32ul, "address" / Int64ul, "size" / Int64ul)
)

DeviceInfoMsg = _compiled(
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul,
        "num_regions" / Int32ul,
        "num_irqs" / Int32ul,
    )
)

RegionInfoMsg = _compiled(
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul,
        "index" / Int32ul,
        "cap_offset" / Int32ul,
        "size" / Int64ul,
        "offset" / Int64ul,
    )
)

RegionIoFds = _compiled(
    Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "count" / Int32ul)
)

IrqInfoMsg = _compiled(
    Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "count" / Int32ul)
)

SetIrqs = _compiled(
    Struct(
        "argsz" / Int32ul,
        "flags" / Int32ul,
        "index" / Int32ul,
        "start" / Int32ul,
        "count" / Int32ul,
    )
)

DeviceFeature = _compiled(Struct("argsz" / Int32ul, "flags" / Int32ul))

MigData = _compiled(Struct("argsz" / Int32ul, "size" / Int32ul))

CapHeader = _compiled(Struct("id" / Int16ul, "version" / Int16ul, "next" / Int32ul))
SparseMmapHead = _compiled(Struct("nr_areas" / Int32ul, "reserved" / Int32ul))
SparseArea = _compiled(Struct("offset" / Int64ul, "size" / Int64ul))
TypeCap = _compiled(Struct("type" / Int32ul, "subtype" / Int32ul))

# Fixed sizes, used for length checks before parsing.
VERSION_HEAD_SIZE = 4
DMA_MAP_SIZE = 32
DMA_UNMAP_SIZE = 24
DEVICE_INFO_SIZE = 16
REGION_INFO_SIZE = 32
REGION_IO_FDS_SIZE = 16
IRQ_INFO_SIZE = 16
SET_IRQS_SIZE = 20
DEVICE_FEATURE_SIZE = 8
MIG_DATA_SIZE = 8
CAP_HEADER_SIZE = 8

# Every construct layout with its fixed size, for tests and the fuzzer.
CONTROL_LAYOUTS: dict[str, tuple[Any, int]] = {
    "version": (VersionHead, VERSION_HEAD_SIZE),
    "dma_map": (DmaMap, DMA_MAP_SIZE),
    "dma_unmap": (DmaUnmap, DMA_UNMAP_SIZE),
    "device_info": (DeviceInfoMsg, DEVICE_INFO_SIZE),
    "region_info": (RegionInfoMsg, REGION_INFO_SIZE),
    "region_io_fds": (RegionIoFds, REGION_IO_FDS_SIZE),
    "irq_info": (IrqInfoMsg, IRQ_INFO_SIZE),
    "set_irqs": (SetIrqs, SET_IRQS_SIZE),
    "device_feature": (DeviceFeature, DEVICE_FEATURE_SIZE),
    "mig_data": (MigData, MIG_DATA_SIZE),
    "cap_header": (CapHeader, CAP_HEADER_SIZE),
    "sparse_head": (SparseMmapHead, 8),
    "sparse_area": (SparseArea, 16),
    "type_cap": (TypeCap, 8),
}


def header(msg_id: int, command: int, size: int, flags: int = 0, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size, flags, error)


def reply_header(msg_id: int, command: int, payload_len: int) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + payload_len, FLAG_REPLY, 0)


def error_reply(msg_id: int, command: int, errno_value: int) -> bytes:
    """An error reply is the header alone with the Error bit and the errno."""
    return HEADER.pack(msg_id, command, HEADER_SIZE, FLAG_REPLY | FLAG_ERROR, errno_value)


def region_info_caps(info: RegionInfo) -> bytes:
    """The capability chain that follows the 32-byte region info, or b"".

    ``next`` offsets count from the start of the region info (its argsz
    field), as in VFIO.
    """
    parts: list[tuple[int, bytes]] = []
    if info.sparse_areas:
        body = SparseMmapHead.build({"nr_areas": len(info.sparse_areas), "reserved": 0})
        body += b"".join(
            SparseArea.build({"offset": a.offset, "size": a.size}) for a in info.sparse_areas
        )
        parts.append((REGION_INFO_CAP_SPARSE_MMAP, body))
    if info.type_cap is not None:
        parts.append(
            (
                REGION_INFO_CAP_TYPE,
                TypeCap.build({"type": info.type_cap[0], "subtype": info.type_cap[1]}),
            )
        )
    out = bytearray()
    pos = REGION_INFO_SIZE
    for i, (cap_id, body) in enumerate(parts):
        size = CAP_HEADER_SIZE + len(body)
        nxt = pos + size if i + 1 < len(parts) else 0
        out += CapHeader.build({"id": cap_id, "version": 1, "next": nxt}) + body
        pos += size
    return bytes(out)


def region_info_reply(info: RegionInfo, argsz: int) -> tuple[bytes, bool]:
    """Payload of a GET_REGION_INFO reply and whether it is complete.

    When the client's ``argsz`` cannot hold the capabilities, the reply says
    how much it needs (argsz) and carries the fixed part only, like VFIO; a
    client must compare argsz with what it got before walking the chain.
    """
    caps = region_info_caps(info)
    needed = REGION_INFO_SIZE + len(caps)
    flags = info.flags | (REGION_FLAG_CAPS if caps else 0)
    complete = argsz >= needed
    fixed = RegionInfoMsg.build(
        {
            "argsz": needed,
            "flags": flags,
            "index": info.index,
            # Where the chain starts even when it is left out: QEMU rejects
            # CAPS with cap_offset < 32 before it looks at argsz and retries
            # (libvfio-user answers the same way).
            "cap_offset": REGION_INFO_SIZE if caps else 0,
            "size": info.size,
            "offset": info.fd_offset if info.fd is not None else 0,
        }
    )
    return (fixed + caps if complete else fixed), complete


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedCap:
    id: int
    version: int
    body: bytes


def parse_region_caps(payload: bytes, cap_offset: int) -> list[ParsedCap]:
    """Walk a capability chain in a region info payload (client side)."""
    caps: list[ParsedCap] = []
    seen: set[int] = set()
    pos = cap_offset
    while pos:
        if pos in seen or pos + CAP_HEADER_SIZE > len(payload):
            raise ValueError(f"bad capability chain at {pos}")
        seen.add(pos)
        hdr = CapHeader.parse(payload[pos : pos + CAP_HEADER_SIZE])
        end = hdr.next if hdr.next else len(payload)
        caps.append(ParsedCap(hdr.id, hdr.version, payload[pos + CAP_HEADER_SIZE : end]))
        pos = hdr.next
    return caps


# --- framing ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RawMessage:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]

    @property
    def is_reply(self) -> bool:
        return self.flags & 0xF == FLAG_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)


class FramingError(Exception):
    """The byte stream cannot be split into messages: the connection is over."""


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The SCM_RIGHTS fds of a recvmsg's ancillary data (a partial int is dropped)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Framer:
    """Splits a SOCK_STREAM byte stream (plus SCM_RIGHTS fds) into messages.

    On a UNIX stream socket the kernel attaches passed fds to the first byte
    of the sendmsg() that carried them and ends a recvmsg() right after the
    skb holding them.  So the fds of one recvmsg belong to the *last* message
    that starts inside the bytes it returned; ``feed`` records them against
    that message's stream offset.  Fds with no message start in their chunk
    are closed (a peer splitting one message over several sendmsg calls with
    fds on a later one is broken).
    """

    def __init__(self, max_msg_size: int) -> None:
        self.max_msg_size = max_msg_size
        self._buf = bytearray()
        self._pos = 0  # consumed bytes in _buf
        self._base = 0  # stream offset of _buf[0]
        self._known_start = 0  # a message start found by walking headers
        self._fds: dict[int, list[int]] = {}
        self.stray_fds = 0

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        chunk_begin = self._base + len(self._buf)
        if self._pos and self._pos == len(self._buf):
            self._base += self._pos
            self._buf.clear()
            self._pos = 0
        self._buf += data
        if fds:
            self._attach(chunk_begin, list(fds))

    def _attach(self, chunk_begin: int, fds: list[int]) -> None:
        end = self._base + len(self._buf)
        p = max(self._known_start, self._base + self._pos)
        last = None
        while p < end:
            rel = p - self._base
            if p >= chunk_begin:
                last = p
            if rel + 8 > len(self._buf):
                break
            size = int.from_bytes(self._buf[rel + 4 : rel + 8], "little")
            if size < HEADER_SIZE:
                break
            p += size
        self._known_start = p
        if last is None:
            self.stray_fds += len(fds)
            close_fds(fds)
        else:
            self._fds.setdefault(last, []).extend(fds)

    def next_message(self) -> RawMessage | None:
        """The next whole message, or None until more bytes arrive.

        Raises FramingError for a msg_size below 16 or above the maximum.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(buf, pos)
        if size < HEADER_SIZE or size > self.max_msg_size:
            raise FramingError(f"impossible msg_size {size} (msg {msg_id:#x} cmd {command})")
        if avail < size:
            return None
        payload = bytes(buf[pos + HEADER_SIZE : pos + size])
        fds = self._fds.pop(self._base + pos, []) if self._fds else []
        self._advance(pos + size)
        return RawMessage(msg_id, command, flags, error, payload, fds)

    def _advance(self, pos: int) -> None:
        """Move past consumed bytes, dropping them from the buffer.

        Compacts once 64 KiB are consumed even when a partial message stays
        behind: a client that always leaves one unfinished would otherwise
        grow the buffer without bound.
        """
        buf = self._buf
        if pos == len(buf):
            self._base += pos
            buf.clear()
            pos = 0
        elif pos > 65536:
            del buf[:pos]
            self._base += pos
            pos = 0
        self._pos = pos

    # Hot path (engine): look at the next header without building a message.

    def peek(self) -> tuple[bytearray, int, int]:
        """(buffer, position of the next message, bytes available there)."""
        return self._buf, self._pos, len(self._buf) - self._pos

    @property
    def holds_fds(self) -> bool:
        return bool(self._fds)

    def consume(self, size: int) -> None:
        """Drop a whole message of ``size`` bytes at the front (peeked, no fds)."""
        self._advance(self._pos + size)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def close(self) -> None:
        """Close every fd still waiting for its message."""
        for fds in self._fds.values():
            close_fds(fds)
        self._fds.clear()
