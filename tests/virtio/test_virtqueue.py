"""The split virtqueue against a real DmaTable over memfd guest RAM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from virtio_guest import PAGE, DriverQueue, GuestRam

from mdevcore.pci.dma import DirtyLog, DmaTable
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DmaMapping
from mdevcore.virtio import spec
from mdevcore.virtio.chain import VirtqError, gather, scatter
from mdevcore.virtio.virtqueue import QueueState, SplitQueue

SIZE = 16
ALL_RING = spec.bit(spec.F_INDIRECT_DESC) | spec.bit(spec.F_EVENT_IDX)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam()
    yield r
    r.close()


@pytest.fixture
def table(ram: GuestRam) -> Iterator[DmaTable]:
    t = ram.dma_table()
    yield t
    t.clear()


def make_queue(
    ram: GuestRam, table: DmaTable, features: int = ALL_RING
) -> tuple[SplitQueue, DriverQueue]:
    drv = DriverQueue(ram, SIZE)
    q = SplitQueue(table, 0, SIZE)
    q.desc, q.driver, q.device = drv.desc, drv.avail, drv.used
    q.enable(features)
    return q, drv


def test_direct_chain_gather_scatter_and_used_ring(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    out, inp = ram.alloc(100), ram.alloc(64)
    ram.write(out, b"x" * 40 + b"y" * 60)
    head = drv.add([(out, 40, False), (out + 40, 60, False), (inp, 64, True)])
    assert q.pending() == 1
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert (chain.readable_len, chain.writable_len) == (100, 64)
    assert gather(table, chain, limit=100) == b"x" * 40 + b"y" * 60
    assert scatter(table, chain, b"r" * 70) == 64  # bounded by the writable space
    assert ram.read(inp, 64) == b"r" * 64
    q.push([(chain.head, 64)])
    assert drv.reap() == [(head, 64)]
    assert q.pop() is None


def test_scatter_skips_into_later_buffers(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    a, b = ram.alloc(8), ram.alloc(8)
    drv.add([(a, 8, True), (b, 8, True)])
    chain = q.pop()
    assert chain is not None
    assert scatter(table, chain, b"123456", skip=5) == 6
    assert ram.read(a, 8) == bytes(5) + b"123" and ram.read(b, 8) == b"456" + bytes(5)


def test_indirect_chain(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    out, inp = ram.alloc(16), ram.alloc(16)
    ram.write(out, b"indirect-payload")
    head = drv.add_indirect([(out, 16, False), (inp, 16, True)])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert gather(table, chain, 16) == b"indirect-payload"
    assert chain.writable == [(inp, 16)]


def test_device_writes_are_dirty_logged(ram: GuestRam, table: DmaTable) -> None:
    table.dirty = DirtyLog(PAGE, [])
    q, drv = make_queue(ram, table)
    buf = ram.alloc(PAGE, PAGE)
    drv.add([(buf, PAGE, True)])
    chain = q.pop()
    assert chain is not None
    scatter(table, chain, b"z" * 10)
    q.push([(chain.head, 10)])
    pages = table.dirty.pages
    assert buf // PAGE in pages  # the buffer
    assert drv.used // PAGE in pages  # used element, used idx, avail_event
    assert drv.desc // PAGE not in pages  # the device only read the descriptors


def _loop(drv: DriverQueue, ram: GuestRam) -> None:
    buf = ram.alloc(8)
    drv.set_desc(0, buf, 8, spec.DESC_F_NEXT, 1)
    drv.set_desc(1, buf, 8, spec.DESC_F_NEXT, 0)
    drv.publish(0)


def _next_out_of_range(drv: DriverQueue, ram: GuestRam) -> None:
    drv.set_desc(0, ram.alloc(8), 8, spec.DESC_F_NEXT, SIZE)
    drv.publish(0)


def _head_out_of_range(drv: DriverQueue, ram: GuestRam) -> None:
    drv.publish(SIZE + 3)


def _nested_indirect(drv: DriverQueue, ram: GuestRam) -> None:
    inner = ram.alloc(16)
    outer = ram.alloc(16)
    ram.write(outer, spec.DESC.pack(inner, 16, spec.DESC_F_INDIRECT, 0))
    drv.set_desc(0, outer, 16, spec.DESC_F_INDIRECT)
    drv.publish(0)


def _indirect_with_next(drv: DriverQueue, ram: GuestRam) -> None:
    t = ram.alloc(16)
    ram.write(t, spec.DESC.pack(ram.alloc(8), 8, 0, 0))
    drv.set_desc(0, t, 16, spec.DESC_F_INDIRECT | spec.DESC_F_NEXT, 1)
    drv.publish(0)


def _indirect_bad_length(drv: DriverQueue, ram: GuestRam) -> None:
    drv.set_desc(0, ram.alloc(32), 20, spec.DESC_F_INDIRECT)
    drv.publish(0)


def _indirect_loop(drv: DriverQueue, ram: GuestRam) -> None:
    t = ram.alloc(32)
    buf = ram.alloc(8)
    ram.write(t, spec.DESC.pack(buf, 8, spec.DESC_F_NEXT, 1))
    ram.write(t + 16, spec.DESC.pack(buf, 8, spec.DESC_F_NEXT, 0))
    drv.set_desc(0, t, 32, spec.DESC_F_INDIRECT)
    drv.publish(0)


def _indirect_longer_than_queue(drv: DriverQueue, ram: GuestRam) -> None:
    entries = SIZE + 1
    t = ram.alloc(entries * spec.DESC_SIZE)
    buf = ram.alloc(8)
    for i in range(entries):
        flags = spec.DESC_F_NEXT if i < entries - 1 else 0
        ram.write(t + i * spec.DESC_SIZE, spec.DESC.pack(buf, 8, flags, i + 1))
    drv.set_desc(0, t, entries * spec.DESC_SIZE, spec.DESC_F_INDIRECT)
    drv.publish(0)


def _indirect_table_unmapped(drv: DriverQueue, ram: GuestRam) -> None:
    drv.set_desc(0, ram.base + ram.size, 16, spec.DESC_F_INDIRECT)
    drv.publish(0)


def _readable_after_writable(drv: DriverQueue, ram: GuestRam) -> None:
    drv.add([(ram.alloc(8), 8, True), (ram.alloc(8), 8, False)])


def _avail_jump(drv: DriverQueue, ram: GuestRam) -> None:
    drv.set_avail_idx(SIZE + 1)


def _avail_backwards(drv: DriverQueue, ram: GuestRam) -> None:
    drv.set_avail_idx(0xFFFF)  # 65535 chains "ahead" of 0


BAD_CHAINS: dict[str, Callable[[DriverQueue, GuestRam], None]] = {
    "loop": _loop,
    "next-out-of-range": _next_out_of_range,
    "head-out-of-range": _head_out_of_range,
    "nested-indirect": _nested_indirect,
    "indirect-with-next": _indirect_with_next,
    "indirect-bad-length": _indirect_bad_length,
    "indirect-loop": _indirect_loop,
    "indirect-table-unmapped": _indirect_table_unmapped,
    "indirect-longer-than-queue": _indirect_longer_than_queue,
    "readable-after-writable": _readable_after_writable,
    "avail-idx-jump": _avail_jump,
    "avail-idx-backwards": _avail_backwards,
}


@pytest.mark.parametrize("name", sorted(BAD_CHAINS))
def test_bad_chain_breaks_the_queue_until_reset(ram: GuestRam, table: DmaTable, name: str) -> None:
    q, drv = make_queue(ram, table)
    before = ram.read(ram.base, ram.size)
    BAD_CHAINS[name](drv, ram)
    written = ram.read(ram.base, ram.size)
    with pytest.raises(VirtqError):
        q.pop()
    assert q.broken is not None
    assert ram.read(ram.base, ram.size) == written != before  # the device wrote nothing
    with pytest.raises(VirtqError, match="broken"):
        q.pop()
    with pytest.raises(VirtqError, match="broken"):
        q.push([(0, 0)])
    q.reset()
    assert q.broken is None and not q.enabled


def test_indirect_refused_unless_negotiated(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table, features=0)
    drv.add_indirect([(ram.alloc(8), 8, False)])
    with pytest.raises(VirtqError, match="not negotiated"):
        q.pop()


def test_descriptor_table_outside_dma(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    q.desc = ram.base + ram.size - 8 * spec.DESC_SIZE  # half the table past the mapping
    drv.publish(0)
    with pytest.raises(VirtqError, match="guest address"):
        q.pop()


def test_buffers_outside_dma_or_read_only_fault_without_writing(ram: GuestRam) -> None:
    """A writable buffer in a read-only mapping or past the end faults; nothing is written."""
    table = DmaTable()
    half = ram.size // 2
    table.map(DmaMapping(address=ram.base, size=half, flags=3, fd=ram.fd, offset=0))
    ro = ram.base + half
    table.map(DmaMapping(address=ro, size=half, flags=DMA_MAP_FLAG_READ, fd=ram.fd, offset=half))
    try:
        q, drv = make_queue(ram, table)
        for addr in (ro + 64, ram.base + ram.size - 4):
            drv.add([(addr, 16, True)])
            chain = q.pop()
            assert chain is not None  # lengths are fine; the write is what faults
            snapshot = ram.read(ram.base, ram.size)
            with pytest.raises(VirtqError):
                scatter(table, chain, b"w" * 16)
            assert ram.read(ram.base, ram.size) == snapshot
    finally:
        table.clear()


def test_gather_limit(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    drv.add([(ram.alloc(64), 64, False)])
    chain = q.pop()
    assert chain is not None
    with pytest.raises(VirtqError, match="at most 63"):
        gather(table, chain, 63)


def test_layout_checks_on_enable(ram: GuestRam, table: DmaTable) -> None:
    q = SplitQueue(table, 0, SIZE)
    q.desc, q.driver, q.device = 0x1008, 0x2000, 0x3000
    with pytest.raises(VirtqError, match="descriptor table"):
        q.enable(0)
    q.desc, q.size = 0x1000, 12
    with pytest.raises(VirtqError, match="size 12"):
        q.enable(0)
    q.size = 32
    with pytest.raises(VirtqError, match="size 32"):
        q.enable(0)


def test_event_idx_suppression(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    buf = ram.alloc(8)
    for _ in range(3):
        drv.add([(buf, 8, True)])
    chains = [q.pop() for _ in range(3)]
    assert q.pop() is None
    assert drv.avail_event() == 3  # "kick me when you pass 3"
    drv.set_used_event(1)  # interrupt once used idx passes 1
    q.push([(chains[0].head, 0)])  # type: ignore[union-attr]
    assert q.should_notify() is True  # the first interrupt is always sent
    q.push([(chains[1].head, 0)])  # type: ignore[union-attr]
    assert q.should_notify() is True  # used 1 -> 2 crosses used_event 1
    q.push([(chains[2].head, 0)])  # type: ignore[union-attr]
    assert q.should_notify() is False  # 2 -> 3 does not


def test_no_interrupt_flag_without_event_idx(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table, features=0)
    assert q.should_notify() is True
    drv.set_avail_flags(spec.AVAIL_F_NO_INTERRUPT)
    assert q.should_notify() is False


def test_unpop_returns_chains(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    drv.add([(ram.alloc(8), 8, True)])
    first = q.pop()
    q.unpop()
    again = q.pop()
    assert first is not None and again is not None and first.head == again.head


def test_state_round_trip_across_index_wrap(ram: GuestRam, table: DmaTable) -> None:
    q, drv = make_queue(ram, table)
    state = q.save()
    state.last_avail_idx = state.used_idx = 0xFFFF
    drv.avail_idx = drv.used_seen = 0xFFFF
    drv.ram.write(drv.used + 2, (0xFFFF).to_bytes(2, "little"))
    q2 = SplitQueue(table, 0, SIZE)
    q2.load(QueueState.from_dict(state.to_dict(), SIZE), ALL_RING)
    buf = ram.alloc(8)
    heads = [drv.add([(buf, 8, True)]) for _ in range(2)]  # avail idx 0xFFFF -> 1
    got = [q2.pop(), q2.pop()]
    assert [c.head for c in got if c] == heads
    q2.push([(c.head, 1) for c in got if c])
    assert drv.reap() == [(heads[0], 1), (heads[1], 1)]
    assert q2.save().used_idx == 1 == drv.used_idx()


@pytest.mark.parametrize(
    "change",
    [
        {"size": 12},
        {"size": 64},
        {"last_avail_idx": 1 << 16},
        {"desc": -1},
        {"enabled": 1},
        {"used_idx": "0"},
        {"extra": 1},
    ],
)
def test_state_from_untrusted_data_is_checked(change: dict[str, object]) -> None:
    good = QueueState(16, 0x1000, 0x2000, 0x3000, True, 5, 5, None).to_dict()
    with pytest.raises(VirtqError):
        QueueState.from_dict({**good, **change}, SIZE)
    assert QueueState.from_dict(good, SIZE).last_avail_idx == 5
