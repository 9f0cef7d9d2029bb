"""The host driver's doorbell stores are whole: a polling controller reads only values written.

Issue 12's soak found NVMe data corruption under CPU load: the workload
rang mapped doorbells with struct.pack_into, which clears the field before
writing it, and the controller polling the page sometimes read 0 - an SQ
tail that made it run stale entries, a CQ head that freed completions the
host had not read.  Here a second process polls a doorbell page the way the
controller does (a 32-bit load through a memoryview) while this one rings
it through the workload's own MappedDoorbells and GuestMemory.store32; the
reader must see only the values written.  With struct.pack_into in their
place the reader sees 0 in about one read in twenty on this machine.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections import Counter
from collections.abc import Callable

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.migration.workloads.nvme_driver import MappedDoorbells

SECONDS = 0.5
BASE = 0x1000  # the doorbell window starts at BAR0 offset 0x1000
VALUES = (0x11, 0x22)  # never 0: a 0 read means a store was split


def _watch(fd: int, offset: int, ring: Callable[[int], None]) -> Counter[int]:
    """Values a forked reader saw at ``offset`` of ``fd`` while ``ring`` stored VALUES in turn."""
    ring(VALUES[0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the polling "controller"
        try:
            page = mmap.mmap(fd, 4096, offset=offset // 4096 * 4096)
            words = memoryview(page).cast("I")
            index = offset % 4096 // 4
            seen: Counter[int] = Counter()
            deadline = time.monotonic() + SECONDS
            while time.monotonic() < deadline:
                seen[words[index]] += 1
            os.write(w, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        for value in VALUES:
            ring(value)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return Counter({int(k): n for k, n in json.loads(f.read()).items()})


def test_mapped_doorbell_rings_are_single_stores() -> None:
    fd = os.memfd_create("bar0")
    try:
        os.ftruncate(fd, 4096)
        doorbells = MappedDoorbells(fd, 4096, 0, BASE)
        try:
            cq_head = BASE + 3 * 4  # CQ 1's doorbell (CAP.DSTRD 0)
            assert doorbells.covers(cq_head) and not doorbells.covers(cq_head + 2)
            seen = _watch(fd, cq_head - BASE, lambda v: doorbells.store(cq_head, v))
        finally:
            doorbells.close()
    finally:
        os.close(fd)
    assert set(seen) == set(VALUES), seen  # both seen, and nothing else (no 0)


def test_shadow_doorbell_stores_are_single_stores() -> None:
    with GuestMemory(8192) as mem:
        slot = 4096 + 2 * 4  # SQ 1's shadow doorbell in the page at 4096
        seen = _watch(mem.fd, slot, lambda v: mem.store32(slot, v))
        assert 1 in mem.take_dirty()  # a vCPU write: the page is the VMM's to send
    assert set(seen) == set(VALUES), seen
