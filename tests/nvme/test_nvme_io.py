"""NVM commands against a real backing file, PRP walks, DMA faults."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from nvme_host import NS_SIZE, PAGE, GuestMemory, Host, status

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.queues import Command, make_command
from mdevcore.nvme.spec import Generic, IoOpcode, StatusType

G = StatusType.GENERIC


def rw(
    op: int, slba: int, nlb: int, prp1: int, prp2: int = 0, nsid: int = 1, extra: int = 0
) -> Command:
    return make_command(
        op,
        nsid=nsid,
        prp1=prp1,
        prp2=prp2,
        cdw10=slba & 0xFFFFFFFF,
        cdw11=slba >> 32,
        cdw12=(nlb - 1) | extra,
    )


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def test_write_lands_in_file_and_reads_back(io_host: Host, backing: Path) -> None:
    data = pattern(PAGE, 1)
    src = io_host.mem.alloc(PAGE)
    io_host.mem.write(src, data)
    assert io_host.command(1, rw(IoOpcode.WRITE, 16, 8, src)).status == 0
    assert io_host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
    assert file_bytes(backing, 16 * 512, PAGE) == data
    dst = io_host.mem.alloc(PAGE)
    assert io_host.command(1, rw(IoOpcode.READ, 16, 8, dst)).status == 0
    assert io_host.mem.read(dst, PAGE) == data


def test_read_sees_file_contents(io_host: Host, backing: Path) -> None:
    data = pattern(1024, 2)
    with open(backing, "r+b") as f:
        f.seek(NS_SIZE - 1024)
        f.write(data)
    dst = io_host.mem.alloc(PAGE)
    assert io_host.command(1, rw(IoOpcode.READ, NS_SIZE // 512 - 2, 2, dst)).status == 0
    assert io_host.mem.read(dst, 1024) == data


def test_lba_out_of_range_and_bad_namespace(io_host: Host) -> None:
    buf = io_host.mem.alloc(PAGE)
    last = NS_SIZE // 512
    assert io_host.command(1, rw(IoOpcode.READ, last - 1, 2, buf)).status == status(
        G, Generic.LBA_OUT_OF_RANGE
    )
    assert io_host.command(1, rw(IoOpcode.WRITE, 1 << 40, 1, buf)).status == status(
        G, Generic.LBA_OUT_OF_RANGE
    )
    assert io_host.command(1, rw(IoOpcode.READ, 0, 1, buf, nsid=2)).status == status(
        G, Generic.INVALID_NAMESPACE
    )
    assert io_host.command(1, rw(IoOpcode.READ, 0, 1, buf, nsid=0)).status == status(
        G, Generic.INVALID_NAMESPACE
    )
    assert io_host.command(1, make_command(0x7E, nsid=1)).status == status(
        G, Generic.INVALID_OPCODE
    )
    assert io_host.command(1, make_command(IoOpcode.FLUSH, nsid=3)).status == status(
        G, Generic.INVALID_NAMESPACE
    )
    assert io_host.command(1, make_command(IoOpcode.FLUSH, nsid=0xFFFFFFFF)).status == 0


def test_transfer_beyond_mdts(io_host: Host, ctrl: NvmeController) -> None:
    buf = io_host.mem.alloc(PAGE)
    nlb = ctrl.config.max_transfer // 512 + 1
    assert io_host.command(1, rw(IoOpcode.READ, 0, nlb, buf)).status == status(
        G, Generic.INVALID_FIELD
    )


def build_prp_list(mem: GuestMemory, pages: list[int], list_offset: int = 0) -> int:
    """One list page (entries from ``list_offset``) holding ``pages``."""
    lst = mem.alloc(PAGE) + list_offset
    mem.write(lst, struct.pack(f"<{len(pages)}Q", *pages))
    return lst


def test_prp1_with_offset_and_prp2_as_second_page(io_host: Host, backing: Path) -> None:
    mem = io_host.mem
    first, second = mem.alloc(PAGE), mem.alloc(PAGE)
    data = pattern(PAGE, 3)
    # 0x600 bytes at the end of the first page, the remaining 0xA00 at the start of the second
    mem.write(first + 0xA00, data[:0x600])
    mem.write(second, data[0x600:])
    assert io_host.command(1, rw(IoOpcode.WRITE, 0, 8, first + 0xA00, second)).status == 0
    assert file_bytes(backing, 0, PAGE) == data


def test_prp_list_multi_page_with_offset(io_host: Host, backing: Path) -> None:
    mem = io_host.mem
    length = 5 * PAGE  # 0x200 in page 0, then 4 full pages and 0xE00 of one more
    data = pattern(length, 4)
    first = mem.alloc(PAGE) + 0x200
    pages = [mem.alloc(PAGE) for _ in range(5)]
    random.Random(5).shuffle(pages)  # scattered, not contiguous
    mem.write(first, data[: PAGE - 0x200])
    pos = PAGE - 0x200
    for page in pages:
        chunk = data[pos : pos + PAGE]
        mem.write(page, chunk)
        pos += len(chunk)
    lst = build_prp_list(mem, pages, list_offset=0x100)
    assert io_host.command(1, rw(IoOpcode.WRITE, 100, length // 512, first, lst)).status == 0
    assert file_bytes(backing, 100 * 512, length) == data
    # and read it back through a different scatter list
    back = [mem.alloc(PAGE) for _ in range(5)]
    lst2 = build_prp_list(mem, back[1:])
    assert io_host.command(1, rw(IoOpcode.READ, 100, 40, back[0], lst2)).status == 0
    assert b"".join(mem.read(p, PAGE) for p in back) == data


def test_prp_list_chained_across_list_pages(io_host: Host, backing: Path) -> None:
    mem = io_host.mem
    pages = [mem.alloc(PAGE) for _ in range(8)]
    data = pattern(8 * PAGE, 6)
    for i, page in enumerate(pages):
        mem.write(page, data[i * PAGE : (i + 1) * PAGE])
    # first list page: only 3 slots left before its end -> 2 data entries + chain pointer
    second_list = build_prp_list(mem, pages[3:])
    first_list = build_prp_list(mem, [pages[1], pages[2], second_list], list_offset=PAGE - 24)
    assert io_host.command(1, rw(IoOpcode.WRITE, 8, 64, pages[0], first_list)).status == 0
    assert file_bytes(backing, 8 * 512, 8 * PAGE) == data


def test_prp_offset_rules(io_host: Host) -> None:
    mem = io_host.mem
    a, b = mem.alloc(PAGE), mem.alloc(PAGE)
    bad = status(G, Generic.PRP_OFFSET_INVALID)
    assert (
        io_host.command(1, rw(IoOpcode.READ, 0, 1, a + 2)).status == bad
    )  # PRP1 not dword aligned
    assert (
        io_host.command(1, rw(IoOpcode.READ, 0, 16, a, b + 0x200)).status == bad
    )  # data PRP2 with offset
    lst = build_prp_list(mem, [b + 8, b + PAGE])
    assert (
        io_host.command(1, rw(IoOpcode.READ, 0, 24, a, lst)).status == bad
    )  # list entry with offset
    assert (
        io_host.command(1, rw(IoOpcode.READ, 0, 24, a, lst + 4)).status == bad
    )  # list not qword aligned


def test_dma_outside_mapping_is_a_transfer_error_and_touches_nothing(
    io_host: Host, backing: Path, mem: GuestMemory
) -> None:
    good = [mem.alloc(PAGE) for _ in range(3)]
    gap = mem.alloc(PAGE)
    mem.holes.append((gap, PAGE))
    for page in good:
        mem.write(page, b"\xee" * PAGE)
    lst = build_prp_list(mem, [good[1], gap, good[2]])
    # Read: the controller must not fill the valid pages before noticing the gap
    cqe = io_host.command(1, rw(IoOpcode.READ, 0, 32, good[0], lst))
    assert cqe.status == status(G, Generic.DATA_TRANSFER_ERROR)
    assert all(mem.read(p, PAGE) == b"\xee" * PAGE for p in good)
    # Write: the file stays untouched
    before = file_bytes(backing, 0, 4 * PAGE)
    cqe = io_host.command(1, rw(IoOpcode.WRITE, 0, 32, good[0], lst))
    assert cqe.status == status(G, Generic.DATA_TRANSFER_ERROR)
    assert file_bytes(backing, 0, 4 * PAGE) == before
    # PRP list pointer itself outside any mapping, and PRP1 beyond guest memory
    cqe = io_host.command(1, rw(IoOpcode.READ, 0, 32, good[0], mem.base + mem.size + PAGE))
    assert cqe.status == status(G, Generic.DATA_TRANSFER_ERROR)
    cqe = io_host.command(1, rw(IoOpcode.READ, 0, 1, 0x1000))
    assert cqe.status == status(G, Generic.DATA_TRANSFER_ERROR)


def test_write_zeroes(io_host: Host, backing: Path) -> None:
    src = io_host.mem.alloc(PAGE)
    io_host.mem.write(src, b"\xab" * PAGE)
    assert io_host.command(1, rw(IoOpcode.WRITE, 0, 8, src)).status == 0
    assert io_host.command(1, rw(IoOpcode.WRITE_ZEROES, 2, 3, 0)).status == 0
    assert io_host.command(1, rw(IoOpcode.WRITE_ZEROES, 6, 1, 0, extra=1 << 25)).status == 0  # DEAC
    content = file_bytes(backing, 0, PAGE)
    assert content == b"\xab" * 1024 + bytes(1536) + b"\xab" * 512 + bytes(512) + b"\xab" * 512
    cqe = io_host.command(1, rw(IoOpcode.WRITE_ZEROES, NS_SIZE // 512, 1, 0))
    assert cqe.status == status(G, Generic.LBA_OUT_OF_RANGE)


def dsm(host: Host, ranges: list[tuple[int, int]], deallocate: bool = True) -> int:
    buf = host.mem.alloc(PAGE)
    host.mem.write(buf, b"".join(struct.pack("<IIQ", 0, count, slba) for slba, count in ranges))
    cmd = make_command(
        IoOpcode.DATASET_MANAGEMENT,
        nsid=1,
        prp1=buf,
        cdw10=len(ranges) - 1,
        cdw11=4 if deallocate else 0,
    )
    return host.command(1, cmd).status


def test_dataset_management_deallocate_punches_holes(io_host: Host, backing: Path) -> None:
    big = 32 * PAGE  # the MDTS limit of the test controller
    src = io_host.mem.alloc(big)
    io_host.mem.write(src, b"\x5a" * big)
    lst = build_prp_list(io_host.mem, [src + i * PAGE for i in range(1, 32)])
    for slba in (0, 256):
        assert io_host.command(1, rw(IoOpcode.WRITE, slba, big // 512, src, lst)).status == 0
    assert io_host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
    blocks_before = os.stat(backing).st_blocks
    assert dsm(io_host, [(0, 256), (384, 8)]) == 0
    assert file_bytes(backing, 0, 256 * 512) == bytes(256 * 512)
    assert file_bytes(backing, 256 * 512, 512) == b"\x5a" * 512
    assert file_bytes(backing, 384 * 512, 8 * 512) == bytes(8 * 512)
    assert os.stat(backing).st_blocks < blocks_before  # space really given back
    # hints only: nothing changes; a range beyond the end fails and changes nothing
    assert dsm(io_host, [(256, 8)], deallocate=False) == 0
    assert file_bytes(backing, 256 * 512, 512) == b"\x5a" * 512
    assert dsm(io_host, [(256, 8), (NS_SIZE // 512, 1)]) == status(G, Generic.LBA_OUT_OF_RANGE)
    assert file_bytes(backing, 256 * 512, 512) == b"\x5a" * 512


def test_fua_and_write_through(io_host: Host, backing: Path, ctrl: NvmeController) -> None:
    src = io_host.mem.alloc(PAGE)
    io_host.mem.write(src, b"\x11" * PAGE)
    assert io_host.command(1, rw(IoOpcode.WRITE, 0, 8, src, extra=1 << 30)).status == 0
    ctrl.namespaces[0].write_cache = False
    assert io_host.command(1, rw(IoOpcode.WRITE, 8, 8, src)).status == 0
    assert file_bytes(backing, 0, 2 * PAGE) == b"\x11" * 2 * PAGE


@pytest.mark.parametrize("direct", [True, False])
def test_4k_namespace(tmp_path: Path, mem: GuestMemory, direct: bool) -> None:
    ns = FileNamespace(tmp_path / "4k.img", 64 * PAGE, lba_size=4096, direct=direct)
    try:
        ctrl = NvmeController(mem, [ns], lambda v: None, config=ControllerConfig(max_io_queues=2))
        host = Host(ctrl, mem)
        host.enable()
        host.create_io_queue_pair(1)
        src = mem.alloc(2 * PAGE)
        data = pattern(2 * PAGE, 7)
        mem.write(src, data)
        assert host.command(1, rw(IoOpcode.WRITE, 62, 2, src, src + PAGE)).status == 0
        assert host.command(1, rw(IoOpcode.WRITE, 63, 2, src, src + PAGE)).status == status(
            G, Generic.LBA_OUT_OF_RANGE
        )
        assert file_bytes(tmp_path / "4k.img", 62 * PAGE, 2 * PAGE) == data
        dst = mem.alloc(2 * PAGE)
        # an unaligned PRP1 (dword offset) forces the buffered path under O_DIRECT
        assert host.command(1, rw(IoOpcode.READ, 62, 1, dst + 4, dst + PAGE)).status == 0
        assert mem.read(dst + 4, PAGE) == data[:PAGE]
    finally:
        ns.close()


def test_namespace_creates_sparse_file(tmp_path: Path) -> None:
    ns = FileNamespace(tmp_path / "sparse.img", 1 << 30)
    try:
        st = os.stat(tmp_path / "sparse.img")
        assert st.st_size == 1 << 30 and st.st_blocks == 0
        assert ns.nlbas == (1 << 30) // 512
    finally:
        ns.close()
    with pytest.raises(OSError):
        FileNamespace(tmp_path / "bad.img", 1000)
