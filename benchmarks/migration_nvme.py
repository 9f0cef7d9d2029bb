"""Live migration of a pds NVMe VF under load: downtime, state size, dirty REPORT cost.

Two VFs on one backing file (shared storage), each served by its own
process (a DeviceServer, as ``mdevd serve`` runs it), and this process as
the VMM: the NVMe workload (16 I/O queues, 32 commands in flight on each)
in guest memory, migrated by hand back and forth, as tests/nvme does:

  pre-copy   DMA logging on at 4 KiB; every guest page copied while the
             workload runs, then a second round of the pages dirtied since
             (DMA_LOGGING_REPORT for the device's writes, the workload's own
             vCPU writes from GuestMemory)
  downtime   workload paused; source RUNNING -> STOP_COPY (through
             RUNNING_P2P), MIG_DATA_READ to the end; last dirty pages
             copied; destination RESUMING, MIG_DATA_WRITE, RUNNING

Downtime is from the source leaving RUNNING to the destination RUNNING.
Then the migration tool itself (``mdevd migrate``) on 1 GiB of guest
memory under the same workload: total time, rounds, bytes, downtime.
Then DMA_LOGGING_REPORT over 4 GiB of mapped memory (a sparse memfd):
over the socket, and DirtyLog.report alone, clean and with dirty pages.

    .venv/bin/python benchmarks/migration_nvme.py [--migrations 6] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "nvme"))
from mig_by_hand import (  # noqa: E402  (the by-hand VFIO steps the tests use)
    connect,
    logging_report,
    logging_start,
    logging_stop,
    read_stream,
    set_state,
    write_stream,
)

from mdevcore.migration.guest_memory import PAGE_SIZE, GuestMemory  # noqa: E402
from mdevcore.migration.workloads.nvme import NvmeWorkload  # noqa: E402
from mdevcore.pci.dma import DirtyLog  # noqa: E402
from mdevcore.pci.migration import MigState  # noqa: E402
from mdevcore.vfio_user.client import Client  # noqa: E402

NS_BYTES = 256 << 20
MEM_BYTES = 64 << 20
BIG_MEM = 4 << 30


# --- the served VF (a child process) ------------------------------------------------


def serve(sock: str, backing: str, size: int) -> None:
    from mdevcore.parents.pds.vf import PdsNvmeVf, VfConfig
    from mdevcore.vfio_user.server import DeviceServer

    async def main() -> None:
        vf = PdsNvmeVf(VfConfig(backing=backing, size=size))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(DeviceServer(vf, sock, name=os.path.basename(sock)).serve)
                print("ready", flush=True)
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
        finally:
            vf.close()

    trio.run(main)


def start_server(sock: str, backing: str, size: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", sock, backing, str(size)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        raise RuntimeError("VF server did not start")
    return proc


# --- one migration ------------------------------------------------------------------


def copy_pages(src: GuestMemory, dst: GuestMemory, pages: set[int] | range) -> int:
    """Copy pages, each run of consecutive ones in one slice (memcpy)."""
    run_start = run_end = -1
    for page in sorted(pages):
        if page != run_end:
            if run_end > run_start:
                dst.mem[run_start * PAGE_SIZE : run_end * PAGE_SIZE] = (
                    src.mem[run_start * PAGE_SIZE : run_end * PAGE_SIZE]
                )  # fmt: skip
            run_start = page
        run_end = page + 1
    if run_end > run_start:
        dst.mem[run_start * PAGE_SIZE : run_end * PAGE_SIZE] = (
            src.mem[run_start * PAGE_SIZE : run_end * PAGE_SIZE]
        )  # fmt: skip
    return len(pages)


def dirty_pages(dev: Client, mem: GuestMemory) -> set[int]:
    """Device writes (REPORT) and vCPU writes since the last call, as page numbers."""
    device = {p - mem.base // PAGE_SIZE for p in logging_report(dev, mem.base, mem.size)}
    return device | mem.take_dirty()


def migrate(
    wl: NvmeWorkload, src: Client, src_mem: GuestMemory, dst: Client, dst_mem: GuestMemory
) -> tuple[NvmeWorkload, dict[str, float]]:
    out: dict[str, float] = {}
    logging_start(src, [(src_mem.base, src_mem.size)])
    src_mem.take_dirty()
    copy_pages(src_mem, dst_mem, range(src_mem.size // PAGE_SIZE))  # round 1: everything
    wl.run_for(0.3)
    out["round2_pages"] = copy_pages(src_mem, dst_mem, dirty_pages(src, src_mem))
    wl.run_for(0.1)
    # Last round right before pausing: what remains for the downtime is what
    # the device and the vCPUs dirty between this copy and STOP.
    out["round3_pages"] = copy_pages(src_mem, dst_mem, dirty_pages(src, src_mem))
    # The vCPUs run on while the VMM decides to stop (here they would not:
    # the workload shares this thread with the copy).
    wl.run_for(0.005)
    wl.quiesce()
    out["in_flight"] = wl.stats()["in_flight_at_quiesce"]
    t0 = time.perf_counter()
    set_state(src, MigState.STOP_COPY)
    t1 = time.perf_counter()
    stream = read_stream(src)
    t2 = time.perf_counter()
    out["downtime_pages"] = copy_pages(src_mem, dst_mem, dirty_pages(src, src_mem))
    t3 = time.perf_counter()
    set_state(dst, MigState.RESUMING)
    write_stream(dst, stream)
    set_state(dst, MigState.RUNNING)
    t4 = time.perf_counter()
    logging_stop(src)
    set_state(src, MigState.STOP)
    out.update(
        downtime=t4 - t0,
        stop_copy=t1 - t0,
        stream_read=t2 - t1,
        page_copy=t3 - t2,
        resume=t4 - t3,
        device_only=(t2 - t0) + (t4 - t3),
        state_bytes=len(stream),
    )
    nxt = NvmeWorkload()
    nxt.restore(wl.save(), dst, dst_mem)
    wl.close()
    return nxt, out


def downtime_benchmark(workdir: str, migrations: int) -> None:
    backing = os.path.join(workdir, "shared.img")
    socks = [os.path.join(workdir, f"vf{i}.sock") for i in range(2)]
    servers = [start_server(s, backing, NS_BYTES) for s in socks]
    try:
        with GuestMemory(MEM_BYTES, name="side0") as m0, GuestMemory(MEM_BYTES, name="side1") as m1:
            mems = [m0, m1]
            devs = [connect(s, m) for s, m in zip(socks, mems, strict=True)]
            wl = NvmeWorkload(queues=16, depth=32, span_bytes=NS_BYTES)
            wl.start(devs[0], mems[0])
            wl.run_for(1.0)
            rate = wl.stats()["completions"]
            print(f"load: {len(wl.ioqs)} I/O queues x QD{wl.depth}, {rate} commands completed "
                  "in the first second")  # fmt: skip
            results = []
            side = 0
            for _ in range(migrations):
                wl, out = migrate(wl, devs[side], mems[side], devs[1 - side], mems[1 - side])
                side = 1 - side
                results.append(out)
                wl.run_for(0.3)
            wl.verify()
            stats = wl.stats()
            wl.close()
            for dev in devs:
                dev.close()
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()

    def show(key: str, scale: float = 1e3, unit: str = "ms") -> str:
        values = [r[key] * scale for r in results]
        return (
            f"median {statistics.median(values):.2f} {unit}  "
            f"min {min(values):.2f}  max {max(values):.2f}"
        )

    mismatches, verified = stats["mismatches"], stats["verified_bytes"]
    print(f"{migrations} migrations, back and forth, workload verified: "
          f"{mismatches} mismatches, {verified} bytes verified")  # fmt: skip
    print(f"  downtime (source leaves RUNNING -> destination RUNNING): {show('downtime')}")
    print(f"    device only (STOP_COPY + stream + RESUMING..RUNNING):  {show('device_only')}")
    print(f"    source RUNNING -> STOP_COPY:                           {show('stop_copy')}")
    print(f"    MIG_DATA_READ to end of stream:                        {show('stream_read')}")
    print(f"    dirty pages copied in downtime:                        {show('page_copy')}")
    print(f"    destination RESUMING, MIG_DATA_WRITE, RUNNING:         {show('resume')}")
    print(f"  stop-copy state size: {show('state_bytes', 1, 'bytes')}")
    print(f"  pre-copy rounds 2 and 3: {show('round2_pages', 1, 'pages')}; "
          f"{show('round3_pages', 1, 'pages')}")  # fmt: skip
    print(f"  pages copied in downtime: {show('downtime_pages', 1, 'pages')}")
    print(f"  commands in flight at the switch: {show('in_flight', 1, 'commands')}")


# --- DMA_LOGGING_REPORT over 4 GiB ---------------------------------------------------------


def report_benchmark(workdir: str) -> None:
    sock = os.path.join(workdir, "big.sock")
    server = start_server(sock, os.path.join(workdir, "big.img"), 64 << 20)
    try:
        with GuestMemory(BIG_MEM, name="big") as mem:  # sparse: nothing is touched
            dev = connect(sock, mem)
            logging_start(dev, [(mem.base, mem.size)])
            times = []
            for _ in range(20):
                t = time.perf_counter()
                logging_report(dev, mem.base, mem.size)
                times.append(time.perf_counter() - t)
            print(f"DMA_LOGGING_REPORT of 4 GiB at 4 KiB ({BIG_MEM // PAGE_SIZE} pages, "
                  f"{BIG_MEM // PAGE_SIZE // 8} bitmap bytes) over the socket, nothing dirty: "
                  f"median {statistics.median(times) * 1e3:.2f} ms, "
                  f"min {min(times) * 1e3:.2f} ms")  # fmt: skip
            wl = NvmeWorkload(queues=16, depth=32, span_bytes=64 << 20)
            wl.start(dev, mem)
            logging_report(dev, mem.base, mem.size)
            times, counts = [], []
            for _ in range(5):
                wl.resume()
                wl.run_for(0.2)
                wl.quiesce()
                wl.drain()
                t = time.perf_counter()
                counts.append(len(logging_report(dev, mem.base, mem.size)))
                times.append(time.perf_counter() - t)
            print(f"  after 0.2 s of workload (median {statistics.median(counts)} dirty pages): "
                  f"median {statistics.median(times) * 1e3:.2f} ms, "
                  f"min {min(times) * 1e3:.2f} ms")  # fmt: skip
            wl.close()
            logging_stop(dev)
            dev.close()
    finally:
        server.terminate()
        server.wait()
    # The device's bitmap work alone, no socket: DirtyLog as the device holds it.
    npages = BIG_MEM // PAGE_SIZE
    for kind in (DirtyLog,):
        for dirty_count in (0, 10_000, 100_000, npages // 4, npages):
            log = kind(PAGE_SIZE, [(0, BIG_MEM)])
            step = max(1, npages // max(dirty_count, 1))
            t = time.perf_counter()
            for page in range(0, npages, step)[:dirty_count]:
                log.mark(page * PAGE_SIZE, PAGE_SIZE)
            marked = time.perf_counter() - t
            t = time.perf_counter()
            bitmap = log.report(0, BIG_MEM)
            reported = time.perf_counter() - t
            assert sum(bin(b).count("1") for b in bitmap) == dirty_count
            per_mark = f"{marked / dirty_count * 1e6:.2f} us each" if dirty_count else "-"
            print(f"  {kind.__name__:>14} alone, {dirty_count:>7} dirty pages: report "
                  f"{reported * 1e3:8.2f} ms  (marking them one by one: {per_mark})")  # fmt: skip
    # mark() finds its range by bisection: many logged ranges cost little per write.
    for count in (1, 100, 1000):
        ranges = [(i << 22, 1 << 22) for i in range(count)]
        for kind in (DirtyLog,):
            log = kind(PAGE_SIZE, ranges)
            t = time.perf_counter()
            for i in range(2000):
                log.mark((i % 1000) * PAGE_SIZE, PAGE_SIZE)
            each = (time.perf_counter() - t) / 2000
            print(f"  {kind.__name__:>14}.mark with {count:>4} logged ranges: {each * 1e6:8.2f} us")


def tool_benchmark(workdir: str, memory: str = "1G") -> None:
    """``mdevd migrate`` (the VMM tool) with ``memory`` of guest RAM, from its --json report."""
    import json

    backing = os.path.join(workdir, "tool.img")
    socks = [os.path.join(workdir, f"tool{i}.sock") for i in (0, 1)]
    servers = [start_server(sock, backing, NS_BYTES) for sock in socks]
    try:
        cmd = [sys.executable, "-m", "mdevcore.daemon.cli", "migrate", "local",
               "--src", socks[0], "--dst", socks[1], "--workload", "nvme", "--memory", memory,
               "--json", "--quiet"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        if out.returncode != 0:
            print(f"mdevd migrate failed ({out.returncode}): {out.stderr.strip()[-400:]}")
            return
        report = json.loads(out.stdout)
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    print(f"mdevd migrate, {memory} of guest memory under the NVMe workload (16 queues x QD32):")
    for key, value in report.items():
        if not isinstance(value, dict | list):
            print(f"  {key}: {value}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where the backing file goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migbench-", dir=args.dir) as workdir:
        downtime_benchmark(workdir, args.migrations)
        tool_benchmark(workdir)
        report_benchmark(workdir)


if __name__ == "__main__":
    main()
