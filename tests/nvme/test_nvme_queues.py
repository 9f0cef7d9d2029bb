"""Queue mechanics: wrap-around, phase, full CQs, doorbells, interrupts, coalescing."""

from __future__ import annotations

import mmap

from nvme_host import FakeClock, GuestMemory, Host, status

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import AdminOpcode, FeatureId, IoOpcode, StatusType


def flush_cmd() -> object:
    return make_command(IoOpcode.FLUSH, nsid=1)


def test_wrap_around_and_phase_flip(host: Host) -> None:
    host.create_io_queue_pair(1, size=4)
    phases = []
    for _ in range(10):
        cqe = host.command(1, make_command(IoOpcode.FLUSH, nsid=1))
        assert cqe.status == 0
        phases.append(cqe.phase)
    # 4 slots: phase 1 for entries 0-3, 0 for 4-7, 1 again
    assert phases == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert cqe.sqhd == 10 % 4


def test_batch_wraps_the_submission_queue(host: Host) -> None:
    host.create_io_queue_pair(1, size=8)
    for _ in range(5):
        host.command(1, make_command(IoOpcode.FLUSH, nsid=1))
    sent = [host.submit(1, make_command(IoOpcode.FLUSH, nsid=1), ring=False).cid for _ in range(7)]
    host.ring(2, host.queues[1].sq_tail)  # one doorbell for all 7, tail now behind head
    host.run()
    done = host.reap(1)
    assert [c.cid for c in done] == sent
    assert [c.sqhd for c in done] == [6, 7, 0, 1, 2, 3, 4]


def test_full_completion_queue_stalls_until_head_moves(host: Host, ctrl: NvmeController) -> None:
    # CQ of 4 entries holds at most 3 completions; SQ of 8
    q = host.mem.alloc(4096)
    assert (
        host.admin(AdminOpcode.CREATE_IO_CQ, prp1=q, cdw10=3 << 16 | 1, cdw11=1 << 16 | 3).status
        == 0
    )
    from nvme_host import HostQueue

    hq = HostQueue(host.mem, 1, 8)
    hq.cq = q
    assert (
        host.admin(
            AdminOpcode.CREATE_IO_SQ, prp1=hq.sq, cdw10=7 << 16 | 1, cdw11=1 << 16 | 1
        ).status
        == 0
    )
    host.queues[1] = hq
    for _ in range(6):
        host.submit(1, make_command(IoOpcode.FLUSH, nsid=1), ring=False)
    host.ring(2, 6)
    host.run()
    # reap by hand: CQ has 4 slots, and phase handling needs the CQ size
    hq.size = 4
    got = host.reap(1, ring=False)
    assert len(got) == 3
    assert ctrl.sqs[1].head == 3
    host.ring(3, hq.cq_head)
    host.run()
    got = host.reap(1)
    assert len(got) == 3
    assert ctrl.sqs[1].head == 6


def test_invalid_doorbell_value_raises_error_event(io_host: Host) -> None:
    aer = io_host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    io_host.run()
    io_host.ring(2, 99)  # SQ 1 has 16 entries
    io_host.run()
    done = io_host.reap(0)
    assert [c.cid for c in done] == [aer.cid]
    assert done[0].dw0 & 0xFF07 == 0x0100  # error event, invalid doorbell write value
    # the bad value was ignored: nothing executed
    assert io_host.reap(1) == []


def test_io_queues_served_round_robin(host: Host) -> None:
    host.create_io_queue_pair(1)
    host.create_io_queue_pair(2)
    for qid in (1, 2):
        for _ in range(3):
            host.submit(qid, make_command(IoOpcode.FLUSH, nsid=1))
    order = []
    more = True
    while more:
        more = host.ctrl.process(budget=1)
        for qid in (1, 2):
            order += [qid] * len(host.reap(qid, ring=False))
    assert order == [1, 2, 1, 2, 1, 2]


def test_interrupt_vectors(host: Host, irqs: list[int]) -> None:
    assert irqs[-1:] == [0] or irqs == []  # admin completions so far used vector 0
    host.create_io_queue_pair(1, vector=3)
    host.create_io_queue_pair(2, vector=4, ien=False)
    irqs.clear()
    host.command(1, make_command(IoOpcode.FLUSH, nsid=1))
    host.command(2, make_command(IoOpcode.FLUSH, nsid=1))
    host.admin(AdminOpcode.KEEP_ALIVE)
    assert irqs == [3, 0]


def set_feature(host: Host, fid: int, value: int) -> None:
    assert host.admin(AdminOpcode.SET_FEATURES, cdw10=fid, cdw11=value).status == 0


def test_interrupt_coalescing_threshold_and_time(
    host: Host, irqs: list[int], clock: FakeClock, ctrl: NvmeController
) -> None:
    host.create_io_queue_pair(1, vector=1)
    set_feature(host, FeatureId.INTERRUPT_COALESCING, 10 << 8 | 3)  # 4 entries or 1 ms
    irqs.clear()
    for _ in range(2):
        host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
        host.run()
    assert irqs == []  # 2 pending, below threshold
    assert ctrl.next_deadline() == clock.now + 0.001
    clock.now += 0.0005
    ctrl.tick()
    assert irqs == []
    clock.now += 0.0005
    ctrl.tick()
    assert irqs == [1]
    assert len(host.reap(1)) == 2
    # 4 completions in one go reach the threshold at once
    irqs.clear()
    for _ in range(4):
        host.submit(1, make_command(IoOpcode.FLUSH, nsid=1), ring=False)
    host.ring(2, host.queues[1].sq_tail)
    host.run()
    assert irqs == [1]
    assert ctrl.next_deadline() is None
    host.reap(1)
    # admin completions are never coalesced
    irqs.clear()
    host.admin(AdminOpcode.KEEP_ALIVE)
    assert irqs == [0]
    # coalescing disabled for vector 1
    set_feature(host, FeatureId.INTERRUPT_VECTOR_CONFIG, 1 << 16 | 1)
    irqs.clear()
    host.command(1, make_command(IoOpcode.FLUSH, nsid=1))
    assert irqs == [1]


def test_controller_reset_drops_queues_and_pending_interrupts(
    host: Host, irqs: list[int], ctrl: NvmeController
) -> None:
    host.create_io_queue_pair(1)
    set_feature(host, FeatureId.INTERRUPT_COALESCING, 10 << 8 | 7)
    host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
    host.run()
    assert ctrl.next_deadline() is not None
    host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    host.write32(0x14, 0)
    assert ctrl.next_deadline() is None and not ctrl.events.requests
    assert ctrl.irq.threshold == 0
    host.enable()
    host.create_io_queue_pair(1)
    assert host.command(1, make_command(IoOpcode.FLUSH, nsid=1)).status == 0


def test_shared_doorbell_page_is_polled(tmp_path, mem: GuestMemory) -> None:  # type: ignore[no-untyped-def]
    """Mode B: the guest writes doorbells into shared memory; process() notices."""
    page = mmap.mmap(-1, 4096)
    ns = FileNamespace(tmp_path / "b.img", 1 << 20)
    irqs: list[int] = []
    try:
        view = memoryview(page)
        ctrl = NvmeController(
            mem, [ns], irqs.append, config=ControllerConfig(max_io_queues=4), doorbells=view
        )
        host = Host(ctrl, mem, shared_doorbells=view)
        host.enable()
        host.create_io_queue_pair(1)
        sent = host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
        assert int.from_bytes(page[8:12], "little") == 1  # SQ1 tail doorbell, in shared memory
        host.run()
        done = host.reap(1)
        assert [c.cid for c in done] == [sent.cid] and done[0].status == 0
        assert 1 in irqs
        # invalid value written directly: reported once, ignored
        host.ring(2, 1000)
        host.run()
        assert host.reap(1) == []
        ctrl.close()
        host.shared.release()  # type: ignore[union-attr]
        view.release()
    finally:
        ns.close()
        page.close()


def test_unknown_status_helper() -> None:
    assert status(StatusType.GENERIC, 2) == 0x4002


def test_arbitration_burst_limits_each_turn(host: Host) -> None:
    host.create_io_queue_pair(1)
    host.create_io_queue_pair(2)
    assert (
        host.admin(AdminOpcode.SET_FEATURES, cdw10=FeatureId.ARBITRATION, cdw11=1).status == 0
    )  # burst 2
    for qid in (1, 2):
        for _ in range(4):
            host.submit(qid, make_command(IoOpcode.FLUSH, nsid=1))
    host.ctrl.process(budget=6)
    # two turns of 2 for queue 1 and 2 for queue 2 ... budget 6: 1,1,2,2,1,1
    assert (len(host.reap(1)), len(host.reap(2))) == (4, 2)
    host.run()
    assert len(host.reap(2)) == 2


def test_repeated_bad_doorbells_do_not_grow_the_event_queue(io_host: Host) -> None:
    # No AER outstanding: events queue up.  A guest ringing missing queues or
    # writing bad values in a loop must not make the controller's memory grow.
    for n in range(50):
        io_host.ring(2 * 7, 1)  # SQ 7 does not exist
        io_host.ring(2, 100 + n % 2)  # SQ 1 has 16 entries; alternate bad values
        io_host.run()
    assert len(io_host.ctrl.events.queued) == 2  # invalid register, invalid value
    aer = io_host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    io_host.run()
    done = io_host.reap(0)
    assert [c.cid for c in done] == [aer.cid]
    assert done[0].dw0 & 0xFF07 == 0x0000  # error event, invalid doorbell register


def test_shared_doorbell_of_a_missing_queue_raises_invalid_doorbell_register(
    tmp_path,
    mem: GuestMemory,  # type: ignore[no-untyped-def]
) -> None:
    """Polled doorbells have no trap: the ring of a missing queue is found in memory."""
    page = mmap.mmap(-1, 4096)
    ns = FileNamespace(tmp_path / "m.img", 1 << 20)
    irqs: list[int] = []
    try:
        view = memoryview(page)
        ctrl = NvmeController(
            mem, [ns], irqs.append, config=ControllerConfig(max_io_queues=8), doorbells=view
        )
        host = Host(ctrl, mem, shared_doorbells=view)
        host.enable()
        host.create_io_queue_pair(1)
        host.create_io_queue_pair(3)  # queue 2 is a gap below the highest queue
        # a queue used and deleted leaves no stale doorbell behind
        host.create_io_queue_pair(5)
        assert host.command(5, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
        assert host.admin(AdminOpcode.DELETE_IO_SQ, cdw10=5).status == 0
        assert host.admin(AdminOpcode.DELETE_IO_CQ, cdw10=5).status == 0
        host.run()
        assert not ctrl.events.queued
        for index in (2 * 2, 2 * 2 + 1, 2 * 6, 1023):  # gap SQ/CQ, beyond, last of the page
            aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
            host.run()
            host.ring(index, 1)
            host.run()
            done = host.reap(0)
            assert [(c.cid, c.dw0) for c in done] == [(aer.cid, 0x010000)], index
            assert host.shared[index] == 0  # type: ignore[index]  # reported once, cleared
            # read the Error Information log: unmasks the next error event
            buf = mem.alloc(4096)
            cqe = host.admin(
                AdminOpcode.GET_LOG_PAGE, nsid=0xFFFFFFFF, prp1=buf, cdw10=0xF << 16 | 1
            )
            assert cqe.status == 0
        # the existing queues are unaffected
        assert host.command(3, make_command(IoOpcode.FLUSH, nsid=1)).status == 0
        ctrl.close()
        host.shared.release()  # type: ignore[union-attr]
        view.release()
    finally:
        ns.close()
        page.close()
