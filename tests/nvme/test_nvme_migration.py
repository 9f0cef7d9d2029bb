"""Live migration: controller state moves to a fresh controller / VF and I/O continues."""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from nvme_host import NS_SIZE, PAGE, FakeClock, GuestMemory, Host, VfHost

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import AdminOpcode, FeatureId, IoOpcode, LogId
from mdevcore.parents.pds.vf import STATE_MAGIC, PdsNvmeVf, VfConfig
from mdevcore.pci import caps
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping

CONFIG = ControllerConfig(max_io_queues=8, max_queue_entries=256, mdts=5)


def new_controller(
    mem: GuestMemory, ns: FileNamespace, irqs: list[int], clock: FakeClock
) -> NvmeController:
    return NvmeController(mem, [ns], irqs.append, config=CONFIG, clock=clock, irq_vectors=lambda: 9)


def busy_source(host: Host) -> tuple[int, list[int]]:
    """A controller mid-flight: wrapped queues, features set, a held AER, rung-but-unrun I/O."""
    host.create_io_queue_pair(1, size=8)
    assert (
        host.admin(
            AdminOpcode.SET_FEATURES, cdw10=FeatureId.INTERRUPT_COALESCING, cdw11=0x0102
        ).status
        == 0
    )
    buf = host.mem.alloc(PAGE)
    host.mem.write(buf, b"\x42" * PAGE)
    for i in range(11):  # wraps the 8-entry queues once
        assert (
            host.command(
                1, make_command(IoOpcode.WRITE, nsid=1, prp1=buf, cdw10=8 * i, cdw12=7)
            ).status
            == 0
        )
    assert host.admin(0x7F).status != 0  # one error log entry
    aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    pending = [
        host.submit(1, make_command(IoOpcode.READ, nsid=1, prp1=host.mem.alloc(PAGE), cdw12=7)).cid
        for _ in range(2)
    ]
    return aer.cid, pending  # the source stops before executing these


def test_controller_state_moves_and_io_continues(
    tmp_path: Path, mem: GuestMemory, clock: FakeClock
) -> None:
    src_irqs: list[int] = []
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    src = new_controller(mem, ns, src_irqs, clock)
    host = Host(src, mem)
    host.enable()
    aer_cid, pending = busy_source(host)
    blob = json.loads(json.dumps(src.save_state()))  # what travels is plain JSON
    src.close()

    dst_irqs: list[int] = []
    dst = new_controller(mem, ns, dst_irqs, clock)
    dst.load_state(blob)
    host.ctrl = dst
    assert dst.ready and set(dst.sqs) == {0, 1}
    dst.kick_interrupts()  # nothing unconsumed yet: no spurious interrupt needed
    assert dst_irqs == []
    host.run()
    done = host.reap(1)
    assert [c.cid for c in done] == pending and all(c.status == 0 for c in done)
    assert done[-1].sqhd == 13 % 8  # the SQ head continued from the source
    # the held AER completes on the destination when an event happens
    host.ring(2 * 7, 1)
    host.run()
    assert [c.cid for c in host.reap(0)] == [aer_cid]
    # features, error log and SMART counters came along
    cqe = host.admin(AdminOpcode.GET_FEATURES, cdw10=FeatureId.INTERRUPT_COALESCING)
    assert cqe.dw0 == 0x0102
    log = mem.alloc(PAGE)
    assert (
        host.admin(AdminOpcode.GET_LOG_PAGE, prp1=log, cdw10=(127 << 16) | LogId.SMART).status == 0
    )
    assert int.from_bytes(mem.read(log + 80, 16), "little") == 11  # host write commands
    dst.close()
    ns.close()


def test_unconsumed_completions_get_an_interrupt_after_restore(
    tmp_path: Path, mem: GuestMemory, clock: FakeClock
) -> None:
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    src = new_controller(mem, ns, [], clock)
    host = Host(src, mem)
    host.enable()
    host.create_io_queue_pair(1, vector=3)
    host.submit(1, make_command(IoOpcode.FLUSH, nsid=1))
    host.run()  # completed, but the host has not looked yet
    blob = src.save_state()
    src.close()
    irqs: list[int] = []
    dst = new_controller(mem, ns, irqs, clock)
    dst.load_state(blob)
    dst.kick_interrupts()
    assert irqs == [3]
    host.ctrl = dst
    assert len(host.reap(1)) == 1
    dst.close()
    ns.close()


def tamper(blob: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(blob)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["version"], 99),
        (["namespaces", 0, 0], 7),  # different namespace size
        (["sqs", 1, 0], 200),  # SQ id beyond the allocated queues
        (["sqs", 1, 4], 8),  # head == size
        (["cqs", 1, 3], 50),  # interrupt vector beyond the table
        (["cqs", 1, 7], 2),  # phase
        (["sqs", 1, 3], 5),  # SQ bound to a missing CQ
        (["regs", 5], 12345),  # page size
        (["events", "requests"], list(range(10))),  # more AERs than AERL allows
        (["doorbells"], {"4000": 1}),
        (["regs", 0], "x"),
    ],
)
def test_bad_state_is_rejected_and_changes_nothing(
    tmp_path: Path, mem: GuestMemory, clock: FakeClock, path: list[Any], value: Any
) -> None:
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    src = new_controller(mem, ns, [], clock)
    host = Host(src, mem)
    host.enable()
    host.create_io_queue_pair(1, size=8)
    blob = src.save_state()
    src.close()
    dst = new_controller(mem, ns, [], clock)
    with pytest.raises(OSError) as info:
        dst.load_state(tamper(blob, path, value))
    assert info.value.errno == errno.EINVAL
    assert not dst.ready and not dst.sqs
    dst.load_state(blob)  # the untampered state still loads
    assert dst.ready
    dst.close()
    ns.close()


# --- the VF, through the PCI device's migration state machine --------------------


class MigratingVfHost(VfHost):
    """Processes only while the VF runs, as the VF's own run() task would."""

    def run(self) -> None:
        if self.vf.mig_state in (MigState.RUNNING, MigState.RUNNING_P2P):
            while self.vf.controller.process():
                pass


def make_vf(path: Path, mem: GuestMemory) -> PdsNvmeVf:
    vf = PdsNvmeVf(VfConfig(backing=path, size=NS_SIZE, io_queues=4))
    rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
    vf.dma_map(DmaMapping(address=mem.base, size=mem.size, flags=rw, fd=mem.fd, offset=0))
    return vf


def test_vf_migrates_through_stop_copy_and_resuming(tmp_path: Path, mem: GuestMemory) -> None:
    backing = tmp_path / "vf.img"
    src = make_vf(backing, mem)
    dst = make_vf(backing, mem)
    try:
        assert src.migration_flags & 0x3 == 0x3  # STOP_COPY | P2P, like pds
        msix = src.msix
        assert msix is not None
        ctl = src.config.get_u16(msix.offset + caps.MSIX_FLAGS)
        src.region_write(
            7, msix.offset + caps.MSIX_FLAGS, (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little")
        )
        host = MigratingVfHost(src, mem)
        host.enable()
        host.create_io_queue_pair(1, size=8, vector=2)
        buf = mem.alloc(PAGE)
        mem.write(buf, os.urandom(PAGE))
        assert (
            host.command(
                1, make_command(IoOpcode.WRITE, nsid=1, prp1=buf, cdw10=64, cdw12=7)
            ).status
            == 0
        )
        src.set_migration_state(MigState.STOP)
        late = host.submit(
            1, make_command(IoOpcode.READ, nsid=1, prp1=mem.alloc(PAGE), cdw10=64, cdw12=7)
        )
        host.run()
        assert host.reap(1) == []  # stopped: the doorbell is recorded, nothing executes
        src.set_migration_state(MigState.STOP_COPY)
        stream = b""
        while chunk := src.mig_data_read(4096):
            stream += chunk
        src.set_migration_state(MigState.STOP)

        dst.set_migration_state(MigState.RESUMING)
        dst.mig_data_write(stream)
        dst.set_migration_state(MigState.RUNNING)
        # config space came along: MSI-X is enabled on the destination too
        assert dst.config.get_u16(msix.offset + caps.MSIX_FLAGS) & caps.MSIX_FLAGS_ENABLE
        host.vf, host.ctrl = dst, dst.controller
        host.run()
        done = host.reap(1)
        assert [c.cid for c in done] == [late.cid] and done[0].status == 0
        assert host.read32(0x1C) & 1  # CSTS.RDY
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize(
    "data",
    [b"not a state at all", STATE_MAGIC + b"[" * 100_000],  # the second nests too deep
)
def test_vf_rejects_foreign_state(tmp_path: Path, mem: GuestMemory, data: bytes) -> None:
    vf = make_vf(tmp_path / "vf.img", mem)
    try:
        vf.set_migration_state(MigState.RESUMING)
        vf.mig_data_write(data)
        with pytest.raises(OSError) as info:
            vf.set_migration_state(MigState.STOP)
        assert info.value.errno == errno.EINVAL
        assert vf.mig_state == MigState.RESUMING  # rejected, not broken
    finally:
        vf.close()


def test_error_log_keeps_its_order(tmp_path: Path, mem: GuestMemory, clock: FakeClock) -> None:
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    src = new_controller(mem, ns, [], clock)
    for cid in (1, 2, 3):
        src.error_log.record(0, cid, 0x2)
    blob = json.loads(json.dumps(src.save_state()))
    dst = new_controller(mem, ns, [], clock)
    dst.load_state(blob)
    assert [e.cid for e in dst.error_log.entries] == [3, 2, 1]  # newest first, as on the source
    assert dst.error_log.page() == src.error_log.page()
    src.close()
    dst.close()
    ns.close()


def test_vf_keeps_client_programmed_msix_masks_across_migration(
    tmp_path: Path, mem: GuestMemory
) -> None:
    """A client that programs the MSI-X table through the BAR keeps its masks on the destination."""
    backing = tmp_path / "vf.img"
    src = make_vf(backing, mem)
    dst = make_vf(backing, mem)
    efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    try:
        msix = src.msix
        assert msix is not None
        ctl = src.config.get_u16(msix.offset + caps.MSIX_FLAGS)
        src.region_write(
            7, msix.offset + caps.MSIX_FLAGS, (ctl | caps.MSIX_FLAGS_ENABLE).to_bytes(2, "little")
        )
        # Vector 0 unmasked, vector 1 masked, written through BAR4 (the table).
        src.region_write(4, 0 * caps.MSIX_ENTRY_SIZE + 12, (0).to_bytes(4, "little"))
        src.region_write(4, 1 * caps.MSIX_ENTRY_SIZE + 12, (1).to_bytes(4, "little"))
        src.set_migration_state(MigState.STOP_COPY)
        stream = b""
        while chunk := src.mig_data_read(4096):
            stream += chunk
        dst.set_migration_state(MigState.RESUMING)
        dst.mig_data_write(stream)
        dst.set_migration_state(MigState.RUNNING)
        trigger = 1 << 2 | 1 << 5  # DATA_EVENTFD | ACTION_TRIGGER
        dst.set_irqs(2, trigger, 0, 2, b"", efds)
        assert dst.trigger(2, 0) is True
        assert dst.trigger(2, 1) is False  # masked by the migrated table: pending instead
        pba = dst.region_read(4, 0x2000, 8)
        assert int.from_bytes(pba, "little") & 0b10
    finally:
        src.close()
        dst.close()
        for fd in efds:
            os.close(fd)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_io_queues": 4},
        {"max_queue_entries": 128},
        {"mdts": 4},
    ],
)
def test_controller_with_other_limits_refuses_the_state(
    tmp_path: Path, mem: GuestMemory, clock: FakeClock, limits: dict[str, int]
) -> None:
    """The host read CAP.MQES, MDTS and the queue count: a destination must show the same."""
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    src = new_controller(mem, ns, [], clock)
    host = Host(src, mem)
    host.enable()
    blob = src.save_state()
    src.close()
    other = dataclasses.replace(CONFIG, **limits)  # type: ignore[arg-type]
    irqs: list[int] = []
    dst = NvmeController(mem, [ns], irqs.append, config=other, clock=clock, irq_vectors=lambda: 9)
    with pytest.raises(OSError) as info:
        dst.load_state(blob)
    assert info.value.errno == errno.EINVAL
    assert not dst.ready and not dst.sqs  # left as it was
    dst.close()
    ns.close()


def test_controller_latches_doorbells_while_dma_is_forbidden(
    tmp_path: Path, mem: GuestMemory, clock: FakeClock
) -> None:
    """may_dma False (the VF in RUNNING_P2P/STOP): doorbells and events wait, no byte moves."""
    allowed = [True]
    ns = FileNamespace(tmp_path / "ns.img", NS_SIZE)
    irqs: list[int] = []
    ctrl = NvmeController(mem, [ns], irqs.append, config=CONFIG, clock=clock,
                          irq_vectors=lambda: 9, may_dma=lambda: allowed[0])  # fmt: skip
    host = Host(ctrl, mem)
    host.enable()
    host.create_io_queue_pair(1, size=8)
    aer = host.submit(0, make_command(AdminOpcode.ASYNC_EVENT_REQUEST))
    host.run()
    allowed[0] = False
    buf = mem.alloc(PAGE)
    cmd = host.submit(1, make_command(IoOpcode.READ, nsid=1, prp1=buf, cdw12=7))
    host.ring(2 * 7, 1)  # a doorbell for a missing queue: an AER-worthy error
    before = mem.read(mem.base, mem.size)
    host.run()
    assert mem.read(mem.base, mem.size) == before  # no DMA at all
    assert host.reap(1) == [] and host.reap(0) == []
    allowed[0] = True
    host.run()
    assert [c.cid for c in host.reap(1)] == [cmd.cid]
    assert [c.cid for c in host.reap(0)] == [aer.cid]
    ctrl.close()
    ns.close()
