"""The split virtqueue: descriptor chains a driver makes available, and queue state.

Input, byte 0 even (rings): byte 1 picks the queue size (1 << (b % 6)),
byte 2 the ring features (bit 0 INDIRECT_DESC, bit 1 EVENT_IDX); then the
guest memory a driver filled: the descriptor table (size * 16 bytes), the
avail ring, and the rest at DATA (indirect tables, buffers).  Memory is
a real DmaTable over a memfd, with unmapped guard pages on both sides.
The device pops until the ring is empty or the queue breaks, gathers and
scatters every chain and returns it through the used ring.

Input, byte 0 odd (migration): the rest is JSON for QueueState.from_dict.

Invariants:
- every pop agrees with an independent walk of the same bytes (visited
  set, no step limit): same segments, or both refuse; a loop is always
  refused; an accepted chain has at most ``size`` (or table) descriptors;
- per the spec (2.7.5.3.2) the device ignores WRITE on a descriptor that
  refers to an indirect table, and takes one that ends a chain of direct
  descriptors;
- gather reads, scatter and push write only inside the DMA table; scatter
  changes no byte outside the chain's writable buffers, push none outside
  the used ring; guard pages stay zero;
- from_dict raises VirtqError or returns a state whose every field is in
  range, and a queue loads it (or refuses it with VirtqError).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any

from mdevcore.pci.dma import DmaTable
from mdevcore.tools.fuzz import Finding, check
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping
from mdevcore.virtio import spec
from mdevcore.virtio.chain import Chain, VirtqError, gather, scatter
from mdevcore.virtio.virtqueue import QueueState, SplitQueue

PAGE = 4096
SIZE = 64 << 10
BASE = 0x20_0000
DESC, AVAIL, USED, DATA = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x3000
MAX_QUEUE = 32
Segments = tuple[list[tuple[int, int]], list[tuple[int, int]]]


class Refused(Exception):
    """The reference walk refuses the chain."""


def _desc(mem: bytes, iova: int) -> tuple[int, int, int, int]:
    if not BASE <= iova <= BASE + SIZE - spec.DESC_SIZE:
        raise Refused(f"descriptor at {iova:#x} outside guest memory")
    addr, length, flags, nxt = spec.DESC.unpack_from(mem, iova - BASE)
    return addr, length, flags, nxt


def reference_walk(mem: bytes, size: int, head: int, indirect_ok: bool) -> Segments:
    """The chain at ``head``, walked by following links and remembering visits."""
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []

    def add(addr: int, length: int, flags: int) -> None:
        if not length:
            return
        if flags & spec.DESC_F_WRITE:
            writable.append((addr, length))
        elif writable:
            raise Refused("readable after writable")
        else:
            readable.append((addr, length))

    if head >= size:
        raise Refused("head outside the table")
    if DESC + size * spec.DESC_SIZE > BASE + SIZE:
        raise Refused("table outside guest memory")
    visited: set[int] = set()
    index = head
    while True:
        if index in visited:
            raise Refused("loop")
        visited.add(index)
        addr, length, flags, nxt = _desc(mem, DESC + index * spec.DESC_SIZE)
        if flags & spec.DESC_F_INDIRECT:
            if not indirect_ok or flags & spec.DESC_F_NEXT:
                raise Refused("indirect not allowed here")
            # 2.7.5.3.2: WRITE is ignored on the descriptor naming a table, and
            # that descriptor may end a chain of direct ones.
            if length == 0 or length % spec.DESC_SIZE or length // spec.DESC_SIZE > size:
                raise Refused("indirect table length")
            if not (BASE <= addr and addr + length <= BASE + SIZE):
                raise Refused("indirect table outside guest memory")
            entries = length // spec.DESC_SIZE
            seen: set[int] = set()
            i = 0
            while True:
                if i in seen:
                    raise Refused("indirect loop")
                seen.add(i)
                a, n, f, nx = _desc(mem, addr + i * spec.DESC_SIZE)
                if f & spec.DESC_F_INDIRECT:
                    raise Refused("nested indirect")
                add(a, n, f)
                if not f & spec.DESC_F_NEXT:
                    return readable, writable
                if nx >= entries:
                    raise Refused("indirect next outside")
                i = nx
        add(addr, length, flags)
        if not flags & spec.DESC_F_NEXT:
            return readable, writable
        if nxt >= size:
            raise Refused("next outside the table")
        index = nxt


def inside(addr: int, length: int) -> bool:
    return BASE <= addr and addr + length <= BASE + SIZE


class Guest:
    def __init__(self) -> None:
        self.fd = os.memfd_create("fuzz-virtio", os.MFD_CLOEXEC)
        self.file_size = SIZE + 2 * PAGE
        os.ftruncate(self.fd, self.file_size)
        self.mm = mmap.mmap(self.fd, self.file_size)
        self.table = DmaTable()
        self.table.map(
            DmaMapping(BASE, SIZE, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, self.fd, PAGE)
        )
        self.zero = bytes(self.file_size)

    def memory(self) -> bytes:
        return self.mm[PAGE : PAGE + SIZE]

    def write(self, iova: int, data: bytes) -> None:
        off = iova - BASE + PAGE
        data = data[: max(0, PAGE + SIZE - off)]
        self.mm[off : off + len(data)] = data

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        try:
            view = self.table.translate(iova, length, write)
        except OSError:
            check(not inside(iova, length) or length < 0, f"{iova:#x}+{length} refused inside")
            raise
        check(inside(iova, length), f"translate gave {iova:#x}+{length:#x} outside the table")
        check(len(view) == length, "short view")
        return view

    def mark_dirty(self, iova: int, length: int) -> None:
        self.table.mark_dirty(iova, length)

    def guards_clean(self) -> None:
        check(self.mm[:PAGE] == self.zero[:PAGE], "guard page below written")
        check(self.mm[PAGE + SIZE :] == self.zero[:PAGE], "guard page above written")

    def close(self) -> None:
        self.table.clear()
        self.mm.close()
        os.close(self.fd)


def changed_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """IOVAs that changed and lie in no allowed range (the first few)."""
    b, a = bytearray(before), bytearray(after)
    for addr, length in allowed:
        lo, hi = max(addr, BASE) - BASE, min(addr + length, BASE + SIZE) - BASE
        if lo < hi:
            a[lo:hi] = b[lo:hi]
    if a == b:
        return []
    return [BASE + i for i in range(len(a)) if a[i] != b[i]][:3]


class VirtioTarget:
    def __init__(self) -> None:
        self.guest = Guest()
        self.chains_compared = 0  # so a test can tell the checks are not vacuous

    def run(self, data: bytes) -> None:
        if not data:
            return
        if data[0] & 1:
            self._state(data[1:])
        else:
            self.guest.mm[:] = self.guest.zero
            try:
                self._rings(data[1:])
            finally:
                self.guest.guards_clean()

    def _rings(self, data: bytes) -> None:
        g = self.guest
        size = 1 << (data[0] % 6) if data else 1
        ring_flags = data[1] if len(data) > 1 else 0
        body = data[2:]
        table_bytes = size * spec.DESC_SIZE
        avail_bytes = 6 + 2 * size
        g.write(DESC, body[:table_bytes])
        g.write(AVAIL, body[table_bytes : table_bytes + avail_bytes])
        g.write(DATA, body[table_bytes + avail_bytes :])
        features = 0
        if ring_flags & 1:
            features |= spec.bit(spec.F_INDIRECT_DESC)
        if ring_flags & 2:
            features |= spec.bit(spec.F_EVENT_IDX)
        q = SplitQueue(g, 0, MAX_QUEUE)  # type: ignore[arg-type]
        q.size, q.desc, q.driver, q.device = size, DESC, AVAIL, USED
        q.enable(features)
        for _ in range(size + 1):  # a ring holds at most size; one more pop sees the end
            mem = g.memory()
            # Read afresh each time, as the device does: a chain's writable
            # buffer may lie on the avail ring, and scattering into it
            # moves the driver's idx (the last pop too).
            avail_idx = struct.unpack_from("<H", mem, AVAIL - BASE + 2)[0]
            expect: Segments | Refused | None
            if (avail_idx - q.last_avail_idx) & 0xFFFF == 0:
                expect = None
            elif (avail_idx - q.last_avail_idx) & 0xFFFF > size:
                expect = Refused("avail idx too far ahead")
            else:
                slot = q.last_avail_idx % size
                head = struct.unpack_from("<H", mem, AVAIL - BASE + 4 + 2 * slot)[0]
                try:
                    expect = reference_walk(mem, size, head, bool(ring_flags & 1))
                except Refused as exc:
                    expect = exc
            try:
                chain = q.pop()
            except VirtqError as exc:
                check(isinstance(expect, Refused), f"pop refused ({exc}), reference {expect}")
                check(q.broken is not None, "a refused chain left the queue usable")
                return
            if chain is None:
                check(expect is None, f"pop found nothing, reference {expect}")
                return
            check(
                not isinstance(expect, Refused),
                f"pop accepted what the reference refuses: {expect}",
            )
            check(expect is not None, "pop returned a chain past avail idx")
            assert expect is not None and not isinstance(expect, Refused)
            check((chain.readable, chain.writable) == expect, f"chain {chain} != {expect}")
            self.chains_compared += 1
            check(len(chain.readable) + len(chain.writable) <= size, "more segments than the queue")
            self._use(q, chain)

    def _use(self, q: SplitQueue, chain: Chain) -> None:
        g = self.guest
        try:
            data = gather(g, chain, 1 << 16)  # type: ignore[arg-type]
            check(len(data) == chain.readable_len, "gather length")
        except VirtqError:
            check(
                chain.readable_len > 1 << 16 or not all(inside(a, n) for a, n in chain.readable),
                "gather refused a chain inside guest memory",
            )
        before = g.memory()
        try:
            written = scatter(g, chain, b"\xa5" * min(chain.writable_len, 4096))  # type: ignore[arg-type]
        except VirtqError:
            written = 0
            check(not all(inside(a, n) for a, n in chain.writable), "scatter refused inside")
        after = g.memory()
        stray = changed_outside(before, after, chain.writable)
        check(not stray, f"scatter wrote outside the writable buffers at {stray[:3]}")
        before = after
        used_ring = [(USED, 4 + 8 * q.size + 2)]
        q.push([(chain.head, written)])
        stray = changed_outside(before, g.memory(), used_ring)
        check(not stray, f"push wrote outside the used ring at {stray[:3]}")

    def _state(self, data: bytes) -> None:
        try:
            raw: Any = json.loads(data)
        except (ValueError, RecursionError):
            return  # not JSON: the transport's own parse refuses it
        try:
            state = QueueState.from_dict(raw, 256)
        except VirtqError:
            return
        except Exception as exc:
            raise Finding(f"from_dict raised {exc!r}") from exc
        check(0 < state.size <= 256 and not state.size & (state.size - 1), "size")
        for idx in (state.last_avail_idx, state.used_idx):
            check(0 <= idx <= 0xFFFF, "index")
        check(state.signalled_used is None or 0 <= state.signalled_used <= 0xFFFF, "signalled")
        for addr in (state.desc, state.driver, state.device):
            check(0 <= addr < 1 << 64, "address")
        q = SplitQueue(self.guest, 0, 256)  # type: ignore[arg-type]
        try:
            q.load(state, spec.bit(spec.F_EVENT_IDX))
        except VirtqError:
            return
        check(q.save() == state, "a loaded state saves differently")

    def close(self) -> None:
        self.guest.close()


def make() -> VirtioTarget:
    return VirtioTarget()


# --- seeds: chains as virtio_net and the tests make them --------------------


def _rings(size: int, flags: int, descs: list[tuple[int, int, int, int]], heads: list[int],
           data: bytes = b"") -> bytes:  # fmt: skip
    table = b"".join(spec.DESC.pack(*d) for d in descs).ljust(size * spec.DESC_SIZE, b"\0")
    ring = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    ring = ring.ljust(6 + 2 * size, b"\0")
    return bytes([0, size.bit_length() - 1, flags]) + table + ring + data


def seeds() -> dict[str, bytes]:
    n, w, ind = spec.DESC_F_NEXT, spec.DESC_F_WRITE, spec.DESC_F_INDIRECT
    buf = DATA + 0x1000
    indirect_table = spec.DESC.pack(buf, 12, n, 1) + spec.DESC.pack(buf + 64, 1514, w, 0)
    state = {
        "size": 256, "desc": 0x10000, "driver": 0x11000, "device": 0x12000, "enabled": True,
        "last_avail_idx": 7, "used_idx": 7, "signalled_used": 6,
    }  # fmt: skip
    return {
        # virtio-net rx: one writable buffer per head; tx: header + frame
        "rx-buffers": _rings(8, 0, [(buf + 2048 * i, 1526, w, 0) for i in range(4)], [0, 1, 2, 3]),
        "tx-chain": _rings(8, 2, [(buf, 12, n, 1), (buf + 64, 60, 0, 0)], [0]),
        "indirect": _rings(8, 1, [(DATA, len(indirect_table), ind, 0)], [0], indirect_table),
        # 2.7.5.3.2: WRITE on the table's descriptor is ignored (Linux's
        # virtio_balloon sets it); a table may end a chain of direct descriptors.
        "indirect-write-flag": _rings(
            8, 1, [(DATA, len(indirect_table), ind | w, 0)], [0], indirect_table
        ),
        "indirect-after-direct": _rings(
            8,
            1,
            [(buf + 4096, 8, n, 1), (DATA, len(indirect_table), ind, 0)],
            [0],
            indirect_table,
        ),  # fmt: skip
        "loop": _rings(4, 0, [(buf, 16, n, 1), (buf, 16, n, 0)], [0]),
        "readable-after-writable": _rings(4, 0, [(buf, 16, w | n, 1), (buf, 16, 0, 0)], [0]),
        "outside-memory": _rings(4, 0, [(0x1000, 64, w, 0)], [0]),
        "state": b"\1" + json.dumps(state).encode(),
    }
