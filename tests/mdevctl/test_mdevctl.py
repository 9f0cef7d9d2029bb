"""The real mdevctl (Debian's 1.2.0, unmodified) against the mirror via ``mdevd mdevctl``."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mdevd_proc import MDEVD, Mdevd

pytestmark = pytest.mark.skipif(
    not Path("/dev/fuse").exists() or shutil.which("mdevctl") is None,
    reason="needs /dev/fuse and the mdevctl package",
)

P = "devices/virtual/pool/pool"
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "21111111-2222-3333-4444-555555555555"


class Env:
    def __init__(self, daemon: Mdevd, config: Path) -> None:
        self.daemon = daemon
        self.sys = daemon.sysfs
        self.config = config

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*MDEVD, "mdevctl", "--sysfs", str(self.sys), "--config", str(self.config), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def text(self, *args: str) -> str:
        """Output without the blank line mdevctl ends its listings with."""
        return self.ok(*args).rstrip("\n")

    def avail(self, type_id: str) -> int:
        return int(
            (self.sys / P / "mdev_supported_types" / type_id / "available_instances").read_text()
        )

    def active(self) -> list[str]:
        return sorted(p.name for p in (self.sys / "bus/mdev/devices").iterdir())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    d = Mdevd(tmp_path)
    try:
        yield Env(d, tmp_path / "mdevctl.d")
    finally:
        assert d.stop() == 0


def test_types(env: Env) -> None:
    assert env.ok("types") == (
        "pool\n"
        "  pool-1\n"
        "    Available instances: 24\n"
        "    Device API: vfio-pci\n"
        "    Name: One slot\n"
        "    Description: uses 1 slot, no irqs\n"
        "  pool-2\n"
        "    Available instances: 12\n"
        "    Device API: vfio-pci\n"
        "    Name: Two slots\n"
        "\n"
    )


def test_types_dumpjson(env: Env) -> None:
    assert json.loads(env.ok("types", "--dumpjson")) == [
        {
            "pool": [
                {
                    "pool-1": {
                        "available_instances": 24,
                        "device_api": "vfio-pci",
                        "name": "One slot",
                        "description": "uses 1 slot, no irqs",
                    }
                },
                {
                    "pool-2": {
                        "available_instances": 12,
                        "device_api": "vfio-pci",
                        "name": "Two slots",
                    }
                },
            ]
        }
    ]


def test_start_list_stop(env: Env) -> None:
    assert env.text("list") == ""
    env.ok("start", "-u", U1, "-p", "pool", "-t", "pool-2")
    assert env.active() == [U1]
    assert env.avail("pool-2") == 11
    assert (env.sys / "bus/mdev/devices" / U1 / "mdev_type").resolve() == (
        env.sys / P / "mdev_supported_types/pool-2"
    )
    assert env.text("list") == f"{U1} pool pool-2 manual"
    assert json.loads(env.ok("list", "--dumpjson")) == [
        {"pool": [{U1: {"mdev_type": "pool-2", "start": "manual", "attrs": []}}]}
    ]
    again = env.run("start", "-u", U1, "-p", "pool", "-t", "pool-2")
    assert again.returncode != 0 and "Device already exists" in again.stderr
    env.ok("stop", "-u", U1)
    assert env.active() == []
    assert env.avail("pool-2") == 12
    assert env.text("list") == ""


def test_start_without_uuid_prints_one(env: Env) -> None:
    out = env.ok("start", "-p", "pool", "-t", "pool-1").strip()
    assert env.active() == [str(uuid.UUID(out))]
    assert env.avail("pool-1") == 23


def test_start_refuses_when_full(env: Env) -> None:
    for _ in range(12):
        env.ok("start", "-p", "pool", "-t", "pool-2")
    r = env.run("start", "-p", "pool", "-t", "pool-2")
    assert r.returncode != 0
    assert "No available instances" in r.stderr or "available" in r.stderr.lower()
    assert len(env.active()) == 12


def test_define_start_defined_undefine(env: Env) -> None:
    env.ok("define", "-u", U2, "-p", "pool", "-t", "pool-1")
    record = json.loads((env.config / "pool" / U2).read_text())
    assert record["mdev_type"] == "pool-1" and record["start"] == "manual"
    assert not (Path("/etc/mdevctl.d") / "pool").exists()  # the host config is untouched
    assert env.text("list", "--defined") == f"{U2} pool pool-1 manual"
    assert env.active() == []
    env.ok("start", "-u", U2)  # type and parent come from the definition
    assert env.active() == [U2]
    assert env.text("list") == f"{U2} pool pool-1 manual (defined)"
    assert env.text("list", "--defined") == f"{U2} pool pool-1 manual (active)"
    env.ok("stop", "-u", U2)
    env.ok("undefine", "-u", U2)
    assert env.text("list", "--defined") == ""
    assert not (env.config / "pool" / U2).exists()
    assert env.active() == []


def test_clear_error_without_a_mirror(tmp_path: Path) -> None:
    cmd = [*MDEVD, "mdevctl", "--sysfs", str(tmp_path), "list"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert r.stderr == f"mdevd: error: no sysfs mirror mounted at {tmp_path} (start mdevd serve)\n"


def test_mdevctl_with_the_mtty_sample(tmp_path: Path) -> None:
    d = Mdevd(tmp_path, builtins=True)
    try:
        env = Env(d, tmp_path / "mdevctl.d")
        types = env.text("types", "-p", "mtty")
        assert "mtty\n  mtty-1\n    Available instances: 24\n" in types
        assert "Name: Dual port serial" in types
        u = env.ok("start", "-p", "mtty", "-t", "mtty-2").strip()
        assert env.text("list") == f"{u} mtty mtty-2 manual"
        sock = (d.sysfs / "bus/mdev/devices" / u / "vfio_user/socket").read_text().strip()
        assert Path(sock).is_socket()
        env.ok("stop", "-u", u)
        assert not Path(sock).exists()
        assert env.text("list") == ""
    finally:
        assert d.stop() == 0
