"""Resident memory of ``mdevd serve`` with 0 and 1,000 devices (each served).

.venv/bin/python benchmarks/sysfs_daemon_rss.py [--devices N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sysfs_common import POOL_TYPE_DIR, Daemon  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as base:
        daemon = Daemon(Path(base))
        try:
            idle = daemon.rss_kib()
            create = str(daemon.sysfs / POOL_TYPE_DIR / "create")
            for _ in range(args.devices):
                fd = os.open(create, os.O_WRONLY | os.O_TRUNC)
                os.write(fd, str(uuid.uuid4()).encode())
                os.close(fd)
            n = len(os.listdir(daemon.sysfs / "bus/mdev/devices"))
            sockets = sum(1 for f in daemon.run_dir.iterdir() if f.is_socket())
            full = daemon.rss_kib()
        finally:
            rc = daemon.stop()
    print(f"mdevd RSS idle:             {idle / 1024:7.1f} MiB")
    print(f"mdevd RSS with {n} devices: {full / 1024:7.1f} MiB ({sockets} sockets listening)")
    print(f"per device:                 {(full - idle) / max(n, 1):7.1f} KiB; exit code {rc}")


if __name__ == "__main__":
    main()
