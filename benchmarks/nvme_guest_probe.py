"""Where a guest's queue-depth-1 NVMe read spends its time in our VF.

Boots one lab guest running fio (4 KiB random reads, QD1, libaio,
O_DIRECT) on the pds NVMe VF and times, inside the VF, what each command
costs on the connection thread: the doorbell's ``bar_write`` from entry to
the interrupt (what the guest waits for) and to its return, and the
namespace read within it.  The rest of the QD1 cycle (one command per
cycle) is the guest's and QEMU's: the interrupt's way in, the guest's
completion and next submission, the doorbell's way out.

    .venv/bin/python benchmarks/nvme_guest_probe.py [--mode trapped|mmap] [--spin-us N]

Only trapped doorbells arrive as ``bar_write``; in mmap mode the probe
still prints fio's figures and the namespace read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvme_guest import NONE, fill, guest_script, parse  # noqa: E402

SIZE_MIB = 256

SQ1_TAIL = 0x1008  # BAR0 offset of I/O SQ 1's tail doorbell
clock = time.perf_counter


class ProbedVf(PdsNvmeVf):
    """The VF, with clock readings around the doorbell and the interrupt."""

    def __init__(self, vf: VfConfig) -> None:
        super().__init__(vf)
        self.doorbells: list[tuple[float, float, float | None]] = []  # entry, irq, return
        self.reads: list[float] = []
        self._irq_at: float | None = None
        self._inner_read = self.namespace.read
        self.namespace.read = self._timed_read  # type: ignore[method-assign]

    def _timed_read(self, lba: int, views: Sequence[memoryview]) -> None:
        t0 = clock()
        self._inner_read(lba, views)
        self.reads.append(clock() - t0)

    def raise_irq(self, vector: int = 0) -> None:
        self._irq_at = clock()
        super().raise_irq(vector)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        t0 = clock()
        self._irq_at = None
        super().bar_write(bar, offset, data)
        if bar == 0 and offset == SQ1_TAIL:
            self.doorbells.append((t0, clock(), self._irq_at))


def spread(name: str, values_s: list[float]) -> str:
    if not values_s:
        return f"  {name}: none"
    us = sorted(v * 1e6 for v in values_s)
    p90 = us[int(0.9 * (len(us) - 1))]
    return f"  {name}: n={len(us)} p50 {statistics.median(us):6.0f} us  p90 {p90:6.0f} us"


async def probe(mode: DoorbellMode, seconds: int, spin_us: float | None) -> None:
    lab = Lab.ensure()
    workdir = tempfile.mkdtemp(prefix="nvme-probe-")
    try:
        backing = os.path.join(workdir, "backing.img")
        fill(backing, SIZE_MIB)
        vf = ProbedVf(VfConfig(backing=backing, size=SIZE_MIB << 20, doorbells=mode, io_queues=4))
        sock = os.path.join(workdir, "vf.sock")
        device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})
        try:
            async with trio.open_nursery() as nursery:
                server = DeviceServer(vf, sock, name="probe", spin_us=spin_us)
                await nursery.start(server.serve)
                script = guest_script(seconds, SIZE_MIB, depths=(1,))
                result = await lab.aboot(
                    script, devices=[device], timeout=300, extra_binaries=["fio"]
                )
                nursery.cancel_scope.cancel()
        finally:
            vf.close()
        qd1 = parse(result.output).get(1, NONE)
        if not qd1.iops:
            raise SystemExit(f"fio printed nothing:\n{result.output}")
        print(f"fio QD1 ({mode.value}, spin {server.spin_ns / 1000:g} us): {qd1.show()}")
        # The steady state: the last half of what the VF saw.
        dbs = vf.doorbells[len(vf.doorbells) // 2 :]
        print(spread("namespace read", vf.reads[len(vf.reads) // 2 :]))
        print(spread("SQ doorbell bar_write, entry to interrupt", [i - t for t, _, i in dbs if i]))
        print(spread("SQ doorbell bar_write, entry to return", [r - t for t, r, _ in dbs]))
        cycles = [b[0] - a[0] for a, b in zip(dbs, dbs[1:], strict=False)]
        print(spread("QD1 cycle (doorbell to doorbell)", cycles))
        print(
            spread(
                "interrupt to the next doorbell (guest and QEMU)",
                [b[0] - a[2] for a, b in zip(dbs, dbs[1:], strict=False) if a[2]],
            )
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="trapped", choices=[m.value for m in DoorbellMode])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument(
        "--spin-us", type=float, default=None, help="DeviceServer(spin_us=); default the VF's"
    )
    args = parser.parse_args()
    trio.run(probe, DoorbellMode(args.mode), args.seconds, args.spin_us)


if __name__ == "__main__":
    main()
