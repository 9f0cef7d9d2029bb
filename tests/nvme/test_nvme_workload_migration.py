"""The NVMe workload migrated by hand between two served pds VFs, and exact dirty logging.

Both VFs open the same backing file (namespace data is on shared storage);
guest memory is copied page by page, device state moves over MIG_DATA.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mig_by_hand import (
    connect,
    copy_memory,
    get_state,
    logging_report,
    logging_start,
    logging_stop,
    read_stream,
    serve_vfs,
    set_state,
    write_stream,
)

from mdevcore.migration.guest_memory import PAGE_SIZE
from mdevcore.migration.guest_memory import GuestMemory as VmMemory
from mdevcore.migration.workloads.nvme import SAVE_MAGIC, NvmeWorkload, WorkloadMismatch
from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.pci.migration import MigState
from mdevcore.vfio_user.client import VfioUserError

NS_BYTES = 16 << 20
MEM_BYTES = 16 << 20


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nvwl-")  # short: UNIX socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


def vf_config(workdir: str, **changes: object) -> VfConfig:
    fields: dict[str, Any] = {"backing": Path(workdir) / "shared.img", "size": NS_BYTES}
    fields.update(changes)
    return VfConfig(**fields)  # type: ignore[arg-type]


def pending_in_device(vf: PdsNvmeVf) -> int:
    """Commands rung (doorbell latched) that the controller has not fetched."""
    ctrl = vf.controller
    total = 0
    for sq in ctrl.sqs.values():
        tail = ctrl.doorbells[2 * sq.qid]
        total += (tail - sq.head) % sq.size
    return total


def memory_digest(mem: VmMemory) -> bytes:
    return hashlib.blake2b(mem.mem).digest()


def migrate_under_load(
    src_vf: PdsNvmeVf, src_path: str, dst_path: str, shadow: bool
) -> dict[str, Any]:
    """Run, switch to the destination mid-flight, continue there, verify."""
    facts: dict[str, Any] = {}
    with VmMemory(MEM_BYTES) as src_mem, VmMemory(MEM_BYTES) as dst_mem:
        src = connect(src_path, src_mem)
        dst = connect(dst_path, dst_mem)
        wl = NvmeWorkload(span_bytes=8 << 20, seed=7, shadow_doorbells=shadow)
        wl2 = NvmeWorkload()
        try:
            wl.start(src, src_mem)
            facts["queues"] = len(wl.ioqs)
            facts["mapped"] = wl.regs.doorbells_mapped
            wl.run_for(0.4)
            # The VMM stops the device's DMA first (P2P), vCPUs keep running
            # briefly: what they ring now is latched by the device, not run.
            assert set_state(src, MigState.RUNNING_P2P) == MigState.RUNNING_P2P
            wl.run_for(0.05)
            wl.quiesce()
            facts["latched"] = pending_in_device(src_vf)
            facts["in_flight"] = wl.stats()["in_flight_at_quiesce"]
            assert set_state(src, MigState.STOP_COPY) == MigState.STOP_COPY
            stream = read_stream(src)
            facts["state_bytes"] = len(stream)
            before = memory_digest(src_mem)
            time.sleep(0.05)
            facts["source_quiet"] = memory_digest(src_mem) == before  # no DMA after STOP
            assert set_state(dst, MigState.RESUMING) == MigState.RESUMING
            write_stream(dst, stream)
            copy_memory(src_mem, dst_mem)
            assert set_state(dst, MigState.RUNNING) == MigState.RUNNING
            assert set_state(src, MigState.STOP) == MigState.STOP
            wl2.restore(wl.save(), dst, dst_mem)
            wl2.run_for(0.4)
            wl2.verify()
            facts["stats"] = wl2.stats()
        finally:
            wl.close()
            wl2.close()
            src.close()
            dst.close()
    return facts


@pytest.mark.parametrize("shadow", [False, True], ids=["mmio", "shadow"])
@pytest.mark.parametrize("mode", [DoorbellMode.TRAPPED, DoorbellMode.MMAP], ids=lambda m: m.value)
async def test_workload_migrates_with_commands_in_flight(
    workdir: str, shadow: bool, mode: DoorbellMode
) -> None:
    configs = [vf_config(workdir, doorbells=mode), vf_config(workdir, doorbells=mode)]
    async with serve_vfs(workdir, configs) as [(src_vf, src_path), (_dst_vf, dst_path)]:
        facts = await trio.to_thread.run_sync(
            migrate_under_load, src_vf, src_path, dst_path, shadow
        )
    assert facts["queues"] == 16
    assert facts["mapped"] is (mode is DoorbellMode.MMAP)
    assert facts["in_flight"] > 0  # completions not reaped, or not even executed
    assert facts["latched"] > 0  # rung in RUNNING_P2P: executed only by the destination
    assert facts["source_quiet"] is True
    stats = facts["stats"]
    assert isinstance(stats, dict)
    assert stats["mismatches"] == 0 and stats["in_flight"] == 0
    assert stats["restores"] == 1
    assert stats["writes"] > 100 and stats["verified_bytes"] > 1 << 20


def edit_state(blob: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    """The workload's saved state with its JSON header changed by ``change``."""
    start = len(SAVE_MAGIC) + 4
    (length,) = struct.unpack_from("<I", blob, len(SAVE_MAGIC))
    head = json.loads(blob[start : start + length])
    change(head)
    raw = json.dumps(head).encode()
    return SAVE_MAGIC + struct.pack("<I", len(raw)) + raw + blob[start + length :]


def roll_back(src_vf: PdsNvmeVf, path: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with VmMemory(MEM_BYTES) as mem:
        dev = connect(path, mem)
        wl = NvmeWorkload(seed=3)  # asks for 16 queues; the VF has 4
        try:
            wl.start(dev, mem)
            facts["queues"] = len(wl.ioqs)
            wl.run_for(0.2)
            set_state(dev, MigState.RUNNING_P2P)
            wl.run_for(0.05)
            wl.quiesce()
            facts["latched"] = pending_in_device(src_vf)
            set_state(dev, MigState.STOP_COPY)
            facts["stream"] = len(read_stream(dev))
            # The destination failed: back to RUNNING, the latched doorbells run now.
            facts["back"] = set_state(dev, MigState.RUNNING)
            wl.resume()
            wl.run_for(0.2)
            wl.verify()
            facts["pending_after"] = pending_in_device(src_vf)
            facts["stats"] = wl.stats()
            # The check can fail: one journaled block changed behind the driver's back.
            lba = next(i for i, g in enumerate(wl.journal.generations) if g)
            with open(src_vf.vf.backing, "r+b") as f:
                f.seek(lba * wl.lba_size)
                f.write(b"\xee" * wl.lba_size)
            with pytest.raises(WorkloadMismatch) as info:
                wl.verify()
            facts["caught"] = f"LBA {lba}:" in str(info.value)
            # The driver state from a stream is checked before anything is used.
            blob = wl.save()
            refused = []
            for bad in (
                blob[:-4],  # truncated journal
                b"junk",
                blob[:20] + b"[" * 50_000,
                edit_state(blob, lambda h: h.update(depth=99)),
                edit_state(blob, lambda h: h["inflight"].append([1, 0, 1, 0, 1, 1, 1.5])),
                edit_state(blob, lambda h: h["queues"][0].__setitem__(1, mem.end)),
                edit_state(blob, lambda h: h.update(slot_base=mem.end - PAGE_SIZE)),
            ):
                with pytest.raises(ValueError):
                    NvmeWorkload().restore(bad, dev, mem)
                refused.append(bad[:8])
            same = NvmeWorkload()
            same.restore(edit_state(blob, lambda h: None), dev, mem)  # the edit alone is fine
            same.close()
            facts["refused"] = len(refused)
        finally:
            wl.close()
            dev.close()
    return facts


async def test_rolled_back_migration_resumes_on_the_source(workdir: str) -> None:
    async with serve_vfs(workdir, [vf_config(workdir, io_queues=4)]) as [(vf, path)]:
        facts = await trio.to_thread.run_sync(roll_back, vf, path)
    assert facts["queues"] == 4  # what Set Features and MSI-X allow
    assert facts["latched"] > 0 and facts["stream"] > 0
    assert facts["back"] == MigState.RUNNING
    assert facts["caught"] is True
    assert facts["refused"] == 7
    assert facts["pending_after"] == 0
    stats = facts["stats"]
    assert isinstance(stats, dict)
    assert stats["mismatches"] == 0 and stats["reads"] > 0


MISMATCHES = {
    "namespace size": {"size": NS_BYTES // 2},
    "LBA format": {"lba_size": 4096},
    "queue entries": {"queue_entries": 512},
    "I/O queues": {"io_queues": 8},
}


def refuse(served: list[tuple[PdsNvmeVf, str]]) -> dict[str, Any]:
    (_, src_path), *dsts = served
    results: dict[str, Any] = {}
    with VmMemory(MEM_BYTES) as mem:
        src = connect(src_path, mem)
        wl = NvmeWorkload(queues=4, seed=5)
        try:
            wl.start(src, mem)
            wl.run_for(0.05)
            wl.quiesce()
            set_state(src, MigState.STOP_COPY)
            stream = read_stream(src)
        finally:
            wl.close()
            src.close()
        for name, (dst_vf, dst_path) in zip(MISMATCHES, dsts, strict=True):
            dst = connect(dst_path, mem)
            try:
                set_state(dst, MigState.RESUMING)
                write_stream(dst, stream)
                try:
                    set_state(dst, MigState.RUNNING)
                    results[name] = "accepted"
                except VfioUserError as exc:
                    results[name] = (
                        exc.errno,
                        get_state(dst),
                        dst_vf.controller.ready or bool(dst_vf.controller.sqs),
                    )
                dst.reset()
                results[name + " after reset"] = get_state(dst)
            finally:
                dst.close()
    return results


async def test_destination_refuses_an_incompatible_state(workdir: str) -> None:
    configs = [vf_config(workdir)] + [
        vf_config(workdir, backing=Path(workdir) / f"other{i}.img", **change)
        for i, change in enumerate(MISMATCHES.values())
    ]
    async with serve_vfs(workdir, configs) as served:
        results = await trio.to_thread.run_sync(refuse, served)
    for name in MISMATCHES:
        # EINVAL, still RESUMING, and nothing of the source's state taken.
        assert results[name] == (errno.EINVAL, MigState.RESUMING, False), name
        assert results[name + " after reset"] == MigState.RUNNING, name


def dirty_property(paths: list[str]) -> int:
    examples = 0

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        queues=st.integers(1, 4),
        depth=st.integers(1, 8),
        seed=st.integers(0, 1 << 32),
        write_ratio=st.floats(0.0, 1.0),
        seconds=st.floats(0.01, 0.08),
        base=st.sampled_from([0, 1 << 30]),
        shadow=st.booleans(),
        vf=st.sampled_from([0, 1]),  # trapped or mmapped doorbells
    )
    def prop(
        queues: int,
        depth: int,
        seed: int,
        write_ratio: float,
        seconds: float,
        base: int,
        shadow: bool,
        vf: int,
    ) -> None:
        nonlocal examples
        examples += 1
        with VmMemory(2 << 20, base=base) as mem:
            dev = connect(paths[vf], mem)
            wl = NvmeWorkload(queues=queues, depth=depth, seed=seed, write_ratio=write_ratio,
                              span_bytes=2 << 20, shadow_doorbells=shadow)  # fmt: skip
            try:
                dev.reset()
                wl.start(dev, mem)
                wl.take_device_pages()  # bring-up (Identify, queue creation) is not logged
                logging_start(dev, [(mem.base, mem.size)])
                wl.run_for(seconds)
                wl.quiesce()
                wl.drain()
                reported = logging_report(dev, mem.base, mem.size)
                expected = wl.take_device_pages()
                assert reported == expected, (
                    f"extra {sorted(reported - expected)[:8]} missing "
                    f"{sorted(expected - reported)[:8]}"
                )
                assert expected  # CQ entries at least
                # Reported pages were cleared.  With shadow doorbells the
                # controller may still publish EventIdx once more after its
                # next look at the shadow CQ heads (asynchronously, after
                # drain() returned): that page, and only that one, may recur.
                again = logging_report(dev, mem.base, mem.size)
                assert again <= ({wl.eventidx_page // PAGE_SIZE} if shadow else set()), again
                assert wl.stats()["mismatches"] == 0
                logging_stop(dev)
                mem.unmap_from(dev)
            finally:
                wl.close()
                dev.close()

    prop()
    return examples


async def test_dirty_report_is_exactly_what_the_device_wrote(workdir: str) -> None:
    configs = [
        vf_config(workdir, size=4 << 20),
        vf_config(workdir, size=4 << 20, doorbells=DoorbellMode.MMAP),
    ]
    async with serve_vfs(workdir, configs) as served:
        examples = await trio.to_thread.run_sync(dirty_property, [path for _, path in served])
    assert examples >= 25
