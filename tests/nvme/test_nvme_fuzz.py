"""Hostile input: random commands and register writes never break the controller.

Whatever a guest puts in a queue or writes to BAR0, the controller answers
with a status (never an exception), never translates memory outside the
DMA table (GuestMemory raises EFAULT there; a crash would show), and keeps
the backing file's size.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_host import PAGE, GuestMemory, Host

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.queues import Command
from mdevcore.nvme.spec import AdminOpcode, IoOpcode

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def addresses(mem: GuestMemory) -> st.SearchStrategy[int]:
    inside = st.integers(mem.base, mem.base + mem.size - 1)
    return st.one_of(u64, inside, inside.map(lambda a: a & ~0xFFF), st.just(0))


def commands(mem: GuestMemory, opcodes: list[int]) -> st.SearchStrategy[Command]:
    return st.builds(
        Command,
        opcode=st.one_of(st.sampled_from(opcodes), st.integers(0, 255)),
        flags=st.one_of(st.just(0), st.integers(0, 255)),
        cid=st.integers(0, 0xFFFF),
        nsid=st.one_of(st.just(1), u32),
        cdw2=u32,
        cdw3=u32,
        mptr=u64,
        prp1=addresses(mem),
        prp2=addresses(mem),
        cdw10=st.one_of(st.integers(0, 4096), u32),
        cdw11=st.one_of(st.integers(0, 16), u32),
        cdw12=st.one_of(st.integers(0, 255), u32),
        cdw13=u32,
        cdw14=u32,
        cdw15=u32,
    )


def make_host(tmp_path: Path) -> tuple[Host, FileNamespace, GuestMemory]:
    mem = GuestMemory(size=2 << 20)
    mem.holes.append((mem.base + (1 << 20), PAGE))
    ns = FileNamespace(tmp_path / "fuzz.img", 1 << 20)
    config = ControllerConfig(max_io_queues=4, max_queue_entries=64, mdts=4)
    ctrl = NvmeController(mem, [ns], lambda v: None, config=config, irq_vectors=lambda: 5)
    host = Host(ctrl, mem)
    host.enable(size=64)
    host.create_io_queue_pair(1, size=64)
    return host, ns, mem


def test_random_commands_always_complete(tmp_path: Path) -> None:
    host, ns, mem = make_host(tmp_path)
    admin_ops = [int(op) for op in AdminOpcode if op != AdminOpcode.ASYNC_EVENT_REQUEST]
    io_ops = [int(op) for op in IoOpcode]

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from([0, 1]), st.data()), min_size=1, max_size=12))
    def run(batch: list[tuple[int, st.DataObject]]) -> None:
        if not host.ctrl.ready or 1 not in host.ctrl.sqs:
            return  # a fuzzed command reset or tore down the queues; nothing more to check
        # Draw everything first: hypothesis may abandon an example mid-draw,
        # and a half-submitted batch would leak into the next example.
        drawn = [
            (qid, data.draw(commands(mem, admin_ops if qid == 0 else io_ops)))
            for qid, data in batch
        ]
        sent: dict[int, list[int]] = {0: [], 1: []}
        for qid, cmd in drawn:
            if qid == 0 and cmd.opcode in (
                AdminOpcode.ASYNC_EVENT_REQUEST,
                AdminOpcode.DELETE_IO_SQ,
            ):
                cmd = cmd._replace(opcode=AdminOpcode.KEEP_ALIVE)
            sent[qid].append(host.submit(qid, cmd).cid)
        host.run()
        for qid in (0, 1):
            if qid in host.ctrl.sqs:
                done = host.reap(qid)
                assert sorted(c.cid for c in done) == sorted(sent[qid])
                for cqe in done:
                    assert cqe.sqid == qid
        assert os.stat(ns.path).st_size == 1 << 20

    try:
        run()
    finally:
        host.ctrl.close()
        ns.close()
        mem.close()


def test_random_register_writes_never_raise(tmp_path: Path) -> None:
    host, ns, mem = make_host(tmp_path)

    @FUZZ
    @given(
        st.lists(st.tuples(st.integers(0, 0x2000), st.binary(min_size=1, max_size=8)), max_size=20)
    )
    def run(writes: list[tuple[int, bytes]]) -> None:
        for offset, data in writes:
            host.ctrl.mmio_write(offset, data)
            host.ctrl.mmio_read(offset, len(data))
            host.ctrl.process()
            host.ctrl.tick()
        # whatever happened, a fresh enable brings the controller back
        host.ctrl.reset()
        host.enable(size=64)
        assert host.ctrl.ready
        assert host.admin(AdminOpcode.KEEP_ALIVE).status == 0

    try:
        run()
    finally:
        host.ctrl.close()
        ns.close()
        mem.close()


def test_queue_memory_outside_mapping_is_fatal_not_a_crash(tmp_path: Path) -> None:
    host, ns, mem = make_host(tmp_path)
    try:
        # an SQ whose memory lies in the unmapped gap: creation succeeds (base is
        # aligned), the first fetch fails, the controller reports fatal status
        gap = mem.base + (1 << 20)
        cq = mem.alloc(PAGE)
        assert (
            host.admin(
                AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=15 << 16 | 2, cdw11=2 << 16 | 3
            ).status
            == 0
        )
        assert (
            host.admin(
                AdminOpcode.CREATE_IO_SQ, prp1=gap, cdw10=15 << 16 | 2, cdw11=2 << 16 | 1
            ).status
            == 0
        )
        host.ring(4, 1)
        host.run()
        csts = struct.unpack("<I", host.ctrl.mmio_read(0x1C, 4))[0]
        assert csts & 0x2  # CFS
    finally:
        host.ctrl.close()
        ns.close()
        mem.close()
