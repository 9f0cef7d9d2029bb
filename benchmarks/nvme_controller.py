"""In-process cost of the NVMe controller: 4 KiB random reads/writes per second.

No QEMU, no socket: a memfd plays guest memory, a minimal host driver fills
the submission queue and rings the doorbell through ``mmio_write``, the
controller executes against a file-backed namespace.  Prints IOPS and
microseconds per command at queue depth 1 and 32, so the Python cost of one
command can be compared with the socket round trip (benchmarks/vfio_user_rtt.py) and with the
guest-level figures of benchmarks/nvme_guest.py.

    .venv/bin/python benchmarks/nvme_controller.py [--seconds 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import random
import struct
import tempfile
import time

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController
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

PAGE = 4096
BASE = 0x100000


class Memory:
    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("bench-guest")
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.size = size
        self.next = BASE

    def translate(self, iova: int, length: int, write: bool) -> memoryview:
        if iova < BASE or iova + length > BASE + self.size:
            raise OSError(errno.EFAULT, "unmapped")
        off = iova - BASE
        return memoryview(self.mm)[off : off + length]

    def alloc(self, size: int) -> int:
        addr = self.next
        self.next += -(-size // PAGE) * PAGE
        return addr


class Bench:
    def __init__(self, directory: str, ns_bytes: int, direct: bool) -> None:
        self.mem = Memory(64 << 20)
        self.ns = FileNamespace(os.path.join(directory, "bench.img"), ns_bytes, direct=direct)
        self.ctrl = NvmeController(
            self.mem, [self.ns], lambda v: None, config=ControllerConfig(max_io_queues=2)
        )
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
        self.tail = self.head = 0
        self.buffers = [self.mem.alloc(PAGE) for _ in range(self.depth)]
        self.nlbas = ns_bytes // 512

    def w32(self, off: int, value: int) -> None:
        self.ctrl.mmio_write(off, struct.pack("<I", value))

    def _admin(self, asq: int, slot: int, cmd: object) -> None:
        off = asq - BASE + slot * 64
        self.mem.mm[off : off + 64] = cmd.encode()  # type: ignore[attr-defined]
        self.w32(DOORBELL_BASE, slot + 1)
        self.ctrl.process()

    def run(self, opcode: int, qd: int, seconds: float) -> tuple[int, float]:
        rng = random.Random(1)
        done = 0
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
            self.w32(DOORBELL_BASE + 8, self.tail)
            while self.ctrl.process():
                pass
            for _ in range(qd):
                o = cq_off + self.head * 16
                assert self.mem.mm[o + 14] & 1 == phase, "missing completion"
                self.head += 1
                if self.head == self.depth:
                    self.head, phase = 0, phase ^ 1
            self.w32(DOORBELL_BASE + 12, self.head)
            done += qd
            now = time.perf_counter()
            if now >= end:
                self.phase = phase
                return done, now - start

    def close(self) -> None:
        self.ctrl.close()
        self.ns.close()
        self.mem.mm.close()
        os.close(self.mem.fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--dir", default=None, help="directory for the backing file (default: a temp dir)"
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--buffered", action="store_true", help="no O_DIRECT: page-cache speed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        bench = Bench(d, args.size_mib << 20, direct=not args.buffered)
        try:
            # fill the file so reads hit real blocks, not holes
            with open(os.path.join(d, "bench.img"), "r+b") as f:
                chunk = os.urandom(1 << 20)
                for _ in range(args.size_mib):
                    f.write(chunk)
            print(f"backing file: {args.size_mib} MiB, O_DIRECT={bench.ns.direct}")
            for name, opcode in (("randread", IoOpcode.READ), ("randwrite", IoOpcode.WRITE)):
                for qd in (1, 32):
                    n, elapsed = bench.run(opcode, qd, args.seconds)
                    iops, us = n / elapsed, elapsed / n * 1e6
                    print(f"{name:9s} 4k qd{qd:<2d}: {iops:9.0f} IOPS  {us:7.1f} us/cmd")
        finally:
            bench.close()


if __name__ == "__main__":
    main()
