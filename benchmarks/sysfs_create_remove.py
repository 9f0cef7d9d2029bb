"""Creating and removing mdevs: through the mounted mirror, a kernel-less floor, and the Python API.

Mounted: a separate ``mdevd serve`` process owns the mirror; this process
does what ``echo UUID > create; echo 1 > remove`` does (open O_TRUNC,
write, close), so each create also binds a vfio-user socket (there when
the write returns) and each remove unlinks it.  Timed: ``--devices``
creates in a row (the issue's figure: 1,000 in at most 2 s), then their
removes, then ``--cycles`` create+remove cycles; with the daemon's CPU
time per operation (steadier than wall time on a shared machine).

Floor (the peer): the same number of "creates" done with plain syscalls
in a tmpfs (/dev/shm, else ``--tmp``), no FUSE and no daemon: write the UUID
to a file (O_TRUNC), mkdir a directory named by it, bind and listen on a
UNIX socket named by it; "remove" is rmdir, close, unlink.  That is what
a create costs at least, whatever serves it.  Printed with ours / floor.

API: the same writes through the unmounted tree in-process (no FUSE, no
server), the model's own cost.

    .venv/bin/python benchmarks/sysfs_create_remove.py [--devices N] [--cycles N] [--tmp DIR]

``--persist`` runs mdevd with ``--persist`` (as contrib/mdevd.service
does), so each create also writes its record.  ``--tmp`` picks where the
mirror, the sockets (and the records) live, default the system's
temporary directory; /run, where mdevd keeps its sockets by default, is a
tmpfs on most hosts (``--tmp /dev/shm`` models that).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sysfs_common import POOL_ARGS, POOL_TYPE_DIR, REPO, Daemon  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "core"))
from mdev_testdriver import BigPool  # noqa: E402

from mdevcore.core import MdevCore  # noqa: E402
from mdevcore.sysfs import MdevSysfs  # noqa: E402


def write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class Timed:
    """``count`` operations in ``seconds`` of wall time, ``cpu`` of daemon CPU."""

    count: int
    seconds: float
    cpu: float = 0.0

    @property
    def ms_each(self) -> float:
        return self.seconds / self.count * 1e3


def mounted(
    devices: int, cycles: int, tmp: str | None, persist: bool
) -> tuple[Timed, Timed, Timed]:
    """(``devices`` creates, their removes, ``cycles`` create+remove cycles)."""
    with tempfile.TemporaryDirectory(dir=tmp) as base:
        extra = ("--persist", f"{base}/persist") if persist else ()
        daemon = Daemon(Path(base), (*POOL_ARGS, *extra))
        try:
            create = str(daemon.sysfs / POOL_TYPE_DIR / "create")
            devs = daemon.sysfs / "bus/mdev/devices"

            def timed(ids: list[str], *, make: bool, drop: bool) -> Timed:
                cpu, start = daemon.cpu_seconds(), time.perf_counter()
                for u in ids:
                    if make:
                        write(create, u.encode())
                    if drop:
                        write(f"{devs}/{u}/remove", b"1")
                elapsed = time.perf_counter() - start
                return Timed(len(ids), elapsed, daemon.cpu_seconds() - cpu)

            ids = [str(uuid.uuid4()) for _ in range(devices)]
            made = timed(ids, make=True, drop=False)
            sockets = sum(1 for f in daemon.run_dir.glob("*.sock") if f.is_socket())
            if sockets != devices:
                raise SystemExit(f"{sockets} sockets for {devices} devices")
            dropped = timed(ids, make=False, drop=True)
            both = timed([str(uuid.uuid4()) for _ in range(cycles)], make=True, drop=True)
        finally:
            daemon.stop()
    return made, dropped, both


def floor(devices: int, tmp: str | None) -> tuple[Timed, Timed]:
    """The syscalls a create and a remove amount to, with nothing serving them."""
    with tempfile.TemporaryDirectory(dir=tmp) as base:
        attr = f"{base}/create"
        os.close(os.open(attr, os.O_CREAT | os.O_WRONLY, 0o200))
        ids = [str(uuid.uuid4()) for _ in range(devices)]
        listeners = []
        start = time.perf_counter()
        for u in ids:
            write(attr, u.encode())
            os.mkdir(f"{base}/{u}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(f"{base}/{u}.sock")
            s.listen(4)
            listeners.append(s)
        made = Timed(devices, time.perf_counter() - start)
        start = time.perf_counter()
        for u, s in zip(ids, listeners, strict=True):
            os.rmdir(f"{base}/{u}")
            s.close()
            os.unlink(f"{base}/{u}.sock")
        dropped = Timed(devices, time.perf_counter() - start)
    return made, dropped


def api(cycles: int) -> float:
    core = MdevCore()
    core.register_parent("pool", "devices/virtual/pool/pool", BigPool())
    tree = MdevSysfs(core).tree
    ids = [str(uuid.uuid4()) for _ in range(cycles)]
    start = time.perf_counter()
    for u in ids:
        tree.write(f"{POOL_TYPE_DIR}/create", u)
        tree.write(f"bus/mdev/devices/{u}/remove", "1")
    return cycles / (time.perf_counter() - start)


def fs_type(directory: str | None) -> str:
    where = directory or tempfile.gettempdir()
    out = subprocess.run(["stat", "-f", "-c", "%T", where], capture_output=True, text=True)
    return f"{where} ({out.stdout.strip() or 'unknown fs'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000, help="creates in a row (then removes)")
    p.add_argument("--cycles", type=int, default=2000, help="create+remove cycles")
    p.add_argument("--tmp", help="where the mirror and sockets live (default: $TMPDIR)")
    p.add_argument(
        "--persist", action="store_true", help="mdevd --persist (in --tmp), as the unit runs it"
    )
    args = p.parse_args()
    a = api(args.cycles)
    made, dropped, both = mounted(args.devices, args.cycles, args.tmp, args.persist)
    floor_dir = "/dev/shm" if os.path.isdir("/dev/shm") else args.tmp
    f_made, f_dropped = floor(args.devices, floor_dir)
    n = args.devices
    kept = ", --persist records there too" if args.persist else ""
    print(f"mirror and sockets in {fs_type(args.tmp)}{kept}; floor in {fs_type(floor_dir)}")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':36} {'mounted mirror (ours)':>28} {'floor (plain syscalls)':>24} {'ratio':>7}")
    for label, ours, peer in (
        (f"{n} creates (socket each), total", made, f_made),
        (f"{n} removes, total", dropped, f_dropped),
    ):
        print(
            f"{label:36} {ours.seconds:7.3f} s = {ours.ms_each:5.2f} ms each"
            f" {peer.seconds:8.3f} s = {peer.ms_each:5.3f} ms {ours.seconds / peer.seconds:6.1f}x"
        )
    for label, t in (("create", made), ("remove", dropped), ("create+remove cycle", both)):
        print(f"mdevd CPU per {label + ':':21} {t.cpu / t.count * 1e3:5.2f} ms")
    m = both.count / both.seconds
    print(f"create+remove via mounted mirror (mdevd, vfio-user socket each): {m:8.0f} cycles/s")
    print(f"create+remove via Python API (unmounted tree, no server):       {a:8.0f} cycles/s")
    print(f"cycles: {args.cycles}; mounted cycle = {1e3 / m:.2f} ms, API cycle = {1e6 / a:.1f} us")


if __name__ == "__main__":
    main()
