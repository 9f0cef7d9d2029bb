"""The migration stream codec with plain byte strings (no sockets, no devices)."""

from __future__ import annotations

import errno
import struct
import zlib

import pytest

from mdevcore.migration import stream
from mdevcore.migration.stream import Decoder, FrameType, StreamError

PAGE = bytes(range(256)) * 16


def _whole() -> bytes:
    return (
        stream.header()
        + stream.meta({"memory_size": 8192, "memory_base": 0, "page_size": 4096})
        + b"".join(stream.device(b"dev" * 10))
        + stream.pages([0, 1], [PAGE, PAGE[::-1]])
        + b"".join(stream.workload("mtty", b"{}"))
        + stream.end(30, 2, 4)
    )


def test_round_trip_byte_by_byte() -> None:
    data = _whole()
    dec = Decoder()
    frames = [f for i in range(len(data)) for f in dec.feed(data[i : i + 1])]
    assert [f.type for f in frames] == [
        FrameType.META,
        FrameType.DEVICE,
        FrameType.PAGES,
        FrameType.WORKLOAD,
        FrameType.END,
    ]
    assert stream.parse_meta(frames[0].payload)["memory_size"] == 8192
    assert frames[1].payload == b"dev" * 10
    pages = stream.parse_pages(frames[2].payload)
    assert [(n, bytes(p)) for n, p in pages] == [(0, PAGE), (1, PAGE[::-1])]
    assert stream.parse_workload(frames[3].payload) == ("mtty", b"{}")
    assert stream.parse_end(frames[4].payload) == (30, 2, 4)
    assert dec.pending == 0


def _refused(data: bytes) -> int:
    with pytest.raises(StreamError) as e:
        Decoder().feed(data)
    return e.value.errno or 0


def test_bad_magic_and_unknown_version_are_refused() -> None:
    assert _refused(b"GARBAGE!" + bytes(4)) == errno.EPROTO
    assert _refused(b"xy") == errno.EPROTO  # wrong from the first byte
    assert _refused(stream.header(version=2)) == errno.EPROTONOSUPPORT


def test_unknown_type_reserved_bytes_and_oversize_are_refused_before_buffering() -> None:
    head = stream.header()
    assert _refused(head + struct.pack("<B3xII", 99, 4, 0)) == errno.EPROTO
    assert (
        _refused(head + struct.pack("<B3xII", 2, 4, 0)[:1] + b"\1\0\0" + bytes(8)) == errno.EPROTO
    )
    # A length past the bound is refused from the 12-byte frame head alone.
    assert _refused(head + struct.pack("<B3xII", 2, stream.MAX_FRAME + 1, 0)) == errno.EMSGSIZE
    assert _refused(head + struct.pack("<B3xII", 2, 0xFFFFFFFF, 0)) == errno.EMSGSIZE


def test_any_flipped_bit_fails_the_crc() -> None:
    data = bytearray(_whole())
    pos = len(stream.header()) + 12 + 3  # inside META's payload
    data[pos] ^= 0x10
    assert _refused(bytes(data)) == errno.EBADMSG
    body = b"x" * 10
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<B3xI", 2, 10)))
    good = stream.header() + struct.pack("<B3xII", 2, 10, crc) + body
    assert [f.payload for f in Decoder().feed(good)] == [body]
    bad_len = stream.header() + struct.pack("<B3xII", 2, 9, crc) + body[:9]
    assert _refused(bad_len) == errno.EBADMSG


def test_payload_parsers_check_their_sizes() -> None:
    with pytest.raises(StreamError):
        stream.parse_pages(struct.pack("<I", 1) + bytes(8) + bytes(100))
    with pytest.raises(StreamError):
        stream.parse_pages(struct.pack("<I", stream.MAX_PAGES_PER_FRAME + 1))
    with pytest.raises(StreamError):
        stream.parse_workload(b"\x10\x00ab")
    with pytest.raises(StreamError):
        stream.parse_end(bytes(5))
    with pytest.raises(StreamError):
        stream.parse_meta(b"[1, 2]")
    with pytest.raises(StreamError):
        stream.parse_meta(b"\xff")
    with pytest.raises(ValueError):
        stream.frame(FrameType.DEVICE, bytes(stream.MAX_FRAME + 1))


def test_a_large_workload_state_spans_frames() -> None:
    state = bytes(range(256)) * 9000  # > one frame
    frames = Decoder(expect_header=False).feed(b"".join(stream.workload("nvme", state)))
    assert len(frames) == 3 and all(f.type == FrameType.WORKLOAD for f in frames)
    parts = [stream.parse_workload(f.payload) for f in frames]
    assert {name for name, _ in parts} == {"nvme"}
    assert b"".join(p for _, p in parts) == state
