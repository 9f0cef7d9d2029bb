"""Real ``mdevd serve`` daemons with mtty devices, for the migration tests.

Daemons run with the built-in parents and ``--no-pds`` (mtty only is
needed), in short /tmp directories so socket paths stay under 108 bytes.
Optionally inside a network namespace (``ip netns exec``), where devices
are made with ``--persist`` records because the mirror is mounted in that
command's own mount namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdevd_proc import MDEVD, Mdevd

from mdevcore.migration.device import MigrationDevice
from mdevcore.vfio_user.client import Client

TYPES = "devices/virtual/mtty/mtty/mdev_supported_types"
REPO = Path(__file__).resolve().parents[2]


class MttyDaemon:
    """One daemon; ``create(uuid, type)`` makes an mtty device on it."""

    def __init__(self, base: Path, netns: str | None = None, persist: dict[str, str] | None = None):
        self.base = base
        if netns is None:
            self.proc = Mdevd(base, "--no-pds", builtins=True)
        else:
            self.proc = _NsMdevd(base, netns, persist or {})

    @property
    def run_dir(self) -> Path:
        return self.proc.run_dir

    def create(self, dev_uuid: str, mtype: str = "mtty-2") -> Path:
        (self.proc.sysfs / TYPES / mtype / "create").write_text(dev_uuid + "\n")
        return self.socket(dev_uuid)

    def remove(self, dev_uuid: str) -> None:
        (self.proc.sysfs / "bus/mdev/devices" / dev_uuid / "remove").write_text("1\n")

    def socket(self, dev_uuid: str) -> Path:
        return self.run_dir / f"{dev_uuid}.sock"

    def stop(self) -> None:
        self.proc.stop()


class _NsMdevd(Mdevd):
    """``mdevd serve`` under ``ip netns exec NS`` with devices from --persist."""

    def __init__(self, base: Path, netns: str, devices: dict[str, str]) -> None:
        self.sysfs = base / "sys"
        self.run_dir = base / "run"
        persist = base / "persist"
        persist.mkdir(parents=True, exist_ok=True)
        for dev_uuid, mtype in devices.items():
            record = {"parent": "mtty", "mdev_type": mtype}
            (persist / dev_uuid).write_text(json.dumps(record) + "\n")
        args = ["serve", "--sysfs", str(self.sysfs), "--run-dir", str(self.run_dir)]
        args += ["--persist", str(persist), "--no-pds"]
        self.log_path = base / "mdevd.log"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *MDEVD, *args],
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        self.banner = self._read_until_ready()


@contextmanager
def short_dir(prefix: str = "mig-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def new_uuid() -> str:
    return str(uuid.uuid4())


def connect(path: Path) -> tuple[Client, MigrationDevice]:
    client = Client(path, timeout=10.0)
    client.negotiate()
    return client, MigrationDevice(client, name=path.name)
