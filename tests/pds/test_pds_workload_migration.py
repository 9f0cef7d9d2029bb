"""The NVMe workload migrated back and forth (20 times) between two real `mdevd serve` daemons.

Each daemon runs the seed's setup script (enable_lm, one VF bound to
pds_vfio at the same BDF); both keep the VF's namespace in one shared
backing directory, as pds VFs on two hosts reach the same storage.  The
migration is driven by hand (tests/nvme/mig_by_hand.py) over the VF sockets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mdevd_proc import Mdevd, sh
from pds_card import VF1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nvme"))
from mig_by_hand import (  # noqa: E402
    connect,
    copy_memory,
    read_stream,
    set_state,
    write_stream,
)

from mdevcore.migration.guest_memory import GuestMemory  # noqa: E402
from mdevcore.migration.workloads.nvme import NvmeWorkload  # noqa: E402
from mdevcore.pci.migration import MigState  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")

SETUP = Path(__file__).with_name("pds_setup.sh")
MDEVD = str(Path(sys.executable).with_name("mdevd"))
MIGRATIONS = 20


def start_daemon(base: Path, shared: Path) -> Mdevd:
    base.mkdir()
    d = Mdevd(base, "--pds-ns-size", "16M", "--pds-total-vfs", "1",
              "--pds-backing-dir", str(shared), builtins=True)  # fmt: skip
    r = sh(f"SYS={d.sysfs} RUN={d.run_dir} MDEVD={MDEVD} bash {SETUP}")
    if r.returncode:
        d.stop()
        raise AssertionError(r.stderr + d.stderr)
    return d


def test_workload_moves_back_and_forth_between_two_daemons(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    daemons: list[Mdevd] = []
    try:
        daemons = [start_daemon(tmp_path / name, shared) for name in ("a", "b")]
        socks = [str(d.run_dir / f"{VF1}.sock") for d in daemons]
        with GuestMemory(16 << 20, name="a") as mem_a, GuestMemory(16 << 20, name="b") as mem_b:
            mems = [mem_a, mem_b]
            devs = [connect(s, m) for s, m in zip(socks, mems, strict=True)]
            wl = NvmeWorkload(seed=11, span_bytes=8 << 20, shadow_doorbells=True)
            try:
                wl.start(devs[0], mems[0])
                wl.run_for(0.3)
                side = 0
                for _ in range(MIGRATIONS):
                    src, dst = devs[side], devs[1 - side]
                    set_state(src, MigState.RUNNING_P2P)
                    wl.run_for(0.02)
                    wl.quiesce()
                    assert set_state(src, MigState.STOP_COPY) == MigState.STOP_COPY
                    stream = read_stream(src)
                    # The previous source is in STOP: RESUMING is one arc away.
                    assert set_state(dst, MigState.RESUMING) == MigState.RESUMING
                    write_stream(dst, stream)
                    copy_memory(mems[side], mems[1 - side])
                    assert set_state(dst, MigState.RUNNING) == MigState.RUNNING
                    assert set_state(src, MigState.STOP) == MigState.STOP
                    moved = NvmeWorkload()
                    moved.restore(wl.save(), dst, mems[1 - side])
                    wl.close()
                    wl = moved
                    wl.run_for(0.1)
                    side = 1 - side
                wl.verify()
                stats = wl.stats()
            finally:
                wl.close()
                for dev in devs:
                    dev.close()
    finally:
        for d in daemons:
            d.stop()
    assert stats["mismatches"] == 0 and stats["in_flight"] == 0
    assert stats["restores"] == MIGRATIONS
    assert stats["writes"] > 200 and stats["verified_bytes"] > 1 << 20
