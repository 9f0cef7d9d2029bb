"""Create+remove cycles per second: through the mounted mirror and the Python API.

Mounted: a separate ``mdevd serve`` process owns the mirror; this process
does what ``echo UUID > create; echo 1 > remove`` does (open O_TRUNC,
write, close, twice), so each cycle also binds and unlinks a vfio-user
socket.  API: the same writes through the unmounted tree in-process
(no FUSE, no server), the model's own cost.

    .venv/bin/python benchmarks/sysfs_create_remove.py [--cycles N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sysfs_common import POOL_TYPE_DIR, REPO, Daemon  # noqa: E402

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


def mounted(cycles: int) -> float:
    with tempfile.TemporaryDirectory() as base:
        daemon = Daemon(Path(base))
        try:
            create = str(daemon.sysfs / POOL_TYPE_DIR / "create")
            devices = daemon.sysfs / "bus/mdev/devices"
            ids = [str(uuid.uuid4()) for _ in range(cycles)]
            start = time.perf_counter()
            for u in ids:
                write(create, u.encode())
                write(f"{devices}/{u}/remove", b"1")
            elapsed = time.perf_counter() - start
        finally:
            daemon.stop()
    return cycles / elapsed


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=2000)
    args = p.parse_args()
    a = api(args.cycles)
    m = mounted(args.cycles)
    print(f"create+remove via mounted mirror (mdevd, vfio-user socket each): {m:8.0f} cycles/s")
    print(f"create+remove via Python API (unmounted tree, no server):       {a:8.0f} cycles/s")
    print(f"cycles: {args.cycles}; mounted cycle = {1e3 / m:.2f} ms, API cycle = {1e6 / a:.1f} us")


if __name__ == "__main__":
    main()
