"""The C data path (mdevcore.nvme.fastio) against the Python controller.

Two controllers over real DMA tables, one with the C path and one
without, get the same commands: every completion, guest memory, the
backing file and the SMART counters must come out the same.  The C path
must also forget unmapped memory at once, step aside while dirty pages
are logged, and refuse an extension built from another source.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nvme_host import PAGE, GuestMemory, Host, status
from test_nvme_io import rw

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController, fastio
from mdevcore.nvme.queues import Completion
from mdevcore.nvme.spec import Generic, IoOpcode
from mdevcore.pci.dma import DirtyLog, DmaTable
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping

NS_BLOCKS = 2048
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE


class TableMemory(GuestMemory):
    """Guest memory the controller reaches through a real DmaTable.

    The last page of the range is mapped read-only, and one page before it
    is left unmapped, so commands can aim at both.
    """

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.readonly = self.base + size - PAGE
        self.gap = self.readonly - PAGE
        self.table = DmaTable()
        low = self.gap - self.base
        self.table.map(DmaMapping(self.base, low, RW, self.fd, 0))
        self.table.map(DmaMapping(self.readonly, PAGE, DMA_MAP_FLAG_READ, self.fd, size - PAGE))

    def close(self) -> None:
        self.table.clear()
        super().close()


class Side:
    """One controller, its memory, namespace and host driver."""

    def __init__(self, tmp: Path, name: str, fast: bool, image: bytes) -> None:
        self.path = tmp / f"{name}.img"
        self.path.write_bytes(image)
        self.mem = TableMemory()
        self.ns = FileNamespace(self.path, len(image))
        config = ControllerConfig(max_io_queues=2, max_queue_entries=64, mdts=2)
        self.ctrl = NvmeController(self.mem.table, [self.ns], lambda v: None, config=config,
                                   fast_io=fast)  # fmt: skip
        self.host = Host(self.ctrl, self.mem)
        self.host.enable()
        self.host.create_io_queue_pair(1, size=32)
        # Buffers at the same addresses on both sides: two pages per command
        # (eight commands' worth), and a PRP list page.
        self.pages = [self.mem.alloc(PAGE) for _ in range(16)]
        self.prp_list = self.mem.alloc(PAGE)
        self.mem.write(self.prp_list, struct.pack("<3Q", *self.pages[1:4]))

    def close(self) -> None:
        self.ctrl.close()
        self.ns.close()
        self.mem.close()


@pytest.fixture
def image() -> bytes:
    return os.urandom(NS_BLOCKS * 512)


@pytest.fixture
def native(tmp_path: Path, image: bytes) -> Iterator[Side]:
    side = Side(tmp_path, "c", True, image)
    assert side.ctrl.fast_io is not None
    yield side
    side.close()


# (name, what prp1/prp2 point at): the shapes a command's data pointers take.
TARGET_NAMES = ("page", "page+0x200", "page+2", "two pages", "prp2 offset", "both offset",
                "list", "gap", "readonly", "beyond")  # fmt: skip
TARGETS = st.sampled_from(TARGET_NAMES)


def pointers(side: Side, target: str, index: int) -> tuple[int, int]:
    """PRP1/PRP2 for the ``index``-th command: its own two pages, eight commands apart."""
    a, b = side.pages[2 * (index % 8)], side.pages[2 * (index % 8) + 1]
    return {
        "page": (a, 0),
        "page+0x200": (a + 0x200, b),
        "page+2": (a + 2, 0),
        "two pages": (a, b),
        "prp2 offset": (a, b + 0x200),
        "both offset": (a + 0x200, b + 0x200),
        "list": (a, side.prp_list),
        "gap": (side.mem.gap, 0),
        "readonly": (side.mem.readonly, 0),
        "beyond": (side.mem.base + side.mem.size + PAGE, 0),
    }[target]


COMMANDS = st.lists(
    st.tuples(
        st.sampled_from([IoOpcode.READ] * 4 + [IoOpcode.WRITE] * 3 + [IoOpcode.FLUSH, 0x7F]),
        st.one_of(
            st.integers(0, NS_BLOCKS - 16),
            st.integers(NS_BLOCKS - 16, NS_BLOCKS + 4),
            st.just(1 << 40),
        ),  # fmt: skip
        st.sampled_from([1, 8, 8, 9, 16, 24, 0x10000]),
        TARGETS,
        st.sampled_from([1, 1, 1, 1, 0, 2, 0xFFFFFFFF]),
        st.sampled_from([0, 0, 0, 0x40, 0x01]),  # SQE flags: PSDT (SGL), FUSE
        st.sampled_from([0, 0, 1 << 30]),  # FUA
        st.booleans(),  # ring now, or let the next ones queue behind it
    ),
    min_size=1,
    max_size=24,
)


def replay(
    side: Side, commands: list[tuple[int, int, int, str, int, int, int, bool]]
) -> tuple[list[Completion], list[bytes]]:
    """The completions, and guest memory after every run of the controller."""
    host, out, seen = side.host, [], []
    for index, (opcode, slba, nlb, target, nsid, flags, fua, ring) in enumerate(commands):
        prp1, prp2 = pointers(side, target, index)
        # What a write takes from guest memory, the same on both sides.
        slot = 2 * (index % 8)
        for page in side.pages[slot : slot + 2]:
            side.mem.write(page, bytes([slba + index & 0xFF]) * PAGE)
        cmd = rw(opcode, slba, nlb, prp1, prp2, nsid=nsid, extra=fua)._replace(flags=flags)
        host.submit(1, cmd, ring=ring)
        if ring:
            host.run()
            out += host.reap(1)
            seen.append(guest_pages(side))
    host.ring(2, host.queues[1].sq_tail)
    host.run()
    seen.append(guest_pages(side))
    return out + host.reap(1), seen


def guest_pages(side: Side) -> bytes:
    return b"".join(side.mem.read(p, PAGE) for p in side.pages)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(commands=COMMANDS)
# Every pointer shape, read and written, inside one page and across two,
# rung one by one; then queued behind one doorbell.  Each run sees them
# whatever hypothesis draws.
@example(
    commands=[(op, 8 * i, nlb, t, 1, 0, 0, True) for nlb in (1, 8)
              for op in (IoOpcode.READ, IoOpcode.WRITE) for i, t in enumerate(TARGET_NAMES)]
    + [(op, 8 * i, 8, t, 1, 0, 0, False)
       for op in (IoOpcode.READ, IoOpcode.WRITE) for i, t in enumerate(TARGET_NAMES)]
)  # fmt: skip
def test_c_and_python_paths_agree(tmp_path: Path, commands: list) -> None:  # type: ignore[type-arg]
    image = bytes(range(256)) * (NS_BLOCKS * 2)
    for sub in ("c", "py"):
        (tmp_path / sub).mkdir(exist_ok=True)
    native = Side(tmp_path / "c", "ns", True, image)
    python = Side(tmp_path / "py", "ns", False, image)
    try:
        # Else the two would be the same Python path, and agree whatever C does.
        assert native.ctrl.fast_io is not None and python.ctrl.fast_io is None
        done_native, seen_native = replay(native, commands)
        done_python, seen_python = replay(python, commands)
        assert done_native == done_python
        assert len(done_native) == len(commands)
        assert seen_native == seen_python
        assert native.path.read_bytes() == python.path.read_bytes()
        assert native.ctrl.smart.snapshot() == python.ctrl.smart.snapshot()
        assert native.ctrl.error_log.count == python.ctrl.error_log.count
        assert native.ctrl.commands_done == python.ctrl.commands_done
    finally:
        native.close()
        python.close()


def test_plain_reads_and_writes_run_in_c(native: Side, image: bytes) -> None:
    host, page = native.host, native.pages[0]
    native.mem.write(page, b"\x5a" * PAGE)
    for n in range(8):  # queued behind one doorbell: one C run takes them all
        host.submit(1, rw(IoOpcode.WRITE, 8 * n, 8, page), ring=False)
    host.ring(2, host.queues[1].sq_tail)
    host.run()
    done = host.reap(1)
    assert [c.status for c in done] == [0] * 8
    assert native.path.read_bytes()[: 8 * PAGE] == b"\x5a" * (8 * PAGE)
    assert host.command(1, rw(IoOpcode.READ, 64, 8, page)).status == 0
    assert native.mem.read(page, PAGE) == image[64 * 512 : 64 * 512 + PAGE]
    fast = native.ctrl.fast_io
    assert fast is not None and fast.commands == 9
    assert fast.batched == 8  # the queued writes went to the kernel together
    smart = native.ctrl.smart
    assert (smart.write_commands, smart.read_commands) == (8, 1)
    assert (smart.bytes_written, smart.bytes_read) == (8 * PAGE, PAGE)


def test_unmapped_memory_is_forgotten_at_once(native: Side) -> None:
    """After DMA_UNMAP, a read aimed there fails and the old mapping is not written."""
    host, page = native.host, native.pages[0]
    assert host.command(1, rw(IoOpcode.READ, 0, 8, page)).status == 0
    mem = native.mem
    watch = mmap.mmap(mem.fd, mem.size)  # the memory behind the mapping, seen from outside
    offset = page - mem.base
    watch[offset : offset + PAGE] = b"\x11" * PAGE
    # Unmap everything, then map only the queues' pages back (below the buffers).
    low = native.pages[0] - mem.base
    old = mem.table.regions()[0].mapping
    assert old is not None
    mem.table.clear()
    assert old.closed  # not kept by the C copy's pin: its fd is gone too
    mem.table.map(DmaMapping(mem.base, low, RW, mem.fd, 0))
    cqe = host.command(1, rw(IoOpcode.READ, 8, 8, page))
    assert cqe.status == status(0, Generic.DATA_TRANSFER_ERROR)
    assert watch[offset : offset + PAGE] == b"\x11" * PAGE
    watch.close()


def test_dirty_logging_leaves_commands_to_python(native: Side) -> None:
    """Migration logs every page the device writes: the Python path does, C does not."""
    mem, host, page = native.mem, native.host, native.pages[2]
    fast = native.ctrl.fast_io
    assert fast is not None
    mem.table.dirty = DirtyLog(PAGE, [(mem.base, mem.gap - mem.base)])
    assert host.command(1, rw(IoOpcode.READ, 0, 8, page)).status == 0
    assert fast.commands == 0
    assert {page // PAGE, host.queues[1].cq // PAGE} <= mem.table.dirty.dirty_pages()
    mem.table.dirty = None
    assert host.command(1, rw(IoOpcode.READ, 0, 8, page)).status == 0
    assert fast.commands == 1


def test_an_extension_from_another_source_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    fastio.load.cache_clear()
    monkeypatch.setattr(fastio, "source_digest", lambda: "0" * 16)
    try:
        assert fastio.load() is None
    finally:
        monkeypatch.undo()
        fastio.load.cache_clear()
    assert fastio.load() is not None
