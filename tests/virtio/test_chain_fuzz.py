"""Fuzzing the descriptor chain walker and the ring with hostile guest memory (hypothesis).

The guest controls every byte of its rings and descriptor tables.  Whatever
they hold, the device may only (a) take a chain or (b) raise VirtqError;
it must not raise anything else, loop, or touch a byte outside what the
chain it took says it may write.  Guest RAM is a small window so that
addresses land inside, across its edges and outside it.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_guest import GuestRam

from mdevcore.pci.dma import DmaTable
from mdevcore.virtio import spec
from mdevcore.virtio.chain import Chain, VirtqError, gather, scatter, walk
from mdevcore.virtio.virtqueue import SplitQueue

RAM_BASE, RAM_SIZE = 0x100000, 0x4000
DESC_AT, INDIRECT_AT, AVAIL_AT, USED_AT = RAM_BASE, RAM_BASE + 0x400, RAM_BASE + 0x800, 0xC00

END = RAM_BASE + RAM_SIZE
# Values picked where the checks are: inside, at and across both edges of guest
# RAM, far outside it, the indirect table itself; sampled (cheap to draw) and
# offset by a small amount.
ADDRESSES = [RAM_BASE, RAM_BASE + 0x1000, RAM_BASE + 0x2000, RAM_BASE + 0x3000, END - 16, END]
ADDRESSES += [END + 8, RAM_BASE - 8, 0, INDIRECT_AT]
ADDRESSES += [2**64 - 16, 2**63]
LENGTHS = [0, 1, 12, 16, 64, 100, 320, 0x1000, RAM_SIZE, 2**32 - 1]


def descriptor(rng: random.Random, size: int) -> bytes:
    addr = (rng.choice(ADDRESSES) + rng.randint(-8, 8)) % 2**64
    length = max(0, rng.choice(LENGTHS) + rng.randint(-8, 8)) % 2**32
    flags = rng.choice([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 0xFFFF])  # INDIRECT (4) less often
    return spec.DESC.pack(addr, length, flags, rng.randint(0, size + 1))


@st.composite
def tables(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """Queue size, descriptor table, indirect table.

    The tables come from a seeded generator (hypothesis draws the seed):
    drawing each field through hypothesis costs ~30x more per example.
    """
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    direct = b"".join(descriptor(rng, size) for _ in range(size))
    indirect = b"".join(descriptor(rng, 20) for _ in range(rng.randint(0, 20)))
    return size, direct, indirect


def _load(ram: GuestRam, direct: bytes, indirect: bytes) -> None:
    ram.write(DESC_AT, direct)
    ram.write(INDIRECT_AT, indirect)


def _check_chain(chain: Chain, ram: GuestRam, table: DmaTable, size: int) -> None:
    """Gather and scatter the chain: only its writable bytes may change."""
    assert len(chain.readable) + len(chain.writable) <= max(size, 20)
    before = ram.read(RAM_BASE, RAM_SIZE)
    try:
        gather(table, chain, 1 << 16)
    except VirtqError:
        pass
    try:
        scatter(table, chain, bytes(range(256)) * 8)
    except VirtqError:
        pass
    after = ram.read(RAM_BASE, RAM_SIZE)
    allowed = bytearray(RAM_SIZE)
    for addr, length in chain.writable:
        lo, hi = max(addr, RAM_BASE), min(addr + length, RAM_BASE + RAM_SIZE)
        if lo < hi:
            allowed[lo - RAM_BASE : hi - RAM_BASE] = b"\1" * (hi - lo)
    if before != after:
        outside = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert all(allowed[i] for i in outside), "a byte outside the writable buffers changed"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.integers(0, 20), st.booleans())
def test_walk_takes_a_chain_or_raises_virtq_error(
    layout: tuple[int, bytes, bytes], head: int, indirect_ok: bool
) -> None:
    size, direct, indirect = layout
    ram = GuestRam(RAM_SIZE, RAM_BASE)
    table = ram.dma_table()
    try:
        _load(ram, direct, indirect)
        try:
            chain = walk(table, DESC_AT, size, head, indirect_ok=indirect_ok)
        except VirtqError:
            return
        assert 0 <= head < size
        if not indirect_ok:
            assert all(
                not spec.DESC.unpack_from(direct, 16 * i)[2] & spec.DESC_F_INDIRECT
                for i in range(size)
                if i == head
            )
        _check_chain(chain, ram, table, size)
    finally:
        table.clear()
        ram.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables(), st.binary(min_size=4 + 2 * 16, max_size=4 + 2 * 16), st.booleans())
def test_the_ring_survives_any_avail_ring(
    layout: tuple[int, bytes, bytes], avail: bytes, event_idx: bool
) -> None:
    size, direct, indirect = layout
    ram = GuestRam(RAM_SIZE, RAM_BASE)
    table = ram.dma_table()
    try:
        _load(ram, direct, indirect)
        ram.write(AVAIL_AT, avail)
        q = SplitQueue(table, 0, 16)
        q.size, q.desc, q.driver, q.device = size, DESC_AT, AVAIL_AT, RAM_BASE + USED_AT
        features = spec.bit(spec.F_INDIRECT_DESC) | (spec.bit(spec.F_EVENT_IDX) * event_idx)
        q.enable(features)
        taken: list[tuple[int, int]] = []
        for _ in range(2 * size + 2):  # more than the ring holds: pending() bounds it
            try:
                chain = q.pop()
            except VirtqError:
                assert q.broken is not None  # the device now needs a reset
                break
            if chain is None:
                break
            taken.append((chain.head, 0))
        assert len(taken) <= 0x10000
        if q.broken is None and taken:
            q.push(taken)
            (used_idx,) = struct.unpack("<H", ram.read(RAM_BASE + USED_AT + 2, 2))
            assert used_idx == len(taken) & 0xFFFF
    finally:
        table.clear()
        ram.close()
