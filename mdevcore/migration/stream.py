"""The migration stream between a sender and a receiver, with no I/O.

Layout (little endian)::

    header  magic "MDEVMIG\\0" (8) | version u16 | reserved u16 (0)
    frame   type u8 | reserved u8[3] (0) | length u32 | crc32 u32 | payload

The crc32 covers the type, the length and the payload.  Frame types:

    META      JSON object: guest memory size/base, device flags, workload name
    DEVICE    a slice of the source device's migration data, in order
    PAGES     count u32 | count x page number u64 | count x 4096 bytes
    WORKLOAD  name length u16 | name | a slice of the workload's save()
              (a large state takes several frames, concatenated in order)
    END       device bytes u64 | pages u64 | frames u32 (all frames before END)
    STATUS    (receiver -> sender) errno i32 (0 = destination RUNNING) | text

Every length is bounded before anything is buffered; an unknown version or
type, a bad crc, bytes after END and a stream cut short are refused with
:class:`StreamError` carrying an errno.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

MAGIC = b"MDEVMIG\0"
VERSION = 1
PAGE_SIZE = 4096
MAX_PAGES_PER_FRAME = 256
MAX_DEVICE_CHUNK = 1 << 20
MAX_META = 64 << 10
MAX_WORKLOAD_STATE = 64 << 20
# The largest legal frame is a full PAGES frame.
MAX_FRAME = 4 + MAX_PAGES_PER_FRAME * (8 + PAGE_SIZE)

_HEAD = struct.Struct("<8sHH")
_FRAME = struct.Struct("<B3xII")
_END = struct.Struct("<QQI")
_STATUS = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


class FrameType(enum.IntEnum):
    META = 1
    DEVICE = 2
    PAGES = 3
    WORKLOAD = 4
    END = 5
    STATUS = 6


class StreamError(OSError):
    """The stream is malformed or cut short (errno says how)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


# --- writing -------------------------------------------------------------------


def header(version: int = VERSION) -> bytes:
    return _HEAD.pack(MAGIC, version, 0)


def frame(kind: int, payload: bytes | bytearray | memoryview) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes")
    head = struct.pack("<B3xI", kind, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return _FRAME.pack(kind, len(payload), crc) + bytes(payload)


def meta(info: dict[str, Any]) -> bytes:
    return frame(FrameType.META, json.dumps(info, sort_keys=True).encode())


def device(chunk: bytes | memoryview) -> Iterable[bytes]:
    view = memoryview(chunk)
    for pos in range(0, len(view), MAX_DEVICE_CHUNK):
        yield frame(FrameType.DEVICE, view[pos : pos + MAX_DEVICE_CHUNK])


def pages(numbers: Sequence[int], data: Sequence[bytes | memoryview]) -> bytes:
    if not 0 < len(numbers) <= MAX_PAGES_PER_FRAME or len(numbers) != len(data):
        raise ValueError("bad pages frame")
    body = bytearray(_U32.pack(len(numbers)))
    body += struct.pack(f"<{len(numbers)}Q", *numbers)
    for page in data:
        if len(page) != PAGE_SIZE:
            raise ValueError("a page is 4096 bytes")
        body += page
    return frame(FrameType.PAGES, body)


def workload(name: str, state: bytes) -> Iterable[bytes]:
    raw = name.encode()
    head = _U16.pack(len(raw)) + raw
    step = MAX_FRAME - len(head)
    view = memoryview(state)
    for pos in range(0, max(len(view), 1), step):
        yield frame(FrameType.WORKLOAD, head + view[pos : pos + step])


def end(device_bytes: int, page_count: int, frames: int) -> bytes:
    return frame(FrameType.END, _END.pack(device_bytes, page_count, frames))


def status(err: int, text: str = "") -> bytes:
    return frame(FrameType.STATUS, _STATUS.pack(err) + text.encode()[:4000])


# --- reading -------------------------------------------------------------------


class Decoder:
    """Bytes in, frames out; checks the header, every bound and every crc."""

    def __init__(self, *, expect_header: bool = True, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need_header = expect_header
        self.frames = 0

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        if self._need_header:
            if len(self._buf) < _HEAD.size:
                if not MAGIC.startswith(bytes(self._buf[:8])):
                    raise StreamError(errno.EPROTO, "not a migration stream (bad magic)")
                return out
            magic, version, reserved = _HEAD.unpack_from(self._buf)
            if magic != MAGIC:
                raise StreamError(errno.EPROTO, "not a migration stream (bad magic)")
            if version != VERSION or reserved:
                raise StreamError(errno.EPROTONOSUPPORT, f"stream version {version} unknown")
            del self._buf[: _HEAD.size]
            self._need_header = False
        while len(self._buf) >= _FRAME.size:
            kind, length, crc = _FRAME.unpack_from(self._buf)
            if self._buf[1:4] != b"\0\0\0":
                raise StreamError(errno.EPROTO, "frame reserved bytes set")
            if kind not in FrameType._value2member_map_:
                raise StreamError(errno.EPROTO, f"unknown frame type {kind}")
            if length > self.max_frame:
                raise StreamError(errno.EMSGSIZE, f"frame of {length} bytes (max {self.max_frame})")
            if len(self._buf) < _FRAME.size + length:
                break
            payload = bytes(self._buf[_FRAME.size : _FRAME.size + length])
            head = struct.pack("<B3xI", kind, length)
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                raise StreamError(errno.EBADMSG, f"frame {self.frames}: crc mismatch")
            del self._buf[: _FRAME.size + length]
            self.frames += 1
            out.append(Frame(FrameType(kind), payload))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def parse_meta(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_META:
        raise StreamError(errno.EMSGSIZE, "META frame too large")
    try:
        info = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError):
        raise StreamError(errno.EBADMSG, "META is not JSON") from None
    if not isinstance(info, dict):
        raise StreamError(errno.EBADMSG, "META is not an object")
    return info


def parse_pages(payload: bytes) -> list[tuple[int, memoryview]]:
    if len(payload) < 4:
        raise StreamError(errno.EBADMSG, "short PAGES frame")
    (count,) = _U32.unpack_from(payload)
    if not 0 < count <= MAX_PAGES_PER_FRAME or len(payload) != 4 + count * (8 + PAGE_SIZE):
        raise StreamError(errno.EBADMSG, f"PAGES frame with {count} pages and {len(payload)} bytes")
    numbers = struct.unpack_from(f"<{count}Q", payload, 4)
    view = memoryview(payload)
    base = 4 + 8 * count
    return [
        (n, view[base + i * PAGE_SIZE : base + (i + 1) * PAGE_SIZE]) for i, n in enumerate(numbers)
    ]


def parse_workload(payload: bytes) -> tuple[str, bytes]:
    if len(payload) < 2:
        raise StreamError(errno.EBADMSG, "short WORKLOAD frame")
    (n,) = _U16.unpack_from(payload)
    if len(payload) < 2 + n or not n:
        raise StreamError(errno.EBADMSG, "WORKLOAD name cut short")
    try:
        name = payload[2 : 2 + n].decode()
    except UnicodeDecodeError:
        raise StreamError(errno.EBADMSG, "WORKLOAD name is not UTF-8") from None
    return name, payload[2 + n :]


def parse_end(payload: bytes) -> tuple[int, int, int]:
    if len(payload) != _END.size:
        raise StreamError(errno.EBADMSG, "bad END frame")
    device_bytes, page_count, frames = _END.unpack(payload)
    return device_bytes, page_count, frames


def parse_status(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        raise StreamError(errno.EBADMSG, "short STATUS frame")
    (err,) = _STATUS.unpack_from(payload)
    return err, payload[4:].decode(errors="replace")
