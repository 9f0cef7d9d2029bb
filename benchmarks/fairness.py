"""Fairness: one client floods its device with bad requests; another device's round trip.

    .venv/bin/python benchmarks/fairness.py [--reads 5000] [--seconds 3] [--tree DIR]...
        [--io trio|thread]...

One server process serves two devices in one trio run, as mdevd serves all
of its devices: "victim" and "flooded" (both the RawDevice of
vfio_user_rtt.py, on DeviceServer).  The victim's client (this process)
times REGION_READs of 4 bytes: --reads with the other device idle, then
as many as it gets through in the --seconds a flooder process keeps the
flooded device's socket full of bad posted requests (REGION_WRITE to a
region that does not exist, and an unknown command, both No_reply: nothing
to read back, so the flooder never waits), then --reads idle again.  The
flooder stops by itself, makes sure all it sent was handled and says how
many messages that was.

Prints, per tree (--tree, default this one; give two to compare the code
of two checkouts in one run): the victim's median and p99 idle and during
the flood, side by side, and how many round trips it completed during the
flood; the flood rate the server sustained; the server's log volume per
million bad messages.  Each tree runs once per --io (default: both trio,
a connection as a task of the one trio run, and thread, each connection
on its own thread; "-" for a tree older than the option).  Asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _serve(run_dir: str, io: str) -> None:
    """Server process: both devices in one trio run, until SIGTERM."""
    import trio
    from vfio_user_rtt import RawDevice

    from mdevcore.vfio_user.server import DeviceServer

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for name in ("victim", "flooded"):
                    kw: dict[str, Any] = {"io": io} if io != "-" else {}
                    server = DeviceServer(
                        RawDevice(), os.path.join(run_dir, f"{name}.sock"), name=name, **kw
                    )
                    await nursery.start(server.serve)
                print("serving", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


def _flood(path: str, seconds: float) -> None:
    """Flooder process: bad posted requests for ``seconds``, then one read to drain."""
    from mdevcore.vfio_user.client import Client
    from mdevcore.vfio_user.constants import FLAG_NO_REPLY, Command
    from mdevcore.vfio_user.wire import HEADER, REGION_ACCESS

    bad_write = REGION_ACCESS.pack(0, 99, 4) + b"abcd"  # region 99: EINVAL
    one = HEADER.pack(1, Command.REGION_WRITE, 16 + len(bad_write), FLAG_NO_REPLY, 0) + bad_write
    one += HEADER.pack(2, 99, 16, FLAG_NO_REPLY, 0)  # unknown command: EINVAL
    per_blob = 2 * 2000
    blob = one * (per_blob // 2)
    with Client(path, timeout=None) as c:
        c.negotiate()
        print("flooding", flush=True)
        sent = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.sock.sendall(blob)
            sent += per_blob
        c.region_read(0, 0, 4)  # answered only after everything before it
        elapsed = time.perf_counter() - t0
    print(f"{sent} {elapsed:.3f}", flush=True)


def _rtts(
    client: object, reads: int, until: Callable[[], bool] = lambda: False
) -> tuple[float, float, int]:
    """Median and p99 (us) of ``reads`` round trips, fewer if ``until()`` says stop."""
    from mdevcore.vfio_user.client import Client
    from mdevcore.vfio_user.constants import Command
    from mdevcore.vfio_user.wire import REGION_ACCESS

    assert isinstance(client, Client)
    req = REGION_ACCESS.pack(0, 0, 4)
    clock = time.perf_counter_ns
    times: list[int] = []
    while len(times) < reads and not until():
        t0 = clock()
        client.wait_reply(client.send(Command.REGION_READ, req))
        times.append(clock() - t0)
    times.sort()
    return statistics.median(times) / 1000, times[int(len(times) * 0.99)] / 1000, len(times)


def _python(tree: Path) -> list[str]:
    """This script, importing mdevcore (and vfio_user_rtt) from ``tree``."""
    return [sys.executable, str(Path(__file__).resolve()), "--import-from", str(tree)]


def _wait_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != expected:
        raise SystemExit(f"expected {expected!r} from {proc.args!r}, got {line!r}")


def run_tree(tree: Path, reads: int, seconds: float, io: str) -> dict[str, float]:
    from mdevcore.vfio_user.client import Client  # the victim's client: this tree's

    cmd = _python(tree)
    with tempfile.TemporaryDirectory(prefix="vu-fair-") as d:
        log_path = os.path.join(d, "server.log")
        with open(log_path, "w") as log_file:
            server = subprocess.Popen(
                [*cmd, "--serve", d, "--io", io],
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
            )
        try:
            _wait_line(server, "serving")
            with Client(os.path.join(d, "victim.sock"), timeout=None) as victim:
                victim.negotiate()
                _rtts(victim, 1000)  # warm-up
                idle = _rtts(victim, reads)
                log_before = os.path.getsize(log_path)
                flooder = subprocess.Popen(
                    [*cmd, "--flood", os.path.join(d, "flooded.sock"), "--seconds", str(seconds)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                _wait_line(flooder, "flooding")
                end = time.monotonic() + seconds - 0.1
                # A starved victim may wait the whole flood for one reply.
                flooded = _rtts(victim, 1 << 62, lambda: time.monotonic() > end)
                out, _ = flooder.communicate(timeout=600)
                sent_text, elapsed_text = out.split()
                sent, elapsed = int(sent_text), float(elapsed_text)
                after = _rtts(victim, reads)
            log_bytes = os.path.getsize(log_path) - log_before
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()  # a server starved by a flood may not see its signal
                server.wait()
    return {
        "idle_med": idle[0],
        "idle_p99": idle[1],
        "flood_med": flooded[0],
        "flood_p99": flooded[1],
        "flood_reads": flooded[2],
        "after_med": after[0],
        "flood_rate": sent / elapsed,
        "log_per_m": log_bytes / sent * 1e6,
        "sent": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5000, help="round trips per idle phase")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the flood lasts")
    parser.add_argument(
        "--tree", type=Path, action="append", help="checkout whose mdevcore serves (repeatable)"
    )
    parser.add_argument(
        "--io", action="append", help="server I/O mode: trio, thread, - (repeatable; default both)"
    )
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--flood", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--import-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.import_from:
        # before this script's own directory (vfio_user_rtt puts its tree first)
        sys.path[:0] = [str(args.import_from / "benchmarks"), str(args.import_from)]
    if args.serve:
        _serve(args.serve, (args.io or ["-"])[0])
        return
    if args.flood:
        _flood(args.flood, args.seconds)
        return
    sys.path.insert(0, str(ROOT))
    trees = [t.resolve() for t in args.tree or [ROOT]]
    modes = args.io or ["trio", "thread"]
    rows = [
        (tree, io, run_tree(tree, args.reads, args.seconds, io)) for tree in trees for io in modes
    ]
    print(
        f"victim REGION_READ 4 bytes: {args.reads} round trips idle, as many as it gets in a "
        f"{args.seconds:g} s flood of the other device (one trio run serves both); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'tree':<20}{'io':<7}{'idle med':>9}{'idle p99':>9}{'flood med':>10}{'flood p99':>10}"
        f"{'flood n':>8}{'after med':>10}{'flood msg/s':>12}{'log/1M msgs':>13}"
    )
    for tree, io, r in rows:
        print(
            f"{str(tree)[-20:]:<20}{io:<7}{r['idle_med']:>9.1f}{r['idle_p99']:>9.1f}"
            f"{r['flood_med']:>10.1f}{r['flood_p99']:>10.1f}{r['flood_reads']:>8}"
            f"{r['after_med']:>10.1f}{r['flood_rate']:>12,.0f}{r['log_per_m'] / 1024:>9,.0f} KiB"
        )
    print("(round trips in us; flood n: round trips done during the flood; after: idle again)")


if __name__ == "__main__":
    main()
