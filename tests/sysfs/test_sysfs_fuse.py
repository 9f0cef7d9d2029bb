"""The mirror through a real FUSE mount, driven from separate processes."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from mdev_testdriver import PoolDriver

from mdevcore.core import MdevCore
from mdevcore.sysfs import MdevSysfs
from mdevcore.sysfs.fuse import is_mounted, mounted

U1 = "0e8b5e3a-6f0b-4a4e-9d2a-0c7c1d5f3b01"
P = "devices/virtual/pool/pool"
T2 = f"{P}/mdev_supported_types/pool-2"

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


class Mirror:
    def __init__(self, root: Path, view: MdevSysfs) -> None:
        self.root = root
        self.view = view

    async def sh(self, script: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``script`` in bash (a separate process) inside the mount."""
        return await trio.run_process(
            ["bash", "-c", script],
            cwd=self.root,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    async def out(self, script: str) -> str:
        r = await self.sh(script)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()


@pytest.fixture
async def mirror(tmp_path: Path) -> AsyncIterator[Mirror]:
    core = MdevCore()
    core.register_parent("pool", P, PoolDriver(pool=200))
    view = MdevSysfs(core, socket_path=lambda u: tmp_path / f"{u}.sock")
    mnt = tmp_path / "sys"
    mnt.mkdir()
    async with mounted(view.tree, mnt):
        yield Mirror(mnt, view)
    assert not is_mounted(mnt)


async def test_shell_create_cat_readlink_remove(mirror: Mirror) -> None:
    assert await mirror.out(f"cat {T2}/available_instances") == "100\n"
    await mirror.out(f"echo {U1} > {T2}/create")
    assert await mirror.out(f"cat {T2}/available_instances") == "99\n"
    assert await mirror.out(f"readlink bus/mdev/devices/{U1}") == f"../../../{P}/{U1}\n"
    real = await mirror.out(f"readlink -f bus/mdev/devices/{U1}/mdev_type")
    assert real == f"{mirror.root}/{T2}\n"
    assert await mirror.out("readlink -f class/mdev_bus/pool") == f"{mirror.root}/{P}\n"
    assert await mirror.out(f"ls {T2}/devices") == f"{U1}\n"
    assert await mirror.out(f"cat {P}/{U1}/vendor/sample_mdev_dev") == f"This is MDEV {U1}\n"
    sock = mirror.root.parent / f"{U1}.sock"
    assert await mirror.out(f"cat bus/mdev/devices/{U1}/vfio_user/socket") == f"{sock}\n"
    await mirror.out(f"echo 1 > bus/mdev/devices/{U1}/remove")
    # consistent right after the write returned: nothing cached survives
    assert await mirror.out(f"ls bus/mdev/devices {T2}/devices; cat {T2}/available_instances") == (
        "bus/mdev/devices:\n\n" + f"{T2}/devices:\n" + "100\n"
    )
    r = await mirror.sh(f"test -e {P}/{U1} || echo gone")
    assert r.stdout == b"gone\n"


async def test_ls_l_modes_and_sizes(mirror: Mirror) -> None:
    await mirror.out(f"echo {U1} > {T2}/create")
    listing = await mirror.out(f"ls -l {T2} {P}/{U1}")
    lines = {line.split()[-1]: line for line in listing.splitlines() if line.count(" ") > 5}
    assert lines["create"].startswith("--w------- ")
    assert " 4096 " in lines["create"]
    assert lines["available_instances"].startswith("-r--r--r-- ")
    assert " 4096 " in lines["available_instances"]
    assert lines["devices"].startswith("d")
    assert lines["remove"].startswith("--w------- ")
    assert "mdev_type -> ../mdev_supported_types/pool-2" in listing


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (f"echo {U1} > {T2}/create; echo {U1} > {T2}/create", "write error: File exists"),
        (f"echo nonsense > {T2}/create", "write error: Invalid argument"),
        (f"printf '%s\\n\\n' {U1} > {T2}/create", "write error: Invalid argument"),
        (f"echo {U1} > {T2}/create; echo yes > {P}/{U1}/remove", "write error: Invalid argument"),
        (f"echo x > {T2}/name", "Permission denied"),
        (f"cat {T2}/create", "Permission denied"),
        (f"echo {U1} > {T2}/nothere", "Permission denied"),  # no creating files in sysfs
        (f"mkdir {P}/x", "Operation not permitted"),
        (f"rm -f {T2}/name", "Operation not permitted"),
    ],
)
async def test_kernel_error_messages(mirror: Mirror, script: str, message: str) -> None:
    r = await mirror.sh(script)
    assert r.returncode != 0
    assert message in r.stderr.decode()


async def test_enospc_message(mirror: Mirror) -> None:
    for _ in range(100):
        mirror.view.tree.write(f"{T2}/create", str(uuid.uuid4()))
    r = await mirror.sh(f"echo {U1} > {T2}/create")
    assert "write error: No space left on device" in r.stderr.decode()
    assert await mirror.out(f"cat {T2}/available_instances") == "0\n"


async def test_parallel_creates_and_removes(mirror: Mirror) -> None:
    uuids = [str(uuid.uuid4()) for _ in range(200)]
    script = (
        f"printf '%s\\n' {' '.join(uuids)} | "
        f"xargs -P 16 -I U sh -c 'echo U > {T2}/create || echo U failed'"
    )
    failed = (await mirror.out(script)).split()
    assert len(failed) == 200  # 100 "U failed" pairs
    # 200 slots hold 100 pool-2 devices: exactly 100 creates win
    listing = (await mirror.out("ls bus/mdev/devices")).split()
    assert len(listing) == 100 and set(listing) <= set(uuids)
    assert await mirror.out(f"cat {T2}/available_instances") == "0\n"
    assert sorted((await mirror.out(f"ls {T2}/devices")).split()) == sorted(listing)
    links = await mirror.out("for d in bus/mdev/devices/*; do readlink -f $d/mdev_type; done")
    assert set(links.split()) == {f"{mirror.root}/{T2}"}
    remove = "ls bus/mdev/devices | xargs -P 16 -I U sh -c 'echo 1 > bus/mdev/devices/U/remove'"
    await mirror.out(remove)
    assert await mirror.out("ls bus/mdev/devices") == ""
    assert await mirror.out(f"ls {T2}/devices") == ""
    assert await mirror.out(f"cat {T2}/available_instances") == "100\n"
    assert mirror.view.core.devices == {}


async def test_parent_unregister_and_register_again(mirror: Mirror) -> None:
    # let the kernel cache the static entries first
    assert await mirror.out(f"cat {T2}/available_instances") == "100\n"
    await mirror.out(f"echo {U1} > {T2}/create")
    core = mirror.view.core
    core.unregister_parent("pool")
    r = await mirror.sh(f"cat {T2}/available_instances")
    assert "No such file or directory" in r.stderr.decode()
    assert await mirror.out("ls class/mdev_bus bus/mdev/devices devices/virtual") == (
        "bus/mdev/devices:\n\nclass/mdev_bus:\n\ndevices/virtual:\n"
    )
    core.register_parent("pool", P, PoolDriver(pool=8))
    assert await mirror.out(f"cat {T2}/available_instances") == "4\n"


async def test_whole_tree_walks_and_reads(mirror: Mirror) -> None:
    await mirror.out(f"echo {U1} > {T2}/create")
    # every readable attribute reads, nothing write-only is readable, no link dangles
    script = " && ".join(
        [
            "find . -type f -perm -444 -exec cat {} + > /dev/null",
            "find . -type f ! -perm -444 -exec sh -c 'cat $1 2>/dev/null && echo READ $1' _ {} ';'",
            "find . -type l ! -exec test -e {} ';' -print",
        ]
    )
    assert await mirror.out(script) == ""
    names = (await mirror.out("find . | sort")).split()
    assert f"./bus/mdev/devices/{U1}" in names
    assert f"./{P}/{U1}/vfio_user/qemu_device" in names


async def test_cached_attributes_never_outlive_an_entry(mirror: Mirror) -> None:
    # Attributes are cached, entries of volatile nodes are not: right after a
    # remove the device's path is gone even though its attributes were just
    # stat'ed, and the same UUID created again is a new directory.
    dev = f"bus/mdev/devices/{U1}"
    await mirror.out(f"echo {U1} > {T2}/create")
    first = await mirror.out(f"stat -L -c %i {dev} {dev}/remove {dev}/mdev_type")
    await mirror.out(f"echo 1 > {dev}/remove")
    r = await mirror.sh(f"stat -L {dev}/remove || stat -L {P}/{U1} || echo gone")
    assert r.stdout.decode().endswith("gone\n")
    await mirror.out(f"echo {U1} > {T2}/create")
    again = await mirror.out(f"stat -L -c %i {dev} {dev}/remove {dev}/mdev_type")
    assert set(first.split()).isdisjoint(again.split()[:2])  # new inodes; the type dir stays
    assert again.split()[2] == first.split()[2]
    assert await mirror.out(f"cat {dev}/vendor/sample_mdev_dev") == f"This is MDEV {U1}\n"
