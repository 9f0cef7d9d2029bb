"""The sans-IO engine and the wire layouts, with byte strings only."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vfio_user_fakedev import FakeDevice
from vfio_user_served import open_fds

from mdevcore.vfio_user import wire
from mdevcore.vfio_user.backend import REGION_FLAG_CAPS, RegionInfo, SparseArea
from mdevcore.vfio_user.client import RegionInfoReply
from mdevcore.vfio_user.constants import FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY, Command
from mdevcore.vfio_user.engine import Connection, DmaResult
from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS, Framer

# Properties, not timings: a loaded machine must not fail them.
NO_DEADLINE = settings(deadline=None)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def version_msg(msg_id: int = 1) -> bytes:
    body = struct.pack("<HH", 0, 0) + json.dumps({"capabilities": {}}).encode() + b"\0"
    return HEADER.pack(msg_id, Command.VERSION, 16 + len(body), 0, 0) + body


def request(msg_id: int, command: int, body: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, 16 + len(body), flags, 0) + body


def replies(conn: Connection) -> list[wire.RawMessage]:
    framer = Framer(1 << 30)
    for bufs, fds in conn.outgoing():
        framer.feed(b"".join(bufs), fds)
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    dev = FakeDevice()
    yield dev
    dev.close()


def negotiated(device: FakeDevice) -> Connection:
    conn = Connection(device, name="t")
    conn.receive_data(version_msg())
    conn.process()
    assert conn.negotiated
    conn.outgoing()
    return conn


# --- layouts ---------------------------------------------------------------


@NO_DEADLINE
@given(u16, u16, u32, u32, u32)
def test_header_round_trip(msg_id: int, cmd: int, size: int, flags: int, err: int) -> None:
    raw = wire.header(msg_id, cmd, size, flags, err)
    assert len(raw) == 16 and HEADER.unpack(raw) == (msg_id, cmd, size, flags, err)


@NO_DEADLINE
@given(u64, u32, u32, u64, u64)
def test_hot_path_layouts_round_trip(off: int, region: int, count: int, a: int, n: int) -> None:
    assert REGION_ACCESS.unpack(REGION_ACCESS.pack(off, region, count)) == (off, region, count)
    assert wire.DMA_ACCESS.unpack(wire.DMA_ACCESS.pack(a, n)) == (a, n)
    entry = wire.WRITE_MULTI_ENTRY.pack(off, region, count, b"12345678")
    assert len(entry) == 24
    assert wire.WRITE_MULTI_ENTRY.unpack(entry) == (off, region, count, b"12345678")


def _field_strategy(layout: object) -> st.SearchStrategy[dict[str, int]]:
    subcons = layout.defersubcon.subcons  # type: ignore[attr-defined]
    fields = {}
    for sc in subcons:
        fields[sc.name] = st.integers(0, (1 << (8 * sc.subcon.sizeof())) - 1)
    return st.fixed_dictionaries(fields)


@pytest.mark.parametrize("name", sorted(wire.CONTROL_LAYOUTS))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_control_layouts_round_trip(name: str, data: st.DataObject) -> None:
    layout, size = wire.CONTROL_LAYOUTS[name]
    values = data.draw(_field_strategy(layout))
    raw = layout.build(values)
    assert len(raw) == size
    parsed = layout.parse(raw)
    assert {k: parsed[k] for k in values} == values
    # And the layout is the little-endian packing of the fields in order.
    fmt = "<" + "".join(
        {1: "B", 2: "H", 4: "I", 8: "Q"}[sc.subcon.sizeof()] for sc in layout.defersubcon.subcons
    )
    assert raw == struct.pack(fmt, *(values[sc.name] for sc in layout.defersubcon.subcons))


areas = st.lists(st.builds(SparseArea, u32, u32), max_size=6).map(tuple)


@NO_DEADLINE
@given(
    st.integers(0, 20),
    st.integers(0, 15),
    u64,
    areas,
    st.none() | st.tuples(u32, u32),
    st.integers(0, 200),
)
def test_region_info_caps_round_trip(
    index: int,
    flags: int,
    size: int,
    sparse: tuple[SparseArea, ...],
    type_cap: tuple[int, int] | None,
    argsz: int,
) -> None:
    info = RegionInfo(index, flags & ~REGION_FLAG_CAPS, size, None, 0, sparse, type_cap)
    payload, complete = wire.region_info_reply(info, argsz)
    head = wire.RegionInfoMsg.parse(payload[:32])
    has_caps = bool(sparse) or type_cap is not None
    assert head.argsz == 32 + len(wire.region_info_caps(info))
    assert complete == (argsz >= head.argsz)
    assert bool(head.flags & REGION_FLAG_CAPS) == has_caps
    # QEMU's rule: CAPS means cap_offset in [32, argsz].
    assert head.cap_offset == (32 if has_caps else 0)
    if not complete:
        assert len(payload) == 32
        return
    caps = wire.parse_region_caps(payload, head.cap_offset) if head.cap_offset else []
    decoded = RegionInfoReply(
        head.argsz, head.flags, head.index, head.cap_offset, head.size, head.offset, caps, None
    ).as_region_info()
    assert decoded.sparse_areas == sparse and decoded.type_cap == type_cap
    assert decoded.size == size and decoded.index == index


# --- framing ---------------------------------------------------------------


def test_framer_gives_fds_to_the_last_message_starting_in_the_chunk() -> None:
    fa, fb = os.eventfd(0), os.eventfd(0)
    framer = Framer(4096)
    m1 = request(1, Command.DEVICE_RESET)
    m2 = request(2, Command.DMA_MAP, bytes(32))
    framer.feed(m1 + m2[:10], [fa])  # fds come with the start of m2
    framer.feed(m2[10:], [fb])  # no message starts here: stray, closed
    first, second = framer.next_message(), framer.next_message()
    assert first is not None and second is not None
    assert first.fds == [] and second.fds == [fa]
    assert framer.stray_fds == 1
    with pytest.raises(OSError):
        os.fstat(fb)
    os.close(fa)


@NO_DEADLINE
@given(st.lists(st.integers(1, 50), min_size=1, max_size=20), st.data())
def test_framer_any_chunking_gives_the_same_messages(sizes: list[int], data: st.DataObject) -> None:
    msgs = [request(i, Command.REGION_WRITE, bytes([i]) * n) for i, n in enumerate(sizes)]
    stream = b"".join(msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    framer = Framer(4096)
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        framer.feed(stream[prev:cut])
        prev = cut
        while (m := framer.next_message()) is not None:
            out.append(m)
    assert [(m.msg_id, m.payload) for m in out] == [
        (i, bytes([i]) * n) for i, n in enumerate(sizes)
    ]


# --- engine ------------------------------------------------------------------


def test_byte_at_a_time_equals_all_at_once(device: FakeDevice) -> None:
    stream = version_msg() + b"".join(
        request(10 + i, Command.REGION_READ, REGION_ACCESS.pack(4 * i, 0, 4)) for i in range(20)
    )
    whole = Connection(device, name="whole")
    whole.receive_data(stream)
    whole.process()
    expected = b"".join(b"".join(b) for b, _ in whole.outgoing())
    drip = Connection(device, name="drip")
    got = b""
    for i in range(len(stream)):
        drip.receive_data(stream[i : i + 1])
        drip.process()
        got += b"".join(b"".join(b) for b, _ in drip.outgoing())
    assert got == expected and len(replies_of(expected)) == 21


def replies_of(raw: bytes) -> list[wire.RawMessage]:
    framer = Framer(1 << 30)
    framer.feed(raw)
    out = []
    while (m := framer.next_message()) is not None:
        out.append(m)
    return out


def test_replies_are_batched_but_fd_messages_start_a_segment(device: FakeDevice) -> None:
    conn = negotiated(device)
    region_info = wire.RegionInfoMsg.build(
        {"argsz": 4096, "flags": 0, "index": 1, "cap_offset": 0, "size": 0, "offset": 0}
    )
    conn.receive_data(
        request(1, Command.DEVICE_RESET)
        + request(2, Command.DEVICE_RESET)
        + request(3, Command.DEVICE_GET_REGION_INFO, region_info)
        + request(4, Command.DEVICE_RESET)
    )
    conn.process()
    segments = conn.outgoing()
    assert [(len(b), fds) for b, fds in segments] == [(2, []), (2, [device.bar1_fd])]


def test_posted_and_error_replies(device: FakeDevice) -> None:
    conn = negotiated(device)
    conn.receive_data(
        request(1, Command.REGION_WRITE, REGION_ACCESS.pack(0, 0, 1) + b"x", FLAG_NO_REPLY)
        + request(2, Command.REGION_WRITE, REGION_ACCESS.pack(1 << 40, 0, 1) + b"x", FLAG_NO_REPLY)
        + request(3, Command.REGION_READ, REGION_ACCESS.pack(1 << 40, 0, 1))
        + request(4, 200)
    )
    conn.process()
    out = replies(conn)
    assert [(m.msg_id, m.flags, m.error, m.payload) for m in out] == [
        (3, FLAG_REPLY | FLAG_ERROR, errno.EINVAL, b""),
        (4, FLAG_REPLY | FLAG_ERROR, errno.EINVAL, b""),
    ]
    assert device.bar0[0:1] == b"x"


def test_impossible_size_closes_and_releases_fds(device: FakeDevice) -> None:
    before = open_fds()
    conn = negotiated(device)
    fd = os.eventfd(0)
    conn.receive_data(
        request(1, Command.DEVICE_RESET) + HEADER.pack(2, 4, 8, 0, 0) + bytes(40), [fd]
    )
    conn.process()
    assert conn.closed and "msg_size 8" in conn.close_reason
    assert [m.msg_id for m in replies(conn)] == [1]
    conn.receive_data(request(3, Command.DEVICE_RESET), [os.eventfd(0)])  # after close: dropped
    assert conn.process() == [] and not conn.has_output
    assert open_fds() == before


def test_server_dma_request_and_reply_matching(device: FakeDevice) -> None:
    conn = Connection(device, name="t")
    with pytest.raises(OSError) as info:
        conn.dma_read_request(0, 4)
    assert info.value.errno == errno.ENOTCONN
    conn.receive_data(version_msg())
    conn.process()
    conn.outgoing()
    rid = conn.dma_read_request(0x1000, 4)
    wid = conn.dma_write_request(0x2000, b"abcd")
    bad = conn.dma_read_request(0x3000, 4)
    err = conn.dma_read_request(0x4000, 4)
    sent = replies_of(b"".join(b"".join(b) for b, _ in conn.outgoing()))
    assert [(m.command, m.flags) for m in sent] == [
        (Command.DMA_READ, 0),
        (Command.DMA_WRITE, 0),
        (Command.DMA_READ, 0),
        (Command.DMA_READ, 0),
    ]
    assert sent[1].payload == wire.DMA_ACCESS.pack(0x2000, 4) + b"abcd"
    acc = wire.DMA_ACCESS.pack
    conn.receive_data(
        HEADER.pack(wid, Command.DMA_WRITE, 32, FLAG_REPLY, 0)
        + acc(0x2000, 4)
        + HEADER.pack(rid, Command.DMA_READ, 36, FLAG_REPLY, 0)
        + acc(0x1000, 4)
        + b"wxyz"
        + HEADER.pack(bad, Command.DMA_READ, 34, FLAG_REPLY, 0)
        + acc(0x3000, 4)
        + b"sh"
        + HEADER.pack(err, Command.DMA_READ, 16, FLAG_REPLY | FLAG_ERROR, errno.EFAULT)
        + HEADER.pack(999, Command.DMA_READ, 16, FLAG_REPLY, 0)  # unsolicited
    )
    assert conn.process() == [
        DmaResult(wid, 0),
        DmaResult(rid, 0, b"wxyz"),
        DmaResult(bad, errno.EIO),
        DmaResult(err, errno.EFAULT),
    ]
    assert not conn.has_output  # replies are never answered
    with pytest.raises(OSError) as info:
        conn.dma_read_request(0, (1 << 20) + 1)
    assert info.value.errno == errno.E2BIG
    pending = conn.dma_read_request(0, 1)
    assert conn.fail_pending_dma() == [DmaResult(pending, errno.ENOTCONN)]


def test_fast_path_buffer_stays_bounded_with_a_partial_message_always_pending(
    device: FakeDevice,
) -> None:
    # A client that never lets a chunk end on a message boundary must not
    # grow the receive buffer: consumed bytes are dropped as it goes.
    conn = negotiated(device)
    msg = request(7, Command.REGION_READ, REGION_ACCESS.pack(0, 0, 4), FLAG_NO_REPLY)
    conn.receive_data(msg[:16])
    for _ in range(5000):
        conn.receive_data(msg[16:] + msg[:16])
        conn.process()
    buf, _, avail = conn.framer.peek()
    assert avail == 16 and len(buf) <= 65536 + 2 * len(msg)
    assert not conn.has_output and not conn.closed


def test_dma_requests_beyond_the_msg_id_space_fail_ebusy(device: FakeDevice) -> None:
    conn = negotiated(device)
    ids = {conn.dma_write_request(0x1000, b"") for _ in range(0x10000)}
    assert len(ids) == 0x10000
    with pytest.raises(OSError) as info:
        conn.dma_write_request(0x1000, b"")
    assert info.value.errno == errno.EBUSY
    conn.fail_pending_dma()
    assert conn.dma_write_request(0x1000, b"") in ids


def test_mig_data_write_reply_has_no_payload(device: FakeDevice) -> None:
    conn = negotiated(device)
    body = wire.MigData.build({"argsz": 8 + 5, "size": 5}) + b"state"
    conn.receive_data(request(7, Command.MIG_DATA_WRITE, body))
    conn.process()
    (reply,) = replies(conn)
    assert reply.flags & FLAG_ERROR == 0 and reply.payload == b""
