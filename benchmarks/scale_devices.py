"""Many devices in one daemon: 16 mtty mdevs in one ``mdevd serve`` against one daemon each.

    .venv/bin/python benchmarks/scale_devices.py [--devices 16] [--seconds 2] [--busy 1,2,4,8,16]
        [--spin-us US]

Prints figures, asserts nothing.  Both setups serve the same ``--devices``
mtty-1 mdevs (created through the mounted mirror, served over vfio-user):

  one mdevd     a single ``mdevd serve`` holding every device (ours);
  mdevd each    one ``mdevd serve`` per device (the peer: nothing shared).

For each N in ``--busy``, N client processes (the project's blocking
Python client, mdevcore.vfio_user.client) each take one device, negotiate,
warm up, then on a common start do 4-byte REGION_READs of config space
back to back for ``--seconds``.  Printed per N: the aggregate and
per-device (mean, slowest) reads/s and the p50/p99 round trip over every
read of every client, then the ratio one mdevd / mdevd each (for
throughput above 1 is better, for latency below 1).  The clients share
the machine's cores with the daemons: on a 2-core machine more busy
clients than cores measure the scheduler as much as the server.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sysfs_common import REPO, Daemon  # noqa: E402

sys.path.insert(0, str(REPO))
from mdevcore.vfio_user.backend import PCI_CONFIG_REGION_INDEX  # noqa: E402
from mdevcore.vfio_user.client import Client  # noqa: E402

MTTY_TYPE_DIR = "devices/virtual/mtty/mtty/mdev_supported_types/mtty-1"
MTTY_ONLY = ("--no-parent", "pds", "--no-parent", "ifcvf")
WARM_UP = 500  # reads before the common start


def worker(sock: str, seconds: float, out: str) -> None:
    """One busy client: connect, warm up, "ready", wait for "go", read, save latencies."""
    with Client(sock) as client:
        client.negotiate()
        expected = client.region_read(PCI_CONFIG_REGION_INDEX, 0, 4)
        for _ in range(WARM_UP):
            client.region_read(PCI_CONFIG_REGION_INDEX, 0, 4)
        print("ready", flush=True)
        sys.stdin.readline()  # "go"
        latencies = array.array("q")
        clock = time.perf_counter_ns
        end = clock() + int(seconds * 1e9)
        now = clock()
        while now < end:
            data = client.region_read(PCI_CONFIG_REGION_INDEX, 0, 4)
            done = clock()
            latencies.append(done - now)
            now = done
        if data != expected:
            raise SystemExit(f"{sock}: config space changed under the reads")
    with open(out, "wb") as f:
        latencies.tofile(f)


@dataclasses.dataclass(frozen=True)
class Result:
    busy: int
    per_device: list[float]  # reads/s of each busy client
    p50_us: float
    p99_us: float

    @property
    def aggregate(self) -> float:
        return sum(self.per_device)


def run_clients(sockets: Sequence[Path], seconds: float, scratch: Path) -> Result:
    """One worker process per socket, started together; their combined figures."""
    procs = []
    outs = [scratch / f"lat{i}" for i in range(len(sockets))]
    for sock, out in zip(sockets, outs, strict=True):
        cmd = [sys.executable, __file__, "--worker", str(sock), str(seconds), str(out)]
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline() != "ready\n":
            raise SystemExit("a client failed to start")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a client failed")
    every: list[int] = []
    per_device = []
    for out in outs:
        lat = array.array("q")
        lat.frombytes(out.read_bytes())
        per_device.append(len(lat) / (sum(lat) / 1e9))
        every.extend(lat)
        out.unlink()
    every.sort()
    p50 = every[len(every) // 2] / 1e3
    p99 = every[min(len(every) - 1, len(every) * 99 // 100)] / 1e3
    return Result(len(sockets), per_device, p50, p99)


def create_devices(daemon: Daemon, count: int) -> list[Path]:
    """``count`` mtty-1 mdevs through the mirror; their sockets (there when create returns)."""
    create = daemon.sysfs / MTTY_TYPE_DIR / "create"
    sockets = []
    for _ in range(count):
        name = str(uuid.uuid4())
        create.write_text(name)
        sockets.append(daemon.run_dir / f"{name}.sock")
    return sockets


def measure(
    setup: str, devices: int, busy: Sequence[int], seconds: float, extra: Sequence[str]
) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        base = Path(tmp)
        ports = ("--parent-opt", f"mtty.ports={devices if setup == 'one' else 1}")
        count = 1 if setup == "one" else devices
        args = (*MTTY_ONLY, *ports, *extra)
        daemons = [Daemon(base / f"d{i}", args, wait=False) for i in range(count)]
        for d in daemons:
            stack.callback(d.stop)
        for d in daemons:
            d.wait_ready()
        if setup == "one":
            sockets = create_devices(daemons[0], devices)
        else:
            sockets = [s for d in daemons for s in create_devices(d, 1)]
        return [run_clients(sockets[:n], seconds, base) for n in busy]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0, help="of reads per client and N")
    p.add_argument("--busy", default="1,2,4,8,16", help="numbers of busy clients")
    p.add_argument(
        "--spin-us",
        help="mdevd serve --spin-us for every daemon (default: the device's, 0 for mtty)",
    )
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sock, seconds, out = args.worker
        worker(sock, float(seconds), out)
        return
    busy = [int(n) for n in args.busy.split(",")]
    if max(busy) > args.devices:
        p.error("--busy: more clients than --devices")
    extra = ("--spin-us", args.spin_us) if args.spin_us is not None else ()
    one = measure("one", args.devices, busy, args.seconds, extra)
    each = measure("each", args.devices, busy, args.seconds, extra)
    spin = f"; --spin-us {args.spin_us}" if extra else ""
    print(
        f"{args.devices} mtty mdevs; N busy clients (one per device, separate processes) "
        f"do 4-byte config-space REGION_READs for {args.seconds:g} s; {os.cpu_count()} CPUs"
        f"{spin}; load average {os.getloadavg()[0]:.1f}"
    )
    head = "aggregate/s  per dev/s (slowest)  p50 us   p99 us"
    ours, peer = "one mdevd (ours)", "one mdevd per device (peer)"
    print(f"{'':3} | {ours:^{len(head)}} | {peer:^{len(head)}} |")
    print(f"{'N':>3} | {head} | {head} | aggr ratio  p99 ratio")
    for a, b in zip(one, each, strict=True):
        cols = []
        for r in (a, b):
            mean = statistics.fmean(r.per_device)
            cols.append(
                f"{r.aggregate:11.0f}  {mean:9.0f} ({min(r.per_device):7.0f})"
                f"  {r.p50_us:6.1f}  {r.p99_us:7.1f}"
            )
        ratio = a.aggregate / b.aggregate
        print(f"{a.busy:3d} | {cols[0]} | {cols[1]} | {ratio:9.2f}x  {a.p99_us / b.p99_us:8.2f}x")


if __name__ == "__main__":
    main()
