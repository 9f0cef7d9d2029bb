"""In-process cost of the NVMe controller: 4 KiB random reads/writes per second.

No QEMU, no socket: a memfd mapped through the device's real DmaTable plays
guest memory, a minimal host driver fills the submission queue and rings
the doorbell through ``mmio_write`` (with shadow doorbells configured as a
Linux guest does, unless ``--no-shadow``), the controller executes against
a file-backed namespace and signals an eventfd as its interrupt.  Prints
IOPS and microseconds per command at queue depth 1 and 32, and at depth 1
the doorbell-to-interrupt latency (p50/p99): the part of a guest's QD1
round trip the controller owns, split on the C path into the time inside
the C call (``nf_run``: fetch, checks, the transfer, the completion) and
the Python around it (the doorbell write, the shadow doorbell and
EventIdx, the interrupt decision).  It runs twice, with the C read/write
path (mdevcore.nvme.fastio) and with every command in Python, and prints
the ratios.  Compare with the socket round trip
(benchmarks/vfio_user_rtt.py) and the guest-level figures of
benchmarks/nvme_guest.py.

    .venv/bin/python benchmarks/nvme_controller.py [--seconds 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import struct
import tempfile
import time

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController, fastio
from mdevcore.nvme.queues import make_command
from mdevcore.nvme.spec import (
    CC_EN,
    DOORBELL_BASE,
    REG_ACQ,
    REG_AQA,
    REG_ASQ,
    REG_CC,
    AdminOpcode,
    IoOpcode,
)
from mdevcore.pci.dma import DmaTable
from mdevcore.vfio_user.backend import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DmaMapping

PAGE = 4096
BASE = 0x100000


class Memory:
    """Guest memory: a memfd the host side mmaps, DMA_MAP'ed into a DmaTable."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("bench-guest")
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.size = size
        self.next = BASE
        self.table = DmaTable()
        self.table.map(DmaMapping(BASE, size, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, self.fd, 0))

    def alloc(self, size: int) -> int:
        addr = self.next
        self.next += -(-size // PAGE) * PAGE
        return addr


class _TimedLib:
    """The C extension's functions, with the time spent in ``nf_run`` added up."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.ns = 0

    def nf_run(self, *args: object) -> int:
        t0 = time.perf_counter_ns()
        done: int = self._lib.nf_run(*args)  # type: ignore[attr-defined]
        self.ns += time.perf_counter_ns() - t0
        return done

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)


class Bench:
    def __init__(
        self, directory: str, ns_bytes: int, direct: bool, shadow: bool, fast_io: bool = True
    ) -> None:
        self.mem = Memory(64 << 20)
        self.ns = FileNamespace(os.path.join(directory, "bench.img"), ns_bytes, direct=direct)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irq_at = 0
        self.ctrl = NvmeController(
            self.mem.table,
            [self.ns],
            self._irq,
            config=ControllerConfig(max_io_queues=2),
            fast_io=fast_io,
        )
        fast = self.ctrl.fast_io
        self.timed: _TimedLib | None = None
        if fast is not None:
            self.timed = _TimedLib(fast._lib)
            fast._lib = self.timed
        self.depth = 64
        asq, acq = self.mem.alloc(PAGE), self.mem.alloc(PAGE)
        self.w32(REG_AQA, 15 << 16 | 15)
        self.ctrl.mmio_write(REG_ASQ, struct.pack("<Q", asq))
        self.ctrl.mmio_write(REG_ACQ, struct.pack("<Q", acq))
        self.w32(REG_CC, CC_EN | 6 << 16 | 4 << 20)
        self.sq, self.cq = self.mem.alloc(self.depth * 64), self.mem.alloc(self.depth * 16)
        self.admin = [(asq, acq)]
        self._admin(
            asq,
            0,
            make_command(
                AdminOpcode.CREATE_IO_CQ,
                cid=1,
                prp1=self.cq,
                cdw10=(self.depth - 1) << 16 | 1,
                cdw11=3,
            ),
        )
        self._admin(
            asq,
            1,
            make_command(
                AdminOpcode.CREATE_IO_SQ,
                cid=2,
                prp1=self.sq,
                cdw10=(self.depth - 1) << 16 | 1,
                cdw11=1 << 16 | 1,
            ),
        )
        self.shadow = 0
        if shadow:
            # Doorbell Buffer Config: a shadow doorbell page and an EventIdx page.
            self.shadow, eventidx = self.mem.alloc(PAGE), self.mem.alloc(PAGE)
            cmd = make_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, cid=3, prp1=self.shadow,
                               prp2=eventidx)  # fmt: skip
            self._admin(asq, 2, cmd)
        self.tail = self.head = 0
        self.buffers = [self.mem.alloc(PAGE) for _ in range(self.depth)]
        self.nlbas = ns_bytes // 512

    def _irq(self, vector: int) -> None:
        os.eventfd_write(self.irq_fd, 1)  # what an MSI-X trigger costs the device
        self.irq_at = time.perf_counter_ns()

    def ring(self, index: int, value: int) -> None:
        """An I/O queue doorbell as Linux rings it: the shadow, then MMIO (EventIdx says when)."""
        if self.shadow:
            struct.pack_into("<I", self.mem.mm, self.shadow - BASE + 4 * index, value)
        self.w32(DOORBELL_BASE + 4 * index, value)

    def w32(self, off: int, value: int) -> None:
        self.ctrl.mmio_write(off, struct.pack("<I", value))

    def _admin(self, asq: int, slot: int, cmd: object) -> None:
        off = asq - BASE + slot * 64
        self.mem.mm[off : off + 64] = cmd.encode()  # type: ignore[attr-defined]
        self.w32(DOORBELL_BASE, slot + 1)
        self.ctrl.process()

    def run(self, opcode: int, qd: int, seconds: float) -> tuple[int, float, list[int], list[int]]:
        """Commands done, seconds taken, per batch the doorbell-to-interrupt ns
        and of it the ns inside the C call (empty on the Python path)."""
        rng = random.Random(1)
        done = 0
        latencies = []
        in_c: list[int] = []
        timed = self.timed
        start = time.perf_counter()
        end = start + seconds
        sq_off, cq_off = self.sq - BASE, self.cq - BASE
        phase: int = getattr(self, "phase", 1)
        while True:
            for i in range(qd):
                slba = rng.randrange(self.nlbas // 8) * 8
                cmd = make_command(
                    opcode, cid=i + 1, nsid=1, prp1=self.buffers[i], cdw10=slba, cdw12=7
                )
                o = sq_off + self.tail * 64
                self.mem.mm[o : o + 64] = cmd.encode()
                self.tail = (self.tail + 1) % self.depth
            if timed is not None:
                timed.ns = 0
            rung = time.perf_counter_ns()
            self.ring(2, self.tail)
            while self.ctrl.process():
                pass
            latencies.append(self.irq_at - rung)
            if timed is not None:
                in_c.append(timed.ns)
            for _ in range(qd):
                o = cq_off + self.head * 16
                assert self.mem.mm[o + 14] & 1 == phase, "missing completion"
                self.head += 1
                if self.head == self.depth:
                    self.head, phase = 0, phase ^ 1
            self.ring(3, self.head)
            done += qd
            now = time.perf_counter()
            if now >= end:
                self.phase = phase
                return done, now - start, latencies, in_c

    def close(self) -> None:
        self.ctrl.close()
        self.ns.close()
        self.mem.table.clear()
        self.mem.mm.close()
        os.close(self.mem.fd)
        os.close(self.irq_fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--dir", default=None, help="directory for the backing file (default: a temp dir)"
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--buffered", action="store_true", help="no O_DIRECT: page-cache speed")
    parser.add_argument("--no-shadow", action="store_true", help="every doorbell trapped")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        # fill the file so reads hit real blocks, not holes
        with open(os.path.join(d, "bench.img"), "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(chunk)
        paths = [("C", True), ("Python", False)] if fastio.load() else [("Python", False)]
        results: dict[str, dict[str, float]] = {}
        for label, fast in paths:
            bench = Bench(
                d, args.size_mib << 20, direct=not args.buffered, shadow=not args.no_shadow,
                fast_io=fast,
            )  # fmt: skip
            try:
                print(
                    f"{label} path: backing file {args.size_mib} MiB, "
                    f"O_DIRECT={bench.ns.direct}, "
                    f"shadow doorbells {'off' if args.no_shadow else 'on'}"
                )
                results[label] = measure(bench, args.seconds)
            finally:
                bench.close()
        if len(results) == 2:
            print("C / Python:")
            for key, value in results["C"].items():
                print(f"  {key:22s} {value / results['Python'][key]:5.2f}x")


def measure(bench: Bench, seconds: float) -> dict[str, float]:
    """Print and return IOPS per workload, and QD1's doorbell-to-interrupt p50."""
    out = {}
    for name, opcode in (("randread", IoOpcode.READ), ("randwrite", IoOpcode.WRITE)):
        for qd in (1, 32):
            n, elapsed, lat, in_c = bench.run(opcode, qd, seconds)
            iops, us = n / elapsed, elapsed / n * 1e6
            line = f"{name:9s} 4k qd{qd:<2d}: {iops:9.0f} IOPS  {us:7.1f} us/cmd"
            out[f"{name} qd{qd} IOPS"] = iops
            split = ""
            if qd == 1:
                if in_c:  # per batch, before the latencies are sorted
                    around = sorted(t - c for t, c in zip(lat, in_c, strict=True))
                    in_c.sort()
                    split = (
                        f"\n{'':30s}of it in C (nf_run) p50 {in_c[len(in_c) // 2] / 1e3:6.1f}"
                        f" us, Python around it p50 {around[len(around) // 2] / 1e3:6.1f} us"
                    )
                lat.sort()
                p50, p99 = lat[len(lat) // 2] / 1e3, lat[len(lat) * 99 // 100] / 1e3
                line += f"  doorbell->irq p50 {p50:6.1f} us  p99 {p99:6.1f} us{split}"
                out[f"{name} qd1 irq p50"] = p50
            print(line, flush=True)
    return out


if __name__ == "__main__":
    main()
