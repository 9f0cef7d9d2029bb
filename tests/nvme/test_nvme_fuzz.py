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
from typing import Any

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


GUEST_BYTES = 2 << 20


def addresses(base: int, size: int) -> st.SearchStrategy[int]:
    inside = st.integers(base, base + size - 1)
    return st.one_of(u64, inside, inside.map(lambda a: a & ~0xFFF), st.just(0))


def commands(base: int, size: int, opcodes: list[int]) -> st.SearchStrategy[Command]:
    return st.builds(
        Command,
        opcode=st.one_of(st.sampled_from(opcodes), st.integers(0, 255)),
        flags=st.one_of(st.just(0), st.integers(0, 255)),
        cid=st.integers(0, 0xFFFF),
        nsid=st.one_of(st.just(1), u32),
        cdw2=u32,
        cdw3=u32,
        mptr=u64,
        prp1=addresses(base, size),
        prp2=addresses(base, size),
        cdw10=st.one_of(st.integers(0, 4096), u32),
        cdw11=st.one_of(st.integers(0, 16), u32),
        cdw12=st.one_of(st.integers(0, 255), u32),
        cdw13=u32,
        cdw14=u32,
        cdw15=u32,
    )


UNFOLLOWABLE = (
    AdminOpcode.ASYNC_EVENT_REQUEST,
    AdminOpcode.DELETE_IO_SQ,
    AdminOpcode.DOORBELL_BUFFER_CONFIG,
)


def make_host(tmp_path: Path) -> tuple[Host, FileNamespace, GuestMemory]:
    mem = GuestMemory(size=GUEST_BYTES)
    mem.holes.append((mem.base + (1 << 20), PAGE))
    ns = FileNamespace(tmp_path / "fuzz.img", 1 << 20)
    config = ControllerConfig(max_io_queues=4, max_queue_entries=64, mdts=4)
    ctrl = NvmeController(mem, [ns], lambda v: None, config=config, irq_vectors=lambda: 5)
    host = Host(ctrl, mem)
    host.enable(size=64)
    host.create_io_queue_pair(1, size=64)
    return host, ns, mem


def test_random_commands_always_complete(tmp_path: Path) -> None:
    admin_ops = [int(op) for op in AdminOpcode if op != AdminOpcode.ASYNC_EVENT_REQUEST]
    io_ops = [int(op) for op in IoOpcode]
    probe = GuestMemory(size=GUEST_BYTES)
    layout = (probe.base, probe.size)
    probe.close()
    executed = []

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from([0, 1]), st.data()), min_size=1, max_size=12))
    def run(batch: list[tuple[int, st.DataObject]]) -> None:
        # Draw everything first: hypothesis may abandon an example mid-draw.
        drawn = [
            (qid, data.draw(commands(*layout, admin_ops if qid == 0 else io_ops)))
            for qid, data in batch
        ]
        host, ns, mem = make_host(tmp_path)  # fresh per example: no state leaks between them
        try:
            sent: dict[int, list[int]] = {0: [], 1: []}
            for qid, cmd in drawn:
                # Commands that change how the host must track queues are
                # exercised elsewhere; the simple host here cannot follow them.
                if qid == 0 and cmd.opcode in UNFOLLOWABLE:
                    cmd = cmd._replace(opcode=AdminOpcode.KEEP_ALIVE)
                sent[qid].append(host.submit(qid, cmd).cid)
            host.run()
            for qid in (0, 1):
                done = host.reap(qid)
                assert sorted(c.cid for c in done) == sorted(sent[qid])
                assert all(cqe.sqid == qid for cqe in done)
            assert os.stat(ns.path).st_size == 1 << 20
            executed.append(len(drawn))
        finally:
            host.ctrl.close()
            ns.close()
            mem.close()
            os.unlink(ns.path)

    run()
    assert len(executed) >= 30  # the examples really ran commands


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


def leaves(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
    return [path]


def test_mangled_migration_state_is_rejected_or_safe(tmp_path: Path) -> None:
    """A forged state never crashes the destination: EINVAL, or a controller that still works."""
    host, ns, mem = make_host(tmp_path)
    good = host.ctrl.save_state()
    paths = leaves(good)
    junk = st.one_of(
        u64, st.integers(-5, 300), st.text(max_size=3), st.none(), st.booleans(), st.just([])
    )

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(paths), junk), min_size=1, max_size=4))
    def run(changes: list[tuple[tuple[object, ...], object]]) -> None:
        import copy

        blob = copy.deepcopy(good)
        for path, value in changes:
            target: Any = blob
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        try:
            host.ctrl.load_state(blob)
        except OSError as exc:
            assert exc.errno == 22
            return
        host.ctrl.process()  # whatever got accepted must be safe to run
        host.ctrl.kick_interrupts()

    try:
        run()
        host.ctrl.load_state(good)
        assert host.ctrl.ready
    finally:
        host.ctrl.close()
        ns.close()
        mem.close()
